// CPU quantize kernel. This file is compiled once per CPU capability (see
// CMakeLists.txt: FXP_CPU_CAPABILITY is default_, avx2 or avx512);
// quantize_cpu_dispatch.cpp picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <atomic>

#include "fxp_math.h"
#include "quantize.h"

#ifndef FXP_CPU_CAPABILITY
#error "FXP_CPU_CAPABILITY must be defined by the build"
#endif

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

// Note [CPU chunking]
// at::parallel_for hands out chunks of kChunkElems elements (whole Philox
// blocks). Every element's bits depend only on its index, never on the chunk,
// the thread or the vector width, so results do not depend on the thread count
// or the CPU build.
constexpr int64_t kChunkBlocks = 512;
constexpr int64_t kChunkElems = kChunkBlocks * 4;

#if defined(__AVX2__)
// a * m for the eight 32-bit lanes of a (m holds the multiplier in every lane):
// the high and low 32-bit halves of each 64-bit product.
inline void mulhilo_x8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Philox4x32-10 for the eight blocks first_block .. first_block + 7, one block
// per lane, written in element order (block j's lanes at out[4j .. 4j+3]).
// Equal to philox4x32_10 in fxp_math.h; the C++ tests compare the two.
inline void philox_x8(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* out) {
  // Block indices first_block + j as (lo, hi) words, carrying into hi where lo wraps
  // (an unsigned compare, done signed with the sign bits flipped).
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block)));
  __m256i c2 = _mm256_add_epi32(base_lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c2, sign));
  __m256i c3 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block >> 32))),
                                wrapped);  // wrapped lanes are -1
  __m256i c0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo_x8(c0, m0, hi0, lo0);
    mulhilo_x8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // 4 x 8 transpose: lanes (c0..c3) of block j become out[4j .. 4j+3].
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  auto* dst = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
}
#endif

#if defined(__AVX512F__)
inline void mulhilo_x16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // products of lanes 0, 2, ..
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // products of lanes 1, 3, ..
  // Gather 32-bit halves from the two: index i < 16 picks even's word i, 16 + i odd's word i.
  const __m512i lo_index = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
  const __m512i hi_index = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
  lo = _mm512_permutex2var_epi32(even, lo_index, odd);
  hi = _mm512_permutex2var_epi32(even, hi_index, odd);
}

// As philox_x8, for sixteen blocks.
inline void philox_x16(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* out) {
  // Block indices first_block + j as (lo, hi) words, carrying into hi where lo wraps.
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block)));
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i c2 = _mm512_add_epi32(base_lo, iota);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c2, base_lo);
  const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block >> 32)));
  __m512i c3 = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
  __m512i c0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo_x16(c0, m0, hi0, lo0);
    mulhilo_x16(c2, m1, hi1, lo1);
    // 0x96: a ^ b ^ c
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
    c1 = lo1;
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Within each 128-bit lane k: u_j holds block 4k + j. Then a 4 x 4 transpose of lanes.
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
  const __m512i v2 = _mm512_shuffle_i32x4(u2, u3, 0x44), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(v0, v2, 0x88));
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(v0, v2, 0xDD));
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(v1, v3, 0x88));
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(v1, v3, 0xDD));
}
#endif

void philox_chunk(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,
                  uint32_t* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= nblocks; j += 16) philox_x16(seed, offset, first_block + j, out + 4 * j);
#endif
#if defined(__AVX2__)
  for (; j + 8 <= nblocks; j += 8) philox_x8(seed, offset, first_block + j, out + 4 * j);
#endif
  for (; j < nblocks; ++j) {
    const PhiloxBlock r = philox4x32_10(seed, offset, first_block + static_cast<uint64_t>(j));
    for (int l = 0; l < 4; ++l) out[4 * j + l] = r.lane[l];
  }
}

// What the element loop records besides the output. Without statistics the
// saturation test compiles away.
enum class Stats { kNone, kCount, kMaskAndCount };

// The element loop over n elements; random_bits[i] is element i's draw (SR only).
template <typename scalar_t, Rounding R, Overflow O, Stats S>
int32_t quantize_span(const scalar_t* xs, scalar_t* ys, bool* saturated, int64_t n,
                      const FxpSpec<at::opmath_type<scalar_t>>& spec, const uint32_t* random_bits) {
  using opmath_t = at::opmath_type<scalar_t>;
  int32_t count = 0;  // n <= kChunkElems; int32 keeps the vector loop narrow
  // ys may be xs (in-place); any other overlap is rejected by the op. Element i
  // reads xs[i] before writing ys[i], so there is no loop-carried dependence.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    bool sat;
    const uint32_t bits = R == Rounding::Stochastic ? random_bits[i] : 0u;
    const opmath_t v = quantize_value<R, O>(static_cast<opmath_t>(xs[i]), spec, bits, &sat);
    ys[i] = static_cast<scalar_t>(v);
    if constexpr (S == Stats::kMaskAndCount) saturated[i] = sat;
    if constexpr (S != Stats::kNone) count += sat;
  }
  return count;
}

