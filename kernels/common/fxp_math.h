// Fixed-point arithmetic and Philox4x32-10, shared by the CPU and CUDA kernels.
//
// Everything here is a pure function of its arguments so that the CPU and the
// CUDA build produce the same bits. No ATen, no registration, no autograd.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FXP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FXP_HOST_DEVICE inline
#endif

// Always inlined on the host too, as FXP_HOST_DEVICE is on the device: for
// helpers in element loops of large units, where GCC stops inlining and a call
// stops the loop vectorizing (Note [Inlining the QPU element]).
#if defined(__CUDACC__)
#define FXP_FORCE_INLINE FXP_HOST_DEVICE
#else
#define FXP_FORCE_INLINE inline __attribute__((always_inline))
#endif

// Note [One copy of the math per instruction set]
// The CPU kernels are compiled once per capability (baseline, AVX2, AVX-512;
// see CMakeLists.txt) and the CUDA sources once more by nvcc. An inline
// function with external linkage gets one weak copy per object, and the linker
// keeps one of them for every caller: an AVX-512 copy could then run on a
// baseline CPU (SIGILL), or a baseline copy slow down the AVX builds. So the
// functions below live in an inline namespace named after the build, as ATen
// does with CPU_CAPABILITY: callers still write fxp::f, and each build links
// its own copy. Types and constants stay in fxp, because the builds share them.
// tests/python/test_cpu_builds.py inspects the objects' symbols.
#define FXP_ISA_PASTE(a, b) a##b
#define FXP_ISA_NAME(a, b) FXP_ISA_PASTE(a, b)
#if defined(__CUDACC__)
#define FXP_ISA isa_cuda
#elif defined(FXP_CPU_CAPABILITY)
#define FXP_ISA FXP_ISA_NAME(isa_, FXP_CPU_CAPABILITY)
#else
#define FXP_ISA isa_generic
#endif

namespace fxp {

constexpr int kMinTotalBits = 2;
constexpr int kMaxTotalBits = 32;

enum class Rounding : int8_t { NearestEven, Stochastic, Floor, NearestAway };
enum class Overflow : int8_t { Saturate, Wrap };

struct PhiloxBlock {
  uint32_t lane[4];
};

// The fixed-point format, prepared for compute type T (float or double).
template <typename T>
struct FxpSpec {
  T scale;      // 2^F
  T inv_scale;  // 2^-F
  T code_min;   // -2^(B-1)
  T code_max;   // largest T <= 2^(B-1)-1; see Note [Saturation bound in float32]
  int total_bits;
};

// Note [Philox offsets from a generator]
// ATen's random kernels read a generator's offset O as Philox counter O / 4:
// thread t calls curand_init(seed, t, O), which skips O / 4 counter values of
// subsequence t, and each kernel reserves an increment that is a multiple of 4
// and covers the counters it uses. fxp's draws from a generator follow the
// same convention: counter O / 4, with the element block as the subsequence,
// and an increment of 4 (one counter value). The next torch op then starts at
// counter O / 4 + 1 or later, so the two never draw the same numbers. (Using O
// itself as the counter would collide with a later torch op at offset 4 O.)
// The explicit (seed, offset) ops use their offset as the counter.
constexpr uint64_t kGeneratorIncrement = 4;

}  // namespace fxp

