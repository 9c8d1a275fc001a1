// The IDX reader on files the test writes: good, gzipped, truncated, wrong magic, missing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>

#if defined(FXP_HAVE_ZLIB)
#include <zlib.h>
#endif

#include "data/idx.h"

#include "test_util.h"

namespace {

// Note: no std::filesystem here; libtorch.so exports its own copies of those
// symbols, and calls that bind to them crash.

class IdxReader : public ::testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/fxp_idx_test_XXXXXX";
    ASSERT_NE(::mkdtemp(templ), nullptr);
    dir_ = templ;
  }
  void TearDown() override {
    for (const auto& f : files_) std::remove(f.c_str());
    ::rmdir(dir_.c_str());
  }

  std::string path(const std::string& name) {
    files_.push_back(dir_ + "/" + name);
    return files_.back();
  }

  std::string write(const std::string& name, const std::vector<uint8_t>& bytes) {
    const auto p = path(name);
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return p;
  }

  std::string dir_;
  std::vector<std::string> files_;
};

using fxp::testing::expect_error;
using fxp::testing::idx_bytes;

TEST_F(IdxReader, ReadsUint8AndBigEndianInt32) {
  auto bytes = idx_bytes(0x08, {2, 3});
  for (uint8_t v = 0; v < 6; ++v) bytes.push_back(v * 10);
  const auto t = fxp::data::read_idx(write("u8.idx", bytes));
  EXPECT_EQ(t.scalar_type(), torch::kByte);
  EXPECT_TRUE(torch::equal(t, torch::tensor({0, 10, 20, 30, 40, 50}, torch::kByte).view({2, 3})));

  auto ints = idx_bytes(0x0C, {2});
  for (uint8_t b : {0x00, 0x01, 0x02, 0x03, 0xFF, 0xFF, 0xFF, 0xFE}) ints.push_back(b);
  const auto i = fxp::data::read_idx(write("i32.idx", ints));
  EXPECT_EQ(i[0].item<int32_t>(), 0x00010203);
  EXPECT_EQ(i[1].item<int32_t>(), -2);
}

TEST_F(IdxReader, BadFilesGiveErrorsNamingTheFile) {
  auto bytes = idx_bytes(0x08, {10, 28, 28});
  bytes.resize(bytes.size() + 100);  // 7840 payload bytes expected
  const auto truncated = write("truncated.idx", bytes);
  expect_error([&] { fxp::data::read_idx(truncated); }, truncated + ": truncated IDX file");
  auto magic = idx_bytes(0x08, {1});
  magic[0] = 7;
  magic.push_back(1);
  const auto bad_magic = write("magic.idx", magic);
  expect_error([&] { fxp::data::read_idx(bad_magic); }, bad_magic + ": not an IDX file (bad magic number");
  auto type = idx_bytes(0x42, {1});
  type.push_back(1);
  const auto bad_type = write("type.idx", type);
  expect_error([&] { fxp::data::read_idx(bad_type); }, "unknown IDX element type 0x42");
  const auto missing = dir_ + "/nope.idx";
  expect_error([&] { fxp::data::read_idx(missing); }, "cannot open IDX file " + missing);
  expect_error([&] { fxp::data::read_mnist_split(dir_, "train"); },
               "missing dataset file " + dir_ + "/train-images-idx3-ubyte");
}

