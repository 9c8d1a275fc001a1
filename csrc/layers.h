// The conv and linear ops of quantized layers (fxp::linear, fxp::conv2d):
// ATen's linear and convolution, whose weights may be read from packed codes
// and whose autograd may save the input packed (docs/design.md, "Packed storage").
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

// The forwards (no autograd): registered for CompositeExplicitAutograd, and
// called by the Autograd kernels below the autograd key.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                          const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                          at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                          const std::optional<at::Generator>& generator);

at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                          const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                          at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                          const std::optional<at::Generator>& generator);


}  // namespace fxp
