// What the conv and linear ops of quantized layers (fxp::linear, fxp::conv2d)
// share between their forward (layers_op.cpp) and their autograd
// (layers_register.cpp): ATen's linear and convolution, whose weights may be
// read from packed codes and whose autograd may save the input packed
// (docs/design.md, "Packed storage").
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Generator.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace fxp {

// A fixed-point format given to an op as int[]? [total_bits, frac_bits].
struct OptionalFormat {
  bool present = false;
  int64_t total_bits = 0, frac_bits = 0;
};
OptionalFormat parse_format(const char* op, const char* name, at::OptionalIntArrayRef format);

}  // namespace fxp
