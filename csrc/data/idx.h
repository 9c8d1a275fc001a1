// Reader for IDX files (the MNIST / Fashion-MNIST format), plain or gzipped.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fxp::data {

// Reads an IDX file into a tensor of its element type and dimensions
// (uint8, int8, int16, int32, float32 or float64). A gzip file (by its magic
// bytes) is decompressed first. Validates the magic number, the type code, the
// dimension count and the payload size against the file's length; every error
// names the file and what was wrong.
at::Tensor read_idx(const std::string& path);

// One split of an MNIST-format dataset: images uint8 [n, 28, 28] and labels
// int64 [n]. split is "train" or "t10k"; each file is found as
// <dir>/<split>-{images-idx3,labels-idx1}-ubyte, with or without ".gz".
struct MnistSplit {
  at::Tensor images;
  at::Tensor labels;
};
MnistSplit read_mnist_split(const std::string& dir, const std::string& split);
// The same for any pair of IDX files <dir>/<images_name> and <dir>/<labels_name>
// (each with or without ".gz"); a missing file's error ends with missing_hint.
MnistSplit read_idx_split(const std::string& dir, const std::string& images_name, const std::string& labels_name,
                          const std::string& missing_hint);

}  // namespace fxp::data
