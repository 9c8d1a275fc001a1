// Quantize kernels: compute only. Callers (csrc/) validate arguments, make
// the input contiguous and allocate outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "fxp_math.h"

namespace fxp::kernels {

struct QuantizeParams {
  int total_bits;
  int frac_bits;
  Rounding rounding;
  Overflow overflow;
};

// Quantizes the contiguous x into the contiguous out (same shape and dtype;
// out may be x). Element i, in row-major order, takes lane i % 4 of the
// Philox block (seed, offset, i / 4) when rounding is stochastic.
// If saturated is defined (bool, contiguous, same numel) it receives the
// per-element saturation flag. If saturated_count is defined (int64, 0-dim)
// the number of saturated elements is added to it.
void quantize_cpu(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                  uint64_t seed, uint64_t offset, const at::Tensor& saturated,
                  const at::Tensor& saturated_count);

}  // namespace fxp::kernels
