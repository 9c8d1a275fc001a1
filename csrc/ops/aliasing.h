// The check of the in-place list ops (qpu_sgd_step_, adapt_sgd_step_, ...)
// that no tensor they write shares memory with another tensor of the call.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace fxp {

struct NamedTensorList {
  at::TensorList tensors;
  const char* name;
  bool written;
};

// Raises, naming both tensors, if a written tensor overlaps any other (read-only
// tensors may share memory with each other). O(n log n) in the tensors.
void check_no_aliasing(const char* op, std::initializer_list<NamedTensorList> lists);

}  // namespace fxp
