// Reader for the CIFAR-10 and CIFAR-100 binary format ("binary version
// suitable for C programs"): fixed-size records of label bytes, then a 32x32
// image as 1024 red, 1024 green and 1024 blue bytes.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace fxp::data {

// Images uint8 [n, 3, 32, 32] and labels int64 [n].
struct CifarSplit {
  at::Tensor images;
  at::Tensor labels;
};

// Reads and concatenates CIFAR binary files whose records hold `label_bytes`
// label bytes (CIFAR-10: 1; CIFAR-100: 2, coarse then fine); the label kept is
// the last one (CIFAR-100's fine label), and must be below `classes`. Every
// error names the file: a missing file, a size that is not a whole number of
// records, an empty file, a label out of range (with its record).
CifarSplit read_cifar_files(const std::vector<std::string>& paths, int64_t label_bytes, int64_t classes);

}  // namespace fxp::data