#if defined(FXP_HAVE_ZLIB)
TEST_F(IdxReader, ReadsGzipAndRejectsATruncatedOne) {
  auto bytes = idx_bytes(0x08, {4});
  for (uint8_t v : {1, 2, 3, 4}) bytes.push_back(v);
  const auto file = path("a.idx.gz");
  gzFile gz = gzopen(file.c_str(), "wb");
  gzwrite(gz, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(gz);
  EXPECT_TRUE(torch::equal(fxp::data::read_idx(file), torch::tensor({1, 2, 3, 4}, torch::kByte)));
  struct stat info {};
  ASSERT_EQ(::stat(file.c_str(), &info), 0);
  ASSERT_EQ(::truncate(file.c_str(), info.st_size - 6), 0);
  expect_error([&] { fxp::data::read_idx(file); }, file + " is not a valid gzip file (truncated)");
}

// Two gzip files concatenated are one valid gzip file (zcat reads both members);
// the reader stopped at the first, and called the IDX data truncated. Bytes
// after the last member that start no other were silently ignored.
TEST_F(IdxReader, ReadsEveryGzipMemberAndRefusesTrailingBytes) {
  auto bytes = idx_bytes(0x08, {2, 3});
  for (uint8_t v = 0; v < 6; ++v) bytes.push_back(v * 10);
  const auto gzip = [&](const std::string& name, size_t from, size_t to) {
    const auto file = path(name);
    gzFile gz = gzopen(file.c_str(), "wb");
    gzwrite(gz, bytes.data() + from, static_cast<unsigned>(to - from));
    gzclose(gz);
    std::ifstream in(file, std::ios::binary);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  // The header and two elements in one member, the rest in two more.
  std::vector<uint8_t> joined = gzip("part1.gz", 0, 14);
  for (const auto& part : {gzip("part2.gz", 14, 16), gzip("part3.gz", 16, bytes.size())}) {
    joined.insert(joined.end(), part.begin(), part.end());
  }
  const auto members = write("members.idx.gz", joined);
  EXPECT_TRUE(torch::equal(fxp::data::read_idx(members),
                           torch::tensor({0, 10, 20, 30, 40, 50}, torch::kByte).view({2, 3})));

  auto garbage = gzip("whole.gz", 0, bytes.size());
  for (const char c : std::string("garbage")) garbage.push_back(static_cast<uint8_t>(c));
  const auto trailing = write("trailing.idx.gz", garbage);
  expect_error([&] { fxp::data::read_idx(trailing); },
               trailing + " has bytes after its gzip data that start no other gzip member (7 bytes;");
  garbage.resize(garbage.size() - 6);  // one byte: not even a gzip magic number
  const auto one = write("one.idx.gz", garbage);
  expect_error([&] { fxp::data::read_idx(one); }, one + " has bytes after its gzip data that start no other gzip member (1 byte;");
  // Zero bytes after the data are padding, as gzip takes them (a tape block); a non-zero one among them is not.
  std::vector<uint8_t> padded = joined;
  padded.resize(padded.size() + 512, 0);
  const auto zeros = write("padded.idx.gz", padded);
  EXPECT_TRUE(torch::equal(fxp::data::read_idx(zeros), fxp::data::read_idx(members)));
  padded[padded.size() - 3] = 1;
  const auto not_zeros = write("not_padded.idx.gz", padded);
  expect_error([&] { fxp::data::read_idx(not_zeros); }, " has bytes after its gzip data that start no other gzip member");
  // A second member cut short is a truncated file, as a first one is.
  std::vector<uint8_t> cut = joined;
  cut.resize(cut.size() - 6);
  const auto truncated = write("cut.idx.gz", cut);
  expect_error([&] { fxp::data::read_idx(truncated); }, truncated + " is not a valid gzip file (truncated)");
}
#endif

TEST(FashionMnist, DebianFilesLoad) {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  struct stat info {};
  if (::stat(dir.c_str(), &info) != 0) GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  const auto train = fxp::data::read_mnist_split(dir, "train");
  EXPECT_EQ(train.images.sizes(), (std::vector<int64_t>{60000, 28, 28}));
  EXPECT_EQ(train.labels.min().item<int64_t>(), 0);
  EXPECT_EQ(train.labels.max().item<int64_t>(), 9);
  const auto test = fxp::data::read_mnist_split(dir, "t10k");
  EXPECT_EQ(test.images.size(0), 10000);
}

// Issue 11 (found by UBSan): a header whose dimensions multiply past 2^63 was a
// signed overflow, and a file without elements passed a null pointer to memcpy.
TEST_F(IdxReader, HugeDimensionsAreATruncatedFileNotAnOverflow) {
  auto bytes = idx_bytes(0x08, {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu});
  bytes.resize(bytes.size() + 16);
  const auto huge = write("huge.idx", bytes);
  expect_error([&] { fxp::data::read_idx(huge); }, huge + ": truncated IDX file");
  // 2^22 * 2^21 * 2^21 = 2^64: the product wraps to 0, which once passed the size check.
  const auto wraps = write("wraps.idx", idx_bytes(0x08, {0x400000u, 0x200000u, 0x200000u}));
  expect_error([&] { fxp::data::read_idx(wraps); }, wraps + ": truncated IDX file");
  const auto empty = fxp::data::read_idx(write("empty.idx", idx_bytes(0x08, {0, 28, 28})));
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 28, 28}));
}

// A zero dimension holds no elements: the header [60000, 0, 0] needs 16 bytes,
// not "more than the 16 bytes the file has"; a split of such images is refused
// as images of 0x0, naming the file.
TEST_F(IdxReader, AZeroDimensionIsNoTruncationButImagesOfNoPixels) {
  const auto flat = fxp::data::read_idx(write("flat.idx", idx_bytes(0x08, {60000, 0, 0})));
  EXPECT_EQ(flat.sizes(), (std::vector<int64_t>{60000, 0, 0}));
  const auto big = fxp::data::read_idx(write("big.idx", idx_bytes(0x0C, {0xFFFFFFFFu, 0xFFFFFFFFu, 0})));
  EXPECT_EQ(big.numel(), 0);
  // Its strides would overflow: named, not at::empty's bare error.
  const auto huge = write("huge.idx", idx_bytes(0x08, {1, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0}));
  expect_error([&] { fxp::data::read_idx(huge); },
               huge + ": IDX header [1, 4294967295, 4294967295, 4294967295, 0] has a dimension 0, but its others are "
                      "too large for a tensor's strides");
  const auto images = write("train-images-idx3-ubyte", idx_bytes(0x08, {3, 28, 0}));
  write("train-labels-idx1-ubyte", idx_bytes(0x08, {3}, {1, 2, 3}));
  expect_error([&] { fxp::data::read_mnist_split(dir_, "train"); },
               images + ": the images are 28x0 (header [3, 28, 0]); an image needs at least one row and one column");
}

TEST_F(IdxReader, ASplitWithoutImagesIsAnError) {
  const auto images = write("train-images-idx3-ubyte", idx_bytes(0x08, {0, 28, 28}));
  write("train-labels-idx1-ubyte", idx_bytes(0x08, {0}));
  expect_error([&] { fxp::data::read_mnist_split(dir_, "train"); }, images + " holds no images");
}

}  // namespace
