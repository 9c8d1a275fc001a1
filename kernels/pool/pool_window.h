// One output of the fused ReLU + max-pool, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/fxp_math.h"
#include "pool/pool_kernel.h"

namespace fxp::kernels {

// Scans the kh x kw window at plane[row0 * width + col0 ...]; returns the
// maximum of relu over it and sets *position (see pool_kernel.h for the rules).
template <typename scalar_t, typename acc_t>
FXP_HOST_DEVICE scalar_t relu_max_window(const scalar_t* plane, int64_t width, int64_t row0, int64_t col0, int kh,
                                         int kw, uint8_t* position) {
  acc_t max_value = -INFINITY;
  scalar_t max_stored = static_cast<scalar_t>(max_value);
  int best = 0;
  for (int i = 0; i < kh; ++i) {
    for (int j = 0; j < kw; ++j) {
      const scalar_t v = plane[(row0 + i) * width + col0 + j];
      const scalar_t r = static_cast<acc_t>(v) < acc_t(0) ? static_cast<scalar_t>(0) : v;  // relu
      const acc_t a = static_cast<acc_t>(r);
      if (a > max_value || a != a) {
        max_value = a;
        max_stored = r;
        best = i * kw + j;
      }
    }
  }
  // A NaN maximum passes the gradient, as ATen's relu backward does (NaN <= 0 is false).
  *position = max_value > acc_t(0) || max_value != max_value ? static_cast<uint8_t>(best) : kNotPositive;
  return max_stored;
}

}  // namespace fxp::kernels
