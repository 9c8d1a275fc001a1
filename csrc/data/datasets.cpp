#include "data/datasets.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <stdexcept>
#include <sys/stat.h>

#include "data/cifar.h"
#include "data/idx.h"

namespace fxp::data {
namespace {

// Scalar normalizations: the MNIST family's customary 0.1307/0.3081 (fxp has
// always used it for Fashion-MNIST too); EMNIST's and CIFAR's are the
// channel-averaged statistics of their training splits.
const std::vector<DatasetInfo>& table() {
  static const std::vector<DatasetInfo> datasets = {
      {"fashion-mnist", 1, 28, 10, 0.1307, 0.3081, "/usr/share/datasets/fashion-mnist", 60000, 10000},
      {"mnist", 1, 28, 10, 0.1307, 0.3081, "data/mnist", 60000, 10000},
      {"emnist", 1, 28, 47, 0.1751, 0.3332, "data/emnist", 112800, 18800},
      {"cifar10", 3, 32, 10, 0.4734, 0.2516, "data/cifar10", 50000, 10000},
      {"cifar100", 3, 32, 100, 0.4782, 0.2682, "data/cifar100", 50000, 10000},
  };
  return datasets;
}

bool is_directory(const std::string& path) {
  // stat, not std::filesystem (see data/idx.cpp).
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

// What to run to get `name`'s files into `dir` (get_data.sh's own default, or DIR as its second argument).
std::string get_data_hint(const std::string& name, const std::string& dir) {
  const std::string missing = is_directory(dir) ? "" : "the directory " + dir + " does not exist; ";
  const std::string& default_dir = dataset_info(name).default_dir;
  if (name == "fashion-mnist" && dir == default_dir) {
    return missing + "on Debian: apt-get install dataset-fashion-mnist, elsewhere: scripts/get_data.sh, then "
                     "--data-dir data/fashion-mnist";
  }
  return missing + "get it with: scripts/get_data.sh " + name + (dir == default_dir ? "" : " " + dir);
}

void check_labels(const at::Tensor& labels, int64_t classes, const std::string& where) {
  const int64_t max = labels.max().item<int64_t>();
  if (max >= classes) {
    throw std::invalid_argument("fxp: " + where + " has label " + std::to_string(max) + ", but the dataset has " +
                                std::to_string(classes) + " classes (0.." + std::to_string(classes - 1) + ")");
  }
}

}  // namespace

const std::vector<std::string>& dataset_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& d : table()) out.push_back(d.name);
    return out;
  }();
  return names;
}

const DatasetInfo& dataset_info(const std::string& name) {
  for (const auto& d : table()) {
    if (d.name == name) return d;
  }
  std::string list;
  for (const auto& d : table()) list += (list.empty() ? "" : ", ") + d.name;
  throw std::invalid_argument("dataset must be one of " + list + ", but got '" + name + "'");
}

ImageSplit read_dataset_split(const std::string& name, const std::string& dir, bool train) {
  const DatasetInfo& info = dataset_info(name);
  if (name == "cifar10" || name == "cifar100") {
    const bool ten = name == "cifar10";
    const std::string sub = dir + (ten ? "/cifar-10-batches-bin" : "/cifar-100-binary");
    const std::string base = is_directory(sub) ? sub : dir;
    std::vector<std::string> files;
    if (ten && train) {
      for (int i = 1; i <= 5; ++i) files.push_back(base + "/data_batch_" + std::to_string(i) + ".bin");
    } else {
      files.push_back(base + (ten ? "/test_batch.bin" : train ? "/train.bin" : "/test.bin"));
    }
    for (const auto& f : files) {
      struct stat st {};
      if (::stat(f.c_str(), &st) != 0) {
        throw std::invalid_argument("fxp: missing dataset file " + f + "; " + get_data_hint(name, dir));
      }
    }
    CifarSplit s = read_cifar_files(files, ten ? 1 : 2, info.classes);
    return {s.images, s.labels};
  }
  MnistSplit s;
  std::string where;
  if (name == "emnist") {
    const std::string prefix = std::string("emnist-balanced-") + (train ? "train" : "test");
    s = read_idx_split(dir, prefix + "-images-idx3-ubyte", prefix + "-labels-idx1-ubyte", get_data_hint(name, dir));
    s.images = s.images.transpose(1, 2).contiguous();
    where = dir + "/" + prefix + "-labels-idx1-ubyte";
  } else {
    const std::string split = train ? "train" : "t10k";
    s = read_idx_split(dir, split + "-images-idx3-ubyte", split + "-labels-idx1-ubyte", get_data_hint(name, dir));
    where = dir + "/" + split + "-labels-idx1-ubyte";
  }
  check_labels(s.labels, info.classes, where);
  return {s.images.unsqueeze(1), s.labels};
}

at::Tensor fit_images(const at::Tensor& images, int64_t size) {
  TORCH_CHECK(images.dim() == 4 && images.size(2) == images.size(3), "fxp: fit_images needs square images [n, C, H, H], got ",
              images.sizes());
  const int64_t have = images.size(2);
  if (have == size) return images;
  if (have < size) {
    const int64_t before = (size - have) / 2, after = size - have - before;
    return at::constant_pad_nd(images, {before, after, before, after}, 0);
  }
  const int64_t start = (have - size) / 2;
  return images.narrow(2, start, size).narrow(3, start, size).contiguous();
}

}  // namespace fxp::data
