// The datasets fxp-train knows: their files, shapes, classes and default
// input normalization (docs/models.md), read into one uint8 image layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace fxp::data {

struct DatasetInfo {
  std::string name;         // fashion-mnist, mnist, emnist, cifar10, cifar100
  int64_t channels;         // 1 or 3
  int64_t image_size;       // square images: 28 or 32
  int64_t classes;
  double mean, std;         // default scalar normalization of pixel/255, over all channels
  std::string default_dir;  // where scripts/get_data.sh (or Debian) puts the files
  // The published training and test splits' sizes, for wall-time estimates
  // (TrainConfig::epoch_images); a run reads whatever its files hold.
  int64_t train_images, test_images;
};

const std::vector<std::string>& dataset_names();
// Throws std::invalid_argument naming the known datasets.
const DatasetInfo& dataset_info(const std::string& name);

// Images uint8 [n, C, H, W] and labels int64 [n].
struct ImageSplit {
  at::Tensor images;
  at::Tensor labels;
};

// The training (train = true) or test split of dataset `name` from `dir`:
// - fashion-mnist, mnist: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz];
// - emnist (the balanced split, 47 classes):
//   emnist-balanced-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz], transposed
//   to the MNIST orientation (EMNIST stores its images column-major);
// - cifar10: data_batch_{1..5}.bin / test_batch.bin;
// - cifar100: train.bin / test.bin (the fine labels);
// the CIFAR files either in dir or in the archive's own folder below it
// (cifar-10-batches-bin, cifar-100-binary). Labels are checked against the
// class count; every error names the file.
ImageSplit read_dataset_split(const std::string& name, const std::string& dir, bool train);

// Square images [n, C, H, H] brought to [n, C, size, size]: zero-padded evenly
// on every side when smaller (28 -> 32 adds 2 pixels each side), centre-cropped
// when larger. The pixels themselves are not resampled.
at::Tensor fit_images(const at::Tensor& images, int64_t size);

}  // namespace fxp::data
