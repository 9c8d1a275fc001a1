#include "data/idx.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <sys/stat.h>
#include <algorithm>
#include <fstream>
#include <limits>
#include <vector>

#if defined(FXP_HAVE_ZLIB)
#include <zlib.h>
#endif

namespace fxp::data {
namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  struct stat info {};
  // A directory opens as a stream and fails only as it is read, with a message that names no file.
  TORCH_CHECK(::stat(path.c_str(), &info) != 0 || !S_ISDIR(info.st_mode), "fxp: IDX file ", path,
              " is a directory");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "fxp: cannot open IDX file ", path, ": ", std::strerror(errno));
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool is_gzip(const std::vector<uint8_t>& bytes) {
  return bytes.size() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b;
}

// Every member of the file: gzip files may be concatenated (`cat a.gz b.gz`), and
// zcat reads them all as one. Bytes after the last member that start no other
// are an error, not ignored: a file with them is damaged or not what it seems.
// Zero bytes are the exception, as gzip's: padding (a tape block) after the data.
std::vector<uint8_t> gunzip(const std::vector<uint8_t>& bytes, const std::string& path) {
#if defined(FXP_HAVE_ZLIB)
  z_stream z{};
  TORCH_CHECK(inflateInit2(&z, 16 + MAX_WBITS) == Z_OK, "fxp: zlib init failed for ", path);
  // zlib counts input in uInt: a file above 4 GiB is fed in pieces.
  const auto feed = [&](size_t from) {
    z.next_in = const_cast<Bytef*>(bytes.data() + from);
    z.avail_in = static_cast<uInt>(std::min<size_t>(bytes.size() - from, std::numeric_limits<uInt>::max()));
  };
  const auto consumed = [&] { return static_cast<size_t>(z.next_in - bytes.data()); };
  feed(0);
  std::vector<uint8_t> out;
  std::vector<uint8_t> buffer(1 << 20);
  for (;;) {
    int rc = Z_OK;
    while (rc != Z_STREAM_END) {
      if (z.avail_in == 0) feed(consumed());
      z.next_out = buffer.data();
      z.avail_out = static_cast<uInt>(buffer.size());
      rc = inflate(&z, Z_NO_FLUSH);
      if (rc != Z_OK && rc != Z_STREAM_END) {
        inflateEnd(&z);
        TORCH_CHECK(false, "fxp: ", path, " is not a valid gzip file (",
                    rc == Z_BUF_ERROR ? "truncated" : "corrupted", ")");
      }
      out.insert(out.end(), buffer.data(), buffer.data() + (buffer.size() - z.avail_out));
    }
    const size_t next = consumed();
    if (next == bytes.size()) break;
    const bool another_member = bytes.size() - next >= 2 && bytes[next] == 0x1f && bytes[next + 1] == 0x8b;
    if (!another_member) {
      if (std::all_of(bytes.begin() + static_cast<std::ptrdiff_t>(next), bytes.end(), [](uint8_t b) { return b == 0; })) {
        break;
      }
      inflateEnd(&z);
      TORCH_CHECK(false, "fxp: ", path, " has bytes after its gzip data that start no other gzip member (",
                  bytes.size() - next, bytes.size() - next == 1 ? " byte" : " bytes", "; a damaged file?)");
    }
    inflateReset(&z);
    feed(next);
  }
  inflateEnd(&z);
  return out;
#else
  TORCH_CHECK(false, "fxp: ", path, " is gzipped, but this build has no zlib; gunzip it first");
#endif
}

struct IdxType {
  at::ScalarType dtype;
  int64_t size;
};

IdxType idx_type(uint8_t code, const std::string& path) {
  switch (code) {
    case 0x08: return {at::kByte, 1};
    case 0x09: return {at::kChar, 1};
    case 0x0B: return {at::kShort, 2};
    case 0x0C: return {at::kInt, 4};
    case 0x0D: return {at::kFloat, 4};
    case 0x0E: return {at::kDouble, 8};
  }
  TORCH_CHECK(false, "fxp: ", path, ": unknown IDX element type 0x", std::hex, int{code});
}

uint32_t big_endian_u32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

std::string find_split_file(const std::string& dir, const std::string& name, const std::string& hint) {
  for (const std::string& candidate : {dir + "/" + name, dir + "/" + name + ".gz"}) {
    // stat, not std::filesystem: libtorch.so exports its own std::filesystem
    // symbols, and calls that bind to them crash (seen in tests/cpp/test_idx.cpp).
    struct stat info {};
    if (::stat(candidate.c_str(), &info) == 0) return candidate;
  }
  TORCH_CHECK(false, "fxp: missing dataset file ", dir, "/", name, " (or ", name, ".gz); ", hint);
}

}  // namespace