// Note [Interleaving Philox with the element loop]
// SR generates the draws for a short span (kSpanElems elements, L1-resident)
// and consumes them at once, so Philox's arithmetic overlaps the streaming
// loads and stores instead of leaving the memory system idle in between.
constexpr int64_t kSpanElems = 256;

template <typename scalar_t, Rounding R, Overflow O, Stats S>
int64_t quantize_chunk(const scalar_t* x, scalar_t* y, bool* saturated, int64_t begin,
                       int64_t end, const FxpSpec<at::opmath_type<scalar_t>>& spec, uint64_t seed,
                       uint64_t offset) {
  constexpr bool kWriteMask = S == Stats::kMaskAndCount;
  bool* sat = kWriteMask ? saturated + begin : nullptr;
  if constexpr (R != Rounding::Stochastic) {
    return quantize_span<scalar_t, R, O, S>(x + begin, y + begin, sat, end - begin, spec,
                                                     nullptr);
  } else {
    alignas(64) uint32_t random_bits[kSpanElems];
    int64_t count = 0;
    for (int64_t s = begin; s < end; s += kSpanElems) {  // begin is a multiple of 4
      const int64_t n = std::min(kSpanElems, end - s);
      philox_chunk(seed, offset, static_cast<uint64_t>(s / 4), (n + 3) / 4, random_bits);
      count += quantize_span<scalar_t, R, O, S>(x + s, y + s, kWriteMask ? sat + (s - begin) : nullptr,
                                                         n, spec, random_bits);
    }
    return count;
  }
}

template <typename scalar_t, Rounding R, Overflow O, Stats S>
int64_t quantize_typed(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                       const CpuQuantizeRequest& request) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto spec = make_fxp_spec<opmath_t>(params.total_bits, params.frac_bits);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  const int64_t n = x.numel();
  const int64_t nchunks = (n + kChunkElems - 1) / kChunkElems;
  std::atomic<int64_t> total{0};
  // 16 chunks (32K elements) per task keeps scheduling overhead small.
  at::parallel_for(0, nchunks, 16, [&](int64_t cbegin, int64_t cend) {
    int64_t local = 0;
    for (int64_t c = cbegin; c < cend; ++c) {
      const int64_t b = c * kChunkElems, e = std::min(n, b + kChunkElems);
      local += quantize_chunk<scalar_t, R, O, S>(xp, yp, request.saturated, b, e, spec, request.seed,
                                                 request.offset);
    }
    total.fetch_add(local, std::memory_order_relaxed);
  });
  return total.load();
}

template <Rounding R, Overflow O, Stats S>
int64_t quantize_dispatch_dtype(const at::Tensor& x, const at::Tensor& out,
                                const QuantizeParams& params, const CpuQuantizeRequest& request) {
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_quantize_cpu", [&] {
    count = quantize_typed<scalar_t, R, O, S>(x, out, params, request);
  });
  return count;
}

template <Rounding R, Overflow O>
int64_t quantize_dispatch_stats(const at::Tensor& x, const at::Tensor& out,
                                const QuantizeParams& params, const CpuQuantizeRequest& request) {
  if (request.saturated != nullptr) {
    return quantize_dispatch_dtype<R, O, Stats::kMaskAndCount>(x, out, params, request);
  }
  return request.count ? quantize_dispatch_dtype<R, O, Stats::kCount>(x, out, params, request)
                       : quantize_dispatch_dtype<R, O, Stats::kNone>(x, out, params, request);
}

template <Rounding R>
int64_t quantize_dispatch_overflow(const at::Tensor& x, const at::Tensor& out,
                                   const QuantizeParams& params, const CpuQuantizeRequest& request) {
  return params.overflow == Overflow::Wrap
             ? quantize_dispatch_stats<R, Overflow::Wrap>(x, out, params, request)
             : quantize_dispatch_stats<R, Overflow::Saturate>(x, out, params, request);
}

}  // namespace

void philox_fill(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,
                 uint32_t* out) {
  philox_chunk(seed, offset, first_block, nblocks, out);
}

int64_t quantize_cpu_impl(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                          const CpuQuantizeRequest& request) {
  switch (params.rounding) {
    case Rounding::NearestEven:
      return quantize_dispatch_overflow<Rounding::NearestEven>(x, out, params, request);
    case Rounding::Stochastic:
      return quantize_dispatch_overflow<Rounding::Stochastic>(x, out, params, request);
    case Rounding::Floor:
      return quantize_dispatch_overflow<Rounding::Floor>(x, out, params, request);
    case Rounding::NearestAway:
      return quantize_dispatch_overflow<Rounding::NearestAway>(x, out, params, request);
  }
  return 0;
}

}  // namespace fxp::kernels::FXP_CPU_CAPABILITY
