// The check of the in-place list ops (qpu_sgd_step_, adapt_sgd_step_, ...)
// that no tensor they write shares memory with another tensor of the call.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/ArrayRef.h>

namespace fxp {

struct NamedTensorList {
  at::TensorList tensors;
  const char* name;
  bool written;
};

// Raises, naming both tensors, if a written tensor overlaps any other (read-only
// tensors may share memory with each other). O(n log n) in the tensors.
void check_no_aliasing(const char* op, c10::ArrayRef<NamedTensorList> lists);

}  // namespace fxp
