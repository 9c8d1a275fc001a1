// C++ entry points to the fxp ops. They call through the dispatcher, so they
// pick the CPU, CUDA or Meta kernel and record autograd like any ATen op.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fxp {

at::Tensor quantize(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                    c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
                    const std::optional<at::Generator>& generator = std::nullopt);

at::Tensor& quantize_(at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                      c10::string_view rounding = "nearest_even",
                      c10::string_view overflow = "saturate",
                      const std::optional<at::Generator>& generator = std::nullopt);

// (output, int64 0-dim count of saturated elements)
std::tuple<at::Tensor, at::Tensor> quantize_stats(
    const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
    c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
    const std::optional<at::Generator>& generator = std::nullopt);

// (output, bool tensor: true where saturated)
std::tuple<at::Tensor, at::Tensor> quantize_mask(
    const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
    c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
    const std::optional<at::Generator>& generator = std::nullopt);

// Straight-through quantization for training; differentiable.
at::Tensor quantize_ste(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                        c10::string_view rounding = "nearest_even",
                        c10::string_view overflow = "saturate",
                        const std::optional<at::Generator>& generator = std::nullopt,
                        bool zero_grad_saturated = false);

at::Tensor quantize_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                           c10::string_view rounding, int64_t seed, int64_t offset,
                           c10::string_view overflow = "saturate");

at::Tensor& quantize_seeded_(at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                             c10::string_view rounding, int64_t seed, int64_t offset,
                             c10::string_view overflow = "saturate");

std::tuple<at::Tensor, at::Tensor> quantize_seeded_stats(const at::Tensor& x, int64_t total_bits,
                                                         int64_t frac_bits, c10::string_view rounding,
                                                         int64_t seed, int64_t offset,
                                                         c10::string_view overflow = "saturate");

// The fused QPU SGD step over a parameter group; see docs/design.md. Updates
// params and momentum_buffers in place; returns int64 [n, 2] of
// (saturated, vanished) elements per tensor. stream_indices: each tensor's
// random stream (default: its position in params; Note [QPU random streams]).
at::Tensor qpu_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         double lr, double momentum, double weight_decay, bool nesterov,
                         int64_t total_bits, int64_t frac_bits, int64_t momentum_total_bits,
                         int64_t momentum_frac_bits, c10::string_view rounding, int64_t seed,
                         int64_t step, c10::string_view momentum_form = "standard",
                         at::OptionalIntArrayRef stream_indices = std::nullopt);

// Packed storage: integer codes of FxP(total_bits, frac_bits) (int8 for B <= 8,
// int16 for B <= 16, int32 otherwise), rounded like quantize; NaN is an error.
at::Tensor pack(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
                const std::optional<at::Generator>& generator = std::nullopt);
at::Tensor pack_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, c10::string_view rounding,
                       int64_t seed, int64_t offset, c10::string_view overflow = "saturate");
// codes * 2^-frac_bits, as dtype (default float32).
at::Tensor unpack(const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                  std::optional<at::ScalarType> dtype = std::nullopt);

// torch's linear / conv2d for quantized layers: weights from packed codes
// (weight_codes, bias_codes in param_format), the input saved packed in
// input_format for the backward, and the output quantized in place to
// output_format (straight-through). See docs/design.md, "Packed storage".
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias = std::nullopt,
                  at::OptionalIntArrayRef input_format = std::nullopt,
                  const std::optional<at::Tensor>& weight_codes = std::nullopt,
                  const std::optional<at::Tensor>& bias_codes = std::nullopt,
                  at::OptionalIntArrayRef param_format = std::nullopt,
                  at::OptionalIntArrayRef output_format = std::nullopt,
                  c10::string_view output_rounding = "nearest_even",
                  const std::optional<at::Generator>& generator = std::nullopt);
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                  at::OptionalIntArrayRef input_format = std::nullopt,
                  const std::optional<at::Tensor>& weight_codes = std::nullopt,
                  const std::optional<at::Tensor>& bias_codes = std::nullopt,
                  at::OptionalIntArrayRef param_format = std::nullopt,
                  at::OptionalIntArrayRef output_format = std::nullopt,
                  c10::string_view output_rounding = "nearest_even",
                  const std::optional<at::Generator>& generator = std::nullopt);

// max_pool2d(relu(x), kernel_size), stride = kernel_size, whose autograd saves
// one byte per output; gradients equal torch's. See docs/design.md.
at::Tensor relu_max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size);

// Its parts (what the autograd calls): the output and each output's window
// position of the maximum (uint8, 255: not positive); the input gradient.
std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_with_positions(const at::Tensor& x, at::IntArrayRef kernel_size);
at::Tensor relu_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& positions,
                                    at::IntArrayRef kernel_size, c10::SymIntArrayRef input_size);

}  // namespace fxp
