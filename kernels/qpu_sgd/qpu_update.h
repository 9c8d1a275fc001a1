// The quantized parameter update (QPU) of one element, shared by the CPU and
// CUDA kernels of the fused QPU step. See docs/design.md, "Methods".
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/fxp_math.h"

// Note [Inlining the QPU element]
// The CPU kernel instantiates the element loop for every storage and form; in
// so large a unit GCC stops inlining these helpers, and a call in the loop
// body stops it vectorizing (its memory effects are unknown). So they are
// always inlined (FXP_FORCE_INLINE), as CUDA's __forceinline__ does on the device.

namespace fxp {

// How a tensor of the QPU step stores its values: floating point, or packed codes.
enum class Storage : int8_t { Float32, Float64, Int8, Int16, Int32 };

enum class MomentumForm : int8_t { Standard, PaperEq6 };

struct QpuHyper {
  double lr;
  double momentum;      // mu; 0 means no momentum buffer
  double weight_decay;  // lambda (L2: g + lambda * w)
  bool nesterov;
};

// Integer codes of one format: the bounds a result saturates to. For float32
// storage the upper bound is the float32-safe one (Note [Saturation bound in float32]).
struct CodeBounds {
  int64_t min;
  int64_t max;
};

// The step's constants in its compute type T: the grads' dtype (float32 for
// float32 grads, whatever the storage; float64 for float64 grads).
template <typename T>
struct QpuConstants {
  T lr, momentum, weight_decay;
  T scale, inv_scale;                    // parameter format: 2^F, 2^-F
  T momentum_scale, momentum_inv_scale;  // momentum format: 2^Fm, 2^-Fm
  T delta_to_param;                      // 2^(F - Fm): a momentum code in parameter LSBs (paper_eq6)
  T param_limit, momentum_limit;         // 2^(B+1), 2^(Bm+1): Note [QPU code arithmetic]
  CodeBounds param, momentum_bounds;
};

// Note [QPU code arithmetic]
// The integer part of the update (codes, floors, their differences) is exact
// in any type that holds |x| <= 2^(B+3): float32 for B <= 21, float64 for
// every B <= 32, int64 always. Before splitting, t (and w 2^F, and the
// momentum's x 2^Fm) is clamped to +-2^(B+1) of its format: a parameter on
// the grid moved that far saturates whatever the clamp, so the clamp changes
// no result of QPU (whose parameters stay on the grid) while bounding every
// integer by 2^(B+3). So each kernel computes in the narrowest exact type
// (code type I: float32 when both formats have at most 21 bits, else int64
// for float32 compute, float64 for float64 compute), and every choice gives
// the same bits; the CPU builds are tested against each other and the
// reference. Vectorized, float32 codes take one 16-lane AVX-512 register
// where int64 takes two, with conversions between.
constexpr int kMaxBitsForFloatCodes = 21;

// t split exactly into its integer part trunc(t) (as code type I) and the
// rest, in (-1, 1) with t's sign; see split_exact. A NaN t has a NaN rest;
// callers test t itself. (No
// bool member: GCC keeps a struct with one in memory, byte by byte, and then
// cannot vectorize the CPU loop; a test on the fraction it threads through the
// clamps into selects it cannot vectorize either.)
template <typename T, typename I>
struct ExactSplit {
  I whole;
  T part;
};

// The result of one element, as codes of the two formats (code type I).
// The flags are int32 0/1, not bool: GCC keeps a struct of byte-sized
// members in memory, and then cannot vectorize the CPU loop.
template <typename I>
struct QpuElementResult {
  I param;               // new parameter code, saturated
  I momentum;            // new momentum code, saturated (when there is a buffer)
  int32_t param_nan;     // the new parameter is NaN (no code)
  int32_t momentum_nan;  // the new momentum is NaN (no code)
  int32_t saturated;     // the parameter's rounded code was clamped
  int32_t vanished;      // a nonzero update left the stored parameter unchanged
};

inline namespace FXP_ISA {

FXP_FORCE_INLINE bool is_packed(Storage s) { return s != Storage::Float32 && s != Storage::Float64; }

FXP_FORCE_INLINE CodeBounds code_bounds(int total_bits, Storage storage) {
  const int64_t half = int64_t{1} << (total_bits - 1);
  // Float32 storage above 25 bits: the largest float32 integer below 2^(B-1).
  const int64_t max = storage == Storage::Float32 && total_bits > 25 ? half - (int64_t{1} << (total_bits - 25))
                                                                      : half - 1;
  return CodeBounds{-half, max};
}

// An integer-valued float f (|f| <= 2^33) as code type I.
template <typename I, typename T>
FXP_FORCE_INLINE I to_code(T f) {
  if constexpr (std::is_floating_point_v<I>) {
    return static_cast<I>(f);
  } else {
#if defined(__CUDA_ARCH__) || defined(__AVX512DQ__)
    return static_cast<int64_t>(f);
#else
    // AVX2 has no float -> int64 conversion (GCC would not vectorize the loop),
    // so two exact int32 conversions: f = hi 2^20 + lo with lo in [0, 2^20).
    const T hi = round_floor(f * T(1.0 / 1048576.0));
    const T lo = f - hi * T(1048576.0);
    return static_cast<int64_t>(static_cast<int32_t>(hi)) * 1048576 + static_cast<int32_t>(lo);
#endif
  }
}

// 1 if the integer a is odd, else 0.
template <typename I>
FXP_FORCE_INLINE I odd(I a) {
  if constexpr (std::is_floating_point_v<I>) {
    return a - I(2) * round_floor(a * I(0.5));  // every step exact
  } else {
    return a & 1;
  }
}

// A saturated code (|code| <= 2^31, so it fits int32 on the way, which AVX2
// converts) as float type S: rounded once, to nearest even.
template <typename S, typename I>
FXP_FORCE_INLINE S code_to_float(I code) {
  if constexpr (std::is_floating_point_v<I>) {
    return static_cast<S>(code);
  } else {
    return static_cast<S>(static_cast<int32_t>(code));
  }
}

// t clamped to +-limit (Note [QPU code arithmetic]); a NaN passes both clamps.
template <typename T>
FXP_FORCE_INLINE T clamp_to_limit(T t, T limit) {
  const T c = t > limit ? limit : t;
  return c < -limit ? -limit : c;
}

// t = whole + part, both exact: whole = trunc(t), and part = t - trunc(t) is
// t itself when |t| < 1 and otherwise exact by Sterbenz (trunc(t) is within
// a factor 2 of t). (floor would not do: for t in (-1/2, 0), t - floor(t) =
// 1 + t loses t's low bits, so a tiny negative update could never round up.)
// t is clamped to +-limit first (+-Inf gives part 0). A NaN t gives a NaN
// part, and a whole that is 0 for integer I and NaN for float I; every caller
// flags a NaN t and stores no code computed from it.
template <typename I, typename T>
FXP_FORCE_INLINE ExactSplit<T, I> split_exact(T t, T limit) {
  const T c = clamp_to_limit(t, limit);
  const T f = round_trunc(c);
  if constexpr (std::is_floating_point_v<I>) {
    return ExactSplit<T, I>{f, c - f};
  } else {
    // Only the conversion sees a select (a NaN would be undefined there).
    return ExactSplit<T, I>{to_code<I>(t != t ? T(0) : f), c - f};
  }
}

// Note [QPU rounding on codes]
// With s = split(y) (y = x 2^Fm for a value x: the momentum, paper_eq6's
// delta; y = -t = -d 2^F for the parameter's w - d, on code(w)), the integer
// n = trunc(y) moves one step away from zero with probability |part| (SR), or
// when |part| > 1/2, a tie going to the even code (HTE):
//   value:      trunc(x 2^Fm) + sign(part) step
//   parameter:  code(w) - trunc(t) - sign(part) step
// Only integers and the exact part take part, so the result is the exact
// rounding of w - d (of x), with the probability of the step equal to |part|
// up to the 2^-32 resolution of u (uniform_below), however small d is against
// w and whatever its sign.
template <Rounding R, typename T, typename I>
FXP_FORCE_INLINE I rounding_step(T magnitude, I candidate, uint32_t random_bits) {
  if constexpr (R == Rounding::Stochastic) {
    return uniform_below(random_bits, magnitude) ? I(1) : I(0);
  } else {
    // Selects, not a bool from the parity: GCC vectorizes these. The two
    // neighbours differ by one, so the step is taken at a tie iff candidate
    // is odd.
    return magnitude > T(0.5) ? I(1) : magnitude == T(0.5) ? odd(candidate) : I(0);
  }
}

template <Rounding R, typename T, typename I>
FXP_FORCE_INLINE I round_value(const ExactSplit<T, I>& s, uint32_t random_bits) {
  const I step = rounding_step<R>(fxp_abs(s.part), s.whole, random_bits);
  return s.whole + (s.part < T(0) ? -step : step);
}

template <Rounding R, typename T, typename I>
FXP_FORCE_INLINE I round_difference(I base, const ExactSplit<T, I>& s, uint32_t random_bits) {
  const I a = base - s.whole;
  const I step = rounding_step<R>(fxp_abs(s.part), a, random_bits);
  return a - (s.part < T(0) ? -step : step);
}

// Note [Nearest-even QPU rounding on float codes]
// With float codes (I = T) round to nearest even needs no split: a value's
// code (the momentum, delta) is rint(x 2^Fm) itself, one instruction (the
// clamp to +-limit is left to saturate, whose bounds lie inside it, and rint
// is monotonic). The parameter's code is the nearest-even rounding of
// base - t (t clamped): with n = rint(t) and r = t - n (exact, |r| <= 1/2)
// it is a = base - n (an exact integer: Note [QPU code arithmetic]) unless r
// is a tie, where base - t = a - r lies halfway between a and a - 2r and the
// even one of the two is taken. Both equal Note [QPU rounding on codes]'s
// results bit for bit (the CPU builds and the reference are tested against
// each other), in about a third of the instructions.

// A value x (the momentum, delta) rounded to its code, before saturation.
template <Rounding R, typename I, typename T>
FXP_FORCE_INLINE I round_value_code(T x, T limit, uint32_t random_bits) {
  if constexpr (R == Rounding::NearestEven && std::is_floating_point_v<I>) {
    return round_half_even(x);
  } else {
    return round_value<R>(split_exact<I>(x, limit), random_bits);
  }
}

// The parameter's new code, before saturation: base - t rounded.
template <Rounding R, typename I, typename T>
FXP_FORCE_INLINE I round_difference_code(I base, T t, T limit, uint32_t random_bits) {
  if constexpr (R == Rounding::NearestEven && std::is_floating_point_v<I>) {
    const T c = clamp_to_limit(t, limit);
    const T n = round_half_even(c);
    const T r = c - n;
    const I a = base - n;
    return fxp_abs(r) == T(0.5) && odd(a) != I(0) ? a - (r + r) : a;
  } else {
    return round_difference<R>(base, split_exact<I>(t, limit), random_bits);
  }
}

// code clamped to the bounds; + 0 turns a float code's -0 into +0, as int64 has it.
template <typename I>
FXP_FORCE_INLINE I saturate(I code, const CodeBounds& b) {
  const I lo = static_cast<I>(b.min), hi = static_cast<I>(b.max);
  const I c = code > hi ? hi : code;
  return (c < lo ? lo : c) + I(0);
}

// Note [QPU update on codes]
// One element of the step, in the grads' float type T, every operation a
// separate IEEE operation (no contraction), so CPU and CUDA agree:
//   grad = g + lambda w
//   standard:  v' = mu v + grad;  d = nesterov ? grad + mu v' : v'
//              momentum code = round_value(split(v' 2^Fm))
//              t = (lr d) 2^F
//   paper_eq6: delta code = round_value(split(((mu v + grad) lr) 2^Fm))  (grad lr without momentum)
//              t = delta code * 2^(F - Fm)   (exact for momentum codes below 2^24 in float32)
//   parameter code = round_difference(code(w), split(t))  (Note [QPU rounding on codes])
// w enters as its value (for lambda w) and its code: a packed code, or for
// float storage split(w 2^F). Off the grid (QPU's parameters never are) the
// parameter's part is folded into t first (t - part(w 2^F), one rounding).
// Precondition: the parameter lies within its format's range, as QPU's
// parameters do (quantized at initialization, saturated at every step). A
// float parameter beyond it (or infinite) is clamped by Note [QPU code
// arithmetic] and its result is not the rounding of w - d.
// The only rounding before the fixed-point one is T's rounding of lr d (of
// delta), relative to the update, not to the weight.
template <Rounding R, MomentumForm Form, bool kMomentum, bool kNesterov, bool kFloatParam, typename T, typename I>
FXP_FORCE_INLINE QpuElementResult<I> qpu_update_element(T w, const ExactSplit<T, I> w_code, T g, T v,
                                                      const QpuConstants<T>& c, uint32_t param_bits,
                                                      uint32_t momentum_bits) {
  // Locals, built into the result at the end: a result struct assigned
  // field by field stays in memory and stops the CPU loop vectorizing.
  const T grad = g + c.weight_decay * w;
  T step;  // lr d (delta for paper_eq6): zero means no update
  T t;     // the update in parameter LSBs
  I momentum_code = I(0);
  bool momentum_nan = false;
  if constexpr (Form == MomentumForm::PaperEq6) {
    step = kMomentum ? (c.momentum * v + grad) * c.lr : grad * c.lr;
    const T x = step * c.momentum_scale;
    momentum_code = saturate(round_value_code<R, I>(x, c.momentum_limit, momentum_bits), c.momentum_bounds);
    momentum_nan = x != x;
    t = code_to_float<T>(momentum_code) * c.delta_to_param;  // a NaN delta is flagged below
  } else {
    T d = grad;
    if constexpr (kMomentum) {
      const T v_new = c.momentum * v + grad;
      d = kNesterov ? grad + c.momentum * v_new : v_new;
      const T x = v_new * c.momentum_scale;
      momentum_code = saturate(round_value_code<R, I>(x, c.momentum_limit, momentum_bits), c.momentum_bounds);
      momentum_nan = x != x;
    }
    step = c.lr * d;
    t = step * c.scale;
  }
  if constexpr (kFloatParam) t = t - w_code.part;
  const I code = round_difference_code<R>(w_code.whole, t, c.param_limit, param_bits);
  const I param = saturate(code, c.param);
  // A NaN w (float storage) has a NaN fraction, so t is NaN too.
  const bool param_nan = (t != t) | (Form == MomentumForm::PaperEq6 && momentum_nan);
  // Vanished: the stored parameter is unchanged (float storage compares values,
  // which also covers a parameter off the grid). Bitwise, not short-circuit:
  // branches would stop the CPU loop vectorizing.
  const bool unchanged = kFloatParam ? code_to_float<T>(param) * c.inv_scale == w : param == w_code.whole;
  const int32_t saturated = !param_nan & (param != code);
  const int32_t vanished = (step != T(0)) & !param_nan & unchanged;
  return QpuElementResult<I>{param, momentum_code, param_nan, momentum_nan, saturated, vanished};
}

}  // namespace FXP_ISA
}  // namespace fxp