at::Tensor read_idx(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  if (is_gzip(bytes)) bytes = gunzip(bytes, path);
  TORCH_CHECK(bytes.size() >= 4, "fxp: ", path, ": too short for an IDX header (", bytes.size(),
              " bytes)");
  TORCH_CHECK(bytes[0] == 0 && bytes[1] == 0, "fxp: ", path,
              ": not an IDX file (bad magic number; the first two bytes must be zero)");
  const IdxType type = idx_type(bytes[2], path);
  const int ndim = bytes[3];
  TORCH_CHECK(ndim >= 1, "fxp: ", path, ": an IDX file needs at least one dimension");
  const size_t header = 4 + 4 * static_cast<size_t>(ndim);
  TORCH_CHECK(bytes.size() >= header, "fxp: ", path, ": truncated IDX header (", ndim,
              " dimensions need ", header, " bytes, the file has ", bytes.size(), ")");
  std::vector<int64_t> dims(ndim);
  // The payload must fit in the file, so the element count is checked against
  // the file's size dimension by dimension: a huge header cannot overflow it.
  const uint64_t payload_limit = (bytes.size() - header) / static_cast<uint64_t>(type.size);
  for (int d = 0; d < ndim; ++d) dims[d] = big_endian_u32(bytes.data() + 4 + 4 * d);
  // A zero dimension (images [60000, 0, 0]) holds no elements, whatever the others: no payload is
  // needed, and the dimensions before it must not be measured against the file as if one were.
  const bool empty = std::find(dims.begin(), dims.end(), 0) != dims.end();
  if (empty) {  // the dimensions after the first still make the tensor's strides (a 0 counting as 1): an int64
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 1; --d) {
      const int64_t dim = std::max<int64_t>(dims[d], 1);
      TORCH_CHECK(stride <= std::numeric_limits<int64_t>::max() / dim, "fxp: ", path, ": IDX header ",
                  c10::IntArrayRef(dims),
                  " has a dimension 0, but its others are too large for a tensor's strides");
      stride *= dim;
    }
  }
  uint64_t count = empty ? 0 : 1;
  bool too_large = false;
  for (int d = 0; d < ndim && !empty; ++d) {
    const uint64_t dim = static_cast<uint64_t>(dims[d]);
    too_large = too_large || count > payload_limit / dim;
    count = too_large ? count : count * dim;
  }
  TORCH_CHECK(!too_large, "fxp: ", path, ": truncated IDX file: its header ", dims, " needs more than the ",
              bytes.size(), " bytes the file has");
  const size_t expected = header + static_cast<size_t>(count) * static_cast<size_t>(type.size);
  TORCH_CHECK(bytes.size() == expected, "fxp: ", path, ": ",
              bytes.size() < expected ? "truncated" : "oversized", " IDX file: its header ", dims,
              " needs ", expected, " bytes, the file has ", bytes.size());
  at::Tensor out = at::empty(dims, at::TensorOptions(type.dtype));
  // IDX stores big-endian elements; swap multi-byte ones on this little-endian host.
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  const uint8_t* src = bytes.data() + header;
  if (count == 0) return out;  // no data: out's pointer may be null, and memcpy must not see it
  if (type.size == 1) {
    std::memcpy(dst, src, static_cast<size_t>(count));
  } else {
    for (int64_t i = 0; i < static_cast<int64_t>(count); ++i) {
      for (int64_t b = 0; b < type.size; ++b) dst[i * type.size + b] = src[i * type.size + type.size - 1 - b];
    }
  }
  return out;
}

MnistSplit read_mnist_split(const std::string& dir, const std::string& split) {
  TORCH_CHECK(split == "train" || split == "t10k", "fxp: split must be train or t10k, not '", split, "'");
  return read_idx_split(dir, split + "-images-idx3-ubyte", split + "-labels-idx1-ubyte",
                        "on Debian: apt-get install dataset-fashion-mnist, elsewhere: scripts/get_data.sh");
}

MnistSplit read_idx_split(const std::string& dir, const std::string& images_name, const std::string& labels_name,
                          const std::string& missing_hint) {
  const std::string images_path = find_split_file(dir, images_name, missing_hint);
  const std::string labels_path = find_split_file(dir, labels_name, missing_hint);
  MnistSplit s{read_idx(images_path), read_idx(labels_path)};
  TORCH_CHECK(s.images.dim() == 3 && s.images.scalar_type() == at::kByte, "fxp: ", images_path,
              ": expected uint8 images [n, rows, cols], got ", s.images.scalar_type(), " ", s.images.sizes());
  TORCH_CHECK(s.labels.dim() == 1 && s.labels.scalar_type() == at::kByte, "fxp: ", labels_path,
              ": expected uint8 labels [n], got ", s.labels.scalar_type(), " ", s.labels.sizes());
  TORCH_CHECK(s.images.size(1) > 0 && s.images.size(2) > 0, "fxp: ", images_path, ": the images are ",
              s.images.size(1), "x", s.images.size(2), " (header ", s.images.sizes(),
              "); an image needs at least one row and one column");
  TORCH_CHECK(s.images.size(0) == s.labels.size(0), "fxp: ", images_path, " has ", s.images.size(0),
              " images but ", labels_path, " has ", s.labels.size(0), " labels");
  TORCH_CHECK(s.images.size(0) > 0, "fxp: ", images_path, " holds no images");
  s.labels = s.labels.to(at::kLong);
  return s;
}

}  // namespace fxp::data
