// One element of the fixed-point histogram, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/fxp_math.h"

namespace fxp::kernels {

// Note [Fused quantize and histogram]
// AdaPT's push-down (csrc/adapt/precision.cpp) compares the histogram of W
// with that of W rounded to each candidate format, about ten candidates per
// switch. Rounding and binning in one pass reads W once per candidate and
// writes nothing but the counts: no quantized copy per candidate.
// Per element, in float64 (exact for float32, float16 and bfloat16 inputs):
//   v = x                                         (frac_bits < 0: no rounding)
//   c = round_half_even(v * 2^frac_bits)          (x * 2^F is exact)
//   c = clamp(c, -2^(B-1), 2^(B-1) - 1)          (total_bits = 0: no saturation)
//   v = c * 2^-frac_bits                          (exact)
//   bin = floor((clamp(v, lo, hi) - lo) * bins / (hi - lo)), and bins - 1 at v = hi.
// The bin is torch.histc's formula, evaluated in the same order, so that the
// counts equal torch.histc(v.clamp(lo, hi), bins, lo, hi) in float64; values
// beyond [lo, hi] count in the end bins. NaN counts nowhere. The counts are
// integers, so CPU and CUDA agree whatever the order of the additions.
struct HistogramSpec {
  int64_t bins;
  double lo, hi;
  int total_bits;  // 0: no saturation
  int frac_bits;   // < 0: no rounding
  double scale, inv_scale, top;  // 2^F, 2^-F, 2^(B-1)
};

inline HistogramSpec make_histogram_spec(int64_t bins, double lo, double hi, int total_bits, int frac_bits) {
  HistogramSpec s{bins, lo, hi, total_bits, frac_bits, 1.0, 1.0, 0.0};
  if (frac_bits >= 0) {
    s.scale = exp2_int<double>(frac_bits);
    s.inv_scale = exp2_int<double>(-frac_bits);
  }
  if (total_bits > 0) s.top = exp2_int<double>(total_bits - 1);
  return s;
}

// The bin of x, or -1 for NaN.
FXP_HOST_DEVICE int64_t histogram_bin(double x, const HistogramSpec& s) {
  double v = x;
  if (s.frac_bits >= 0) {
    double c = round_half_even(v * s.scale);
    if (s.total_bits > 0) c = c < -s.top ? -s.top : (c > s.top - 1 ? s.top - 1 : c);
    v = c * s.inv_scale;
  }
  if (!(v == v)) return -1;
  v = v < s.lo ? s.lo : (v > s.hi ? s.hi : v);
  const int64_t bin = static_cast<int64_t>((v - s.lo) * static_cast<double>(s.bins) / (s.hi - s.lo));
  return bin >= s.bins ? s.bins - 1 : bin;
}

}  // namespace fxp::kernels
