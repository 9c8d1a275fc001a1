// C++ entry points to the fxp ops. They call through the dispatcher, so they
// pick the CPU, CUDA or Meta kernel and record autograd like any ATen op.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
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
// (saturated, vanished) elements per tensor.
at::Tensor qpu_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         double lr, double momentum, double weight_decay, bool nesterov,
                         int64_t total_bits, int64_t frac_bits, int64_t momentum_total_bits,
                         int64_t momentum_frac_bits, c10::string_view rounding, int64_t seed,
                         int64_t step, c10::string_view momentum_form = "standard");

}  // namespace fxp
