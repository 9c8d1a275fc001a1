// C++ entry points to the fxp ops. They call through the dispatcher, so they
// pick the CPU, CUDA or Meta kernel and record autograd like any ATen op.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
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

}  // namespace fxp