namespace fxp {
inline namespace FXP_ISA {

FXP_HOST_DEVICE uint64_t philox_counter_from_generator(uint64_t generator_offset) { return generator_offset / 4; }

// ---------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), the same generator as
// at::Philox4_32 and curand's Philox. Key = seed, counter = (offset, block).
// ---------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

FXP_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                  uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Counter words: (offset lo, offset hi, block lo, block hi); key words: (seed lo, seed hi).
// This is exactly at::Philox4_32(seed, /*subsequence=*/block, /*offset=*/offset).
FXP_HOST_DEVICE PhiloxBlock philox4x32_10(uint64_t seed, uint64_t offset, uint64_t block) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = static_cast<uint32_t>(block), c3 = static_cast<uint32_t>(block >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds - 1; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  philox_round(c0, c1, c2, c3, k0, k1);
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// ---------------------------------------------------------------------------
// Exact integer rounding of a float or double, without libm calls, so the
// host loops vectorize on any x86-64 and the device gets the same bits.
// ---------------------------------------------------------------------------
template <typename T>
struct FloatTraits;
template <>
struct FloatTraits<float> {
  static constexpr float kIntegralFrom = 8388608.0f;  // 2^23: every float at or above is an integer
};
template <>
struct FloatTraits<double> {
  static constexpr double kIntegralFrom = 4503599627370496.0;  // 2^52
};

FXP_HOST_DEVICE float fxp_abs(float v) { return std::fabs(v); }
FXP_HOST_DEVICE double fxp_abs(double v) { return std::fabs(v); }
FXP_HOST_DEVICE float fxp_copysign(float m, float s) { return std::copysign(m, s); }
FXP_HOST_DEVICE double fxp_copysign(double m, double s) { return std::copysign(m, s); }

// Note [Round half to even without rint]
// Where the target has a rounding instruction (CUDA, x86 with SSE4.1) it is
// used. Otherwise: for 0 <= a < 2^23 (float) the sum a + 2^23 has no fractional bits, so the
// addition itself rounds a to the nearest integer, ties to even, under the
// default IEEE mode; subtracting 2^23 again is exact. Larger magnitudes are
// already integers. This must not be compiled with -ffast-math (it would
// cancel the two operations); the build sets -ffp-contract=off as well.
template <typename T>
FXP_HOST_DEVICE T round_half_even(T t) {
#if defined(__CUDA_ARCH__) || defined(__SSE4_1__)
  return std::rint(t);  // one instruction (roundps); default rounding mode is nearest-even
#else
  const T kBig = FloatTraits<T>::kIntegralFrom;
  const T a = fxp_abs(t);
  const T r = (a + kBig) - kBig;
  return fxp_copysign(a < kBig ? r : a, t);
#endif
}

template <typename T>
FXP_HOST_DEVICE T round_floor(T t) {
#if defined(__CUDA_ARCH__) || defined(__SSE4_1__)
  return std::floor(t);
#else
  const T r = round_half_even(t);
  return r > t ? r - T(1) : r;  // r - 1 is exact: r is an integer below 2^24 (2^53) here
#endif
}

// The integer part of t, toward zero, keeping t's sign (trunc(-0.5) = -0).
template <typename T>
FXP_HOST_DEVICE T round_trunc(T t) {
#if defined(__CUDA_ARCH__) || defined(__SSE4_1__)
  return std::trunc(t);  // one instruction (roundps with the truncating mode)
#else
  return fxp_copysign(round_floor(fxp_abs(t)), t);
#endif
}

// 2^e for |e| <= 62, exact in float and double.
template <typename T>
FXP_HOST_DEVICE T exp2_int(int e) {
  T v = T(1);
  const T f = e >= 0 ? T(2) : T(0.5);
  for (int i = 0, n = e >= 0 ? e : -e; i < n; ++i) v *= f;
  return v;
}

// ---------------------------------------------------------------------------
// The fixed-point format (FxpSpec, above) for compute type T.
// ---------------------------------------------------------------------------
// Note [Saturation bound in float32]
// For B > 25, 2^(B-1)-1 has more significant bits than a float32 holds, so the
// largest float32 code that fits the format is 2^(B-1) - 2^(B-25). Saturating
// there keeps every float32 output exactly on the grid. float64 is always exact.
template <typename T>
FXP_HOST_DEVICE FxpSpec<T> make_fxp_spec(int total_bits, int frac_bits) {
  FxpSpec<T> s;
  s.scale = exp2_int<T>(frac_bits);
  s.inv_scale = exp2_int<T>(-frac_bits);
  const T half_range = exp2_int<T>(total_bits - 1);
  s.code_min = -half_range;
  constexpr int kDigits = sizeof(T) == 4 ? 24 : 53;
  s.code_max = total_bits - 1 <= kDigits ? half_range - T(1)
                                         : half_range - exp2_int<T>(total_bits - 1 - kDigits);
  s.total_bits = total_bits;
  return s;
}

// Uniform draw u = r * 2^-32 against the fraction p in [0, 1): returns [u < p],
// that is r < p * 2^32, decided exactly. So P(round up) = ceil(p * 2^32) / 2^32
// and the bias is below 2^-32.
FXP_HOST_DEVICE bool uniform_below(uint32_t r, double p) {
  return static_cast<double>(r) < p * 4294967296.0;  // both sides exact in double
}

// Note [Exact uniform comparison in float32]
// The same predicate without leaving float32, so it vectorizes 8 wide:
// split r = rh * 2^8 + rl (both exact in float32) and p * 2^24 = ph + pl / 2^8
// with ph = floor(p * 2^24) and pl in [0, 256); every step is exact. Then
// r < p * 2^32  <=>  rh < ph, or rh == ph and rl < pl.
FXP_HOST_DEVICE bool uniform_below(uint32_t r, float p) {
  const float scaled = p * 16777216.0f;  // p * 2^24
  const float ph = round_floor(scaled);
  const float pl = (scaled - ph) * 256.0f;
  const float rh = static_cast<float>(static_cast<int32_t>(r >> 8));
  const float rl = static_cast<float>(static_cast<int32_t>(r & 0xFFu));
  // Bitwise: every operand is computed, so no float operation is conditional
  // (GCC will not if-convert one that may trap, and then cannot vectorize the loop).
  return (rh < ph) | ((rh == ph) & (rl < pl));
}

// The integer (as a T) that t = x * 2^F rounds to, before range handling.
template <Rounding R, typename T>
FXP_HOST_DEVICE T round_to_code(T t, uint32_t random_bits) {
  if constexpr (R == Rounding::NearestEven) {
    return round_half_even(t);
  } else if constexpr (R == Rounding::Floor) {
    return round_floor(t);
  } else if constexpr (R == Rounding::NearestAway) {
    const T a = fxp_abs(t);
    const T f = round_floor(a);
    return fxp_copysign((a - f) >= T(0.5) ? f + T(1) : f, t);
  } else {
    // Note [Exact stochastic rounding]
    // f = floor(t) and p = t - f are exact (t and f share the binade or p = 0),
    // so q = f + [u < p] has E[q] = t up to the 2^-32 resolution of u, for any
    // magnitude of t. Adding noise to x in floating point first would drop
    // the low bits of p once |t| is large, which biases the result.
    const T f = round_floor(t);
    const T p = t - f;
    return uniform_below(random_bits, p) ? f + T(1) : f;
  }
}

// Note [Wrap without fmod]
// The two's-complement wrap of an integer q into B bits, for any magnitude:
// low = q - rint(q * 2^-B) * 2^B lies in [-2^(B-1), 2^(B-1)] and differs from
// q by a multiple of 2^B; low = 2^(B-1) then steps to -2^(B-1). Every step is
// exact: q * 2^-B scales by a power of two; rint of it times 2^B is a
// multiple of 2^B within 2^(B-1) of q (or q itself once q * 2^-B is an
// integer, so nothing overflows); and low is q's own bits below 2^B (a
// multiple of q's ulp, of at most 2^(B-1) in magnitude), which the type
// holds. A q in the range gives rint 0 and low = q. It is a few multiplies
// and selects, so loops that wrap vectorize (std::fmod did not).
// half_range is 2^(B-1).
template <typename T>
FXP_HOST_DEVICE T wrap_code(T q, T half_range) {
  const T modulus = T(2) * half_range;
  const T low = q - round_half_even(q * (T(0.5) / half_range)) * modulus;
  return low >= half_range ? low - modulus : low;
}

// The integer code (as a T) that x quantizes to: rounded, then clamped or
// wrapped into [code_min, code_max]. Sets *saturated when the rounded code fell
// outside that range (it was clamped, or wrapped). NaN stays NaN and is never
// saturated; +-Inf saturates in both overflow modes.
template <Rounding R, Overflow O, typename T>
FXP_HOST_DEVICE T quantize_code(T x, const FxpSpec<T>& spec, uint32_t random_bits, bool* saturated) {
  const T q = round_to_code<R>(x * spec.scale, random_bits);
  const bool above = q > spec.code_max;
  const bool below = q < spec.code_min;
  *saturated = above || below;
  // Written as x86's min/max select, so the compiler emits one instruction
  // each; a NaN q falls through both.
  T c = spec.code_max < q ? spec.code_max : q;
  c = spec.code_min > c ? spec.code_min : c;
  if constexpr (O == Overflow::Wrap) {
    // Note [Wrapping beyond the float range]: a finite x whose x 2^F overflows
    // to infinity (|x| >= 2^(128 - F) in float32) is an integer multiple of its
    // ulp, at least 2^74 there, so of 2^B: its code wraps to 0. Only an
    // infinite x saturates.
    // Selects, not a branch, so the loop vectorizes (Note [Wrap without fmod]).
    const T wrapped = fxp_abs(q) == T(INFINITY) ? T(0) : wrap_code(q, -spec.code_min);
    c = ((above | below) & (fxp_abs(x) != T(INFINITY))) ? wrapped : c;
  }
  return c;
}

// Quantize one value: x rounded onto the grid of spec (see quantize_code).
template <Rounding R, Overflow O, typename T>
FXP_HOST_DEVICE T quantize_value(T x, const FxpSpec<T>& spec, uint32_t random_bits, bool* saturated) {
  return quantize_code<R, O>(x, spec, random_bits, saturated) * spec.inv_scale;
}

// Note [NaN keeps its bits]
// Arithmetic on a NaN gives the input's payload on x86 but the canonical NaN
// on CUDA (0x7FFFFFFF), and float16/bfloat16 conversions change it again. So
// a NaN input is not computed with: the kernels store the input element itself,
// selected by this test on its compute-type value v (exact: a conversion to
// float32 or float64 keeps NaN a NaN). Every backend then returns the input's bits.
template <typename S, typename T>
FXP_HOST_DEVICE S nan_or(S input, T v, T result) {
  return v != v ? input : static_cast<S>(result);
}

// The NaN a computed result is stored as (the QPU step on float storage): the
// default quiet NaN, written as bits, not computed, so CPU and CUDA agree.
template <typename T>
FXP_HOST_DEVICE T quiet_nan() {
  if constexpr (sizeof(T) == 4) {
    const uint32_t bits = 0x7FC00000u;
    T v;
    memcpy(&v, &bits, sizeof v);
    return v;
  } else {
    const uint64_t bits = 0x7FF8000000000000ull;
    T v;
    memcpy(&v, &bits, sizeof v);
    return v;
  }
}

// A float64 result stored as float type T: rounded to nearest even, and a NaN as quiet_nan.
template <typename T>
FXP_HOST_DEVICE T to_float_storage(double v) {
  return v != v ? quiet_nan<T>() : static_cast<T>(v);
}

// Note [Rounding once to float16 and bfloat16]
// c10::Half and c10::BFloat16 convert from float32, so code -> float -> half
// rounds twice, and the two roundings can pick a neighbour the exact value
// is not nearest to (code 2^30 + 2^19 + 1 at F = 30 would become 1.0, not
// 1 + 2^-10). Rounding to float32 *to odd* first (truncate, then set the last
// bit if anything was dropped) keeps the information the second rounding
// needs, because float32 has more than two bits beyond either target's 11 or 8
// (the standard round-to-odd argument). So round_to_odd_float(q) * 2^-F
// converted to half or bfloat16 equals q * 2^-F rounded once, to nearest even.
FXP_HOST_DEVICE float round_to_odd_float(int64_t v) {  // |v| <= 2^31
  float f = static_cast<float>(v);  // nearest even
  const int64_t back = static_cast<int64_t>(f);
  if (back == v) return f;
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if (v > 0 ? back > v : back < v) bits -= 1;  // toward zero: the magnitude bits are nonzero
  bits |= 1u;                                  // inexact: odd
  memcpy(&f, &bits, sizeof f);
  return f;
}

// ---------------------------------------------------------------------------
// Packed storage: a tensor of integer codes q, value q * 2^-F.
// ---------------------------------------------------------------------------
// Bits of the integer type that holds the codes of a B-bit format: int8 for
// B <= 8, int16 for B <= 16, int32 otherwise.
FXP_HOST_DEVICE int packed_storage_bits(int total_bits) {
  return total_bits <= 8 ? 8 : total_bits <= 16 ? 16 : 32;
}

// Note [Codes in float32]
// pack and unpack compute a float32, float16 or bfloat16 tensor's codes in
// float32 and integers, and a float64 tensor's in float64: both exact, so
// the codes are those of exact arithmetic. (They used float64 for all, which
// runs at 1/32 to 1/64 of the float32 rate on consumer GPUs.) For pack:
// quantize_code is exact in either type (x * 2^F scales by a power of two,
// Note [Exact stochastic rounding], Note [Wrapping beyond the float range]);
// only its top bound, 2^(B-1) - 1, has more digits than float32 holds for
// B > 25 (Note [Saturation bound in float32], which keeps float *values* on
// the grid). So pack rounds with the top at 2^(B-1), a power of two
// (make_code_spec), and steps a code there down to 2^(B-1) - 1 in integers.
// For unpack, q * 2^-F rounded once to float32 is float32(q) * 2^-F (a power
// of two scales without rounding, and the result, at least 2^-31 in
// magnitude or 0, is normal); to float16 and bfloat16 it goes through
// float32 rounded to odd, from the integer q (Note [Rounding once to float16
// and bfloat16]).
template <typename S>
using code_compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// The spec pack rounds with (Note [Codes in float32]): the range's top is
// 2^(B-1) itself, exact in any float type, which pack_code steps down to
// 2^(B-1) - 1 in integers.
template <typename T>
FXP_HOST_DEVICE FxpSpec<T> make_code_spec(int total_bits, int frac_bits) {
  FxpSpec<T> s = make_fxp_spec<T>(total_bits, frac_bits);
  s.code_max = -s.code_min;
  return s;
}

// The code (an integer in [-2^(B-1), 2^(B-1) - 1]) that x packs to:
// quantize_code under make_code_spec's spec, then the top step in integers.
// *saturated: the rounded code fell outside the format; *off_grid: x was not
// on the grid. A NaN x gets code 0 (the caller counts it).
template <Rounding R, Overflow O, typename T>
FXP_HOST_DEVICE int64_t pack_code(T x, const FxpSpec<T>& code_spec, uint32_t random_bits, bool* saturated,
                                  bool* off_grid) {
  bool clamped;
  T c = quantize_code<R, O>(x, code_spec, random_bits, &clamped);
  const bool top = c == code_spec.code_max;  // 2^(B-1): clamped to it, or rounded to it
  *saturated = clamped | top;
  *off_grid = c * code_spec.inv_scale != x;  // exact: c has at most the type's digits
  c = c == c ? c : T(0);
  if (O == Overflow::Wrap && top && !clamped) return -static_cast<int64_t>(c);  // 2^(B-1) wraps to -2^(B-1)
  return static_cast<int64_t>(c) - static_cast<int64_t>(top);
}

// A code's value q * 2^-F as S, rounded once to nearest even (Note [Codes in
// float32]); inv_scale is 2^-F in code_compute_t<S>. C is the codes' own
// integer type: converting from it gives what converting from int64_t would
// (the same integer), and it vectorizes, where int64 -> float has no AVX2
// instruction and is a slow one on GPUs.
template <typename S, typename C>
FXP_HOST_DEVICE S unpack_code(C code, code_compute_t<S> inv_scale) {
  static_assert(std::is_integral_v<C>, "codes are integers");
  if constexpr (sizeof(S) >= 4 || sizeof(C) <= 2) {  // int8 and int16 codes convert to float32 exactly
    return static_cast<S>(static_cast<code_compute_t<S>>(code) * inv_scale);
  } else {
    return static_cast<S>(round_to_odd_float(code) * inv_scale);
  }
}

}  // namespace FXP_ISA
}  // namespace fxp
