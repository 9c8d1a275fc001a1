// AdaPT's per-step gradient arithmetic, one element at a time: L1's term,
// Eq. 3.4's normalization, the accumulation of Eq. 3.5 and the float SGD
// update. Shared by the CPU and CUDA kernels of the adapt_step ops, so both
// give the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/fxp_math.h"

namespace fxp {

// Note [Deterministic gradient norms]
// A layer's squared gradient norm is a float64 sum taken in one fixed order,
// on CPU and CUDA and at any thread count, so the normalized gradients (and
// with them every AdaPT run) do not depend on where they were computed. Each
// tensor is cut into chunks of kNormChunk elements; in a chunk, lane j of
// kNormLanes sums the squares of elements j, j + 32, j + 64, ... in order,
// and the lanes are combined pairwise, lane j += lane j + 16, then + 8, 4, 2,
// 1 (a warp's shuffle-down). A layer's chunk sums (its tensors in list order,
// each tensor's chunks in order) are reduced the same way. The square of a
// float32 value is exact in float64, so only these additions round.
constexpr int64_t kNormLanes = 32;
constexpr int64_t kNormChunk = 4096;

inline namespace FXP_ISA {

// The gradient with L1's term, l1 * sign(w) (0 for w = 0 or NaN); rounded once in T.
template <typename T>
FXP_HOST_DEVICE T gradient_with_l1(T g, T w, T l1) {
  const T sign = static_cast<T>((w > T(0)) - (w < T(0)));
  return g + l1 * sign;
}

// Eq. 3.4's divisor: the layer's norm, or 1 for a zero (or NaN) norm, so that
// a zero gradient stays zero.
FXP_HOST_DEVICE double norm_divisor(double norm) { return norm > 0 ? norm : 1.0; }

// Eq. 3.4: divided in float64, rounded once to T.
template <typename T>
FXP_HOST_DEVICE T normalized_gradient(T g, double divisor) {
  return static_cast<T>(static_cast<double>(g) / divisor);
}

// Lanes [0, kNormLanes) combined pairwise as a warp's shuffle-down; lanes is overwritten.
FXP_HOST_DEVICE double combine_lanes(double* lanes) {
  for (int64_t offset = kNormLanes / 2; offset > 0; offset /= 2) {
    for (int64_t j = 0; j < offset; ++j) lanes[j] += lanes[j + offset];
  }
  return lanes[0];
}

// torch.optim.SGD's update (dampening 0) with every operation rounded in T:
//   d = g + wd w;  v = mu v + d;  d = nesterov ? d + mu v : v;  w = w - lr d.
// A new momentum buffer is zero, so the first step gives v = d as torch's does.
template <typename T, bool kMomentum, bool kNesterov>
FXP_HOST_DEVICE void sgd_element(T& w, T g, T& v, T lr, T momentum, T weight_decay) {
  T d = g + weight_decay * w;
  if constexpr (kMomentum) {
    v = momentum * v + d;
    d = kNesterov ? d + momentum * v : v;
  }
  w = w - lr * d;
}

}  // namespace FXP_ISA
}  // namespace fxp
