// MSQ's RoundClamp quantizer, one element at a time. Shared by the CPU and
// CUDA kernels of the round_clamp ops, so both give the same bits.
#pragma once

#include <cstdint>

#include "common/fxp_math.h"

namespace fxp {

// Note [RoundClamp]
// MSQ (docs/msq.md) quantizes a layer's weights w at n bits, n in [1, 16], with
// a per-layer scale s > 0 (fxp's MSQ sets it to the layer's max |w|) and a
// separate sign, so an n-bit weight costs n + 1 bits:
//   m       = |w| / s                                  (float64 division)
//   c_n     = min(round_half_even(2^n m), 2^n - 1)      the n-bit magnitude code
//   c_{n-1} = min(round_half_even(2^(n-1) m), 2^(n-1) - 1)
//   Q_n(w)  = sign(w) c_n s 2^-n
//   LSB(w)  = Q_n(w) - Q_{n-1}(w) = sign(w) (c_n - 2 c_{n-1}) s 2^-n
// Scaling by 2^n, not DoReFa's 2^n - 1, nests the grids: every (n-1)-bit
// value is the n-bit value 2 c_{n-1}, and the (n-1)-bit rounding boundaries,
// the odd multiples of 2^-n, are n-bit grid points. Hence c_n - 2 c_{n-1} is
// -1, 0 or 1 (whenever c_n clamps, c_{n-1} does too, and the LSB is 1), and
// LSB(w) = 0 exactly when dropping the bit leaves the weight unchanged:
// that is what MSQ's L1 penalty drives to zero and what its sparsity counts.
// So sum |LSB| = (number of non-zero LSBs) s 2^-n, exact and order-free.
// 2^n m is exact (a power of two); when s is a float32 value (as max |w| is)
// c_n s is exact in float64 too, so Q_n is rounded once, to w's dtype.
// At n = 1 the (n-1)-bit value is 0, so the LSB is the whole code.
// Gradients are straight through (Q_{n-1} held constant): dQ_n/dw = 1,
// dLSB/dw = 1, and d sum|LSB| / dw = sign(LSB(w)), which pulls a weight with
// a non-zero LSB toward its (n-1)-bit value. NaN stays NaN; +-inf clamps.
constexpr int kRoundClampMinBits = 1;
constexpr int kRoundClampMaxBits = 16;

struct RoundClampSpec {
  double scale;   // s
  double levels;  // 2^n
  double step;    // s 2^-n: the value of one n-bit code
  double code_max, lower_code_max;  // 2^n - 1, 2^(n-1) - 1
};

inline namespace FXP_ISA {

FXP_HOST_DEVICE RoundClampSpec make_round_clamp_spec(double scale, int bits) {
  RoundClampSpec s;
  s.scale = scale;
  s.levels = exp2_int<double>(bits);
  s.step = scale * exp2_int<double>(-bits);
  s.code_max = s.levels - 1;
  s.lower_code_max = s.levels / 2 - 1;
  return s;
}

// min(v, hi) that keeps a NaN (std::fmin would drop it).
FXP_HOST_DEVICE double clamp_above(double v, double hi) { return v > hi ? hi : v; }

struct RoundClampElement {
  double code;  // sign(w) c_n (NaN for NaN w)
  int lsb;      // c_n - 2 c_{n-1}, signed like w: -1, 0 or 1 (1 for NaN, which counts as non-zero)
};

FXP_HOST_DEVICE RoundClampElement round_clamp_element(double w, const RoundClampSpec& s) {
  const double m = fxp_abs(w) / s.scale;
  const double c = clamp_above(round_half_even(m * s.levels), s.code_max);
  const double lower = clamp_above(round_half_even(m * (s.levels / 2)), s.lower_code_max);
  RoundClampElement e;
  e.code = fxp_copysign(c, w);
  const int magnitude_lsb = c != c ? 1 : static_cast<int>(c - 2 * lower);
  e.lsb = w < 0 ? -magnitude_lsb : magnitude_lsb;
  return e;
}

// Q_n(w) as T (NaN stays w's NaN).
template <typename T>
FXP_HOST_DEVICE T round_clamp_value(T w, const RoundClampElement& e, const RoundClampSpec& s) {
  return nan_or(w, static_cast<double>(w), e.code * s.step);
}

// LSB(w) as T (NaN stays w's NaN).
template <typename T>
FXP_HOST_DEVICE T round_clamp_lsb_value(T w, const RoundClampElement& e, const RoundClampSpec& s) {
  return nan_or(w, static_cast<double>(w), e.lsb * s.step);
}

// sum |LSB| from the counts, as T: exact when the count times s 2^-n is.
template <typename T>
FXP_HOST_DEVICE T lsb_l1_from_counts(int64_t nonzero, int64_t nan, const RoundClampSpec& s) {
  return nan > 0 ? quiet_nan<T>() : static_cast<T>(static_cast<double>(nonzero) * s.step);
}

// The gradient of Q_n and of lambda sum |LSB| together: g_q + g_l1 sign(LSB(w)),
// rounded once in T (0 LSB: g_q itself).
template <typename T>
FXP_HOST_DEVICE T round_clamp_gradient(T g_q, T g_l1, int lsb) {
  return lsb == 0 ? g_q : (lsb > 0 ? g_q + g_l1 : g_q - g_l1);
}

}  // namespace FXP_ISA
}  // namespace fxp
