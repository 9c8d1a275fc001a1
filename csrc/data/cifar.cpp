#include "data/cifar.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

namespace fxp::data {

CifarSplit read_cifar_files(const std::vector<std::string>& paths, int64_t label_bytes, int64_t classes) {
  constexpr int64_t kPixels = 3 * 32 * 32;
  TORCH_CHECK(!paths.empty(), "fxp: read_cifar_files needs at least one file");
  TORCH_CHECK(label_bytes >= 1 && classes >= 1, "fxp: read_cifar_files: bad label_bytes or classes");
  const int64_t record = label_bytes + kPixels;
  std::vector<at::Tensor> images, labels;
  for (const auto& path : paths) {
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in, "fxp: cannot open CIFAR file ", path, ": ", std::strerror(errno),
                "; get the binary version with scripts/get_data.sh");
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto size = static_cast<int64_t>(bytes.size());
    TORCH_CHECK(size > 0, "fxp: ", path, ": empty CIFAR file");
    TORCH_CHECK(size % record == 0, "fxp: ", path, ": ", size, " bytes is not a whole number of ", record,
                "-byte records (", label_bytes, " label byte", label_bytes > 1 ? "s" : "",
                " + 3072 pixels): truncated, or not this dataset's binary version");
    const int64_t n = size / record;
    at::Tensor raw = at::from_blob(const_cast<uint8_t*>(bytes.data()), {n, record}, at::kByte);
    at::Tensor label = raw.select(1, label_bytes - 1).to(at::kLong);
    const at::Tensor out_of_range = (label >= classes).nonzero();
    if (out_of_range.numel() > 0) {
      const int64_t r = out_of_range[0][0].item<int64_t>();
      TORCH_CHECK(false, "fxp: ", path, ": record ", r, " has label ", label[r].item<int64_t>(),
                  ", but the dataset has ", classes, " classes (0..", classes - 1, ")");
    }
    images.push_back(raw.narrow(1, label_bytes, kPixels).reshape({n, 3, 32, 32}).clone());
    labels.push_back(label);
  }
  return {at::cat(images), at::cat(labels)};
}

}  // namespace fxp::data
