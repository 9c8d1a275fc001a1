// Philox4x32-10 for CPU loops: the vectorized generators (AVX2: 8 blocks per
// register, AVX-512: 16) and philox_chunk, which fills a buffer in element
// order with the widest one the translation unit is compiled for. Include it
// only from files compiled once per CPU capability (see CMakeLists.txt).
#pragma once

#include <cstdint>
#if defined(__AVX2__) || defined(__AVX512F__)
// GCC 12's AVX-512 intrinsics start from deliberately undefined registers
// (_mm512_undefined_epi32: `__m512i __Y = __Y;`), which -Wuninitialized and
// -Wmaybe-uninitialized report once they are inlined, notably under
// -fsanitize. The warnings are the header's, so they are silenced for its
// lines only (the pragma state is looked up at the warning's location).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "common/fxp_math.h"

#ifndef FXP_CPU_CAPABILITY
#error "philox_cpu.h belongs to the per-capability builds"
#endif

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

#if defined(__AVX2__)
// a * m for the eight 32-bit lanes of a (m holds the multiplier in every lane):
// the high and low 32-bit halves of each 64-bit product.
inline void mulhilo_x8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Note [Philox in interleaved groups]
// A Philox round is a chain: multiply (3-5 cycles), then shuffles and xors
// that the next round's multiply waits on. One group of eight blocks leaves
// the vector units idle most of each round, and the out-of-order window is
// too small to start the next group's chain while one group's ten rounds are
// in flight. So philox_x8_groups runs G independent groups of eight blocks
// round by round, their chains interleaved. On an AVX2 EPYC (Zen 3, a
// standalone loop) one group took 0.92 ns per 32-bit word, two 0.72 and four
// 0.62, near what the multiply and shuffle ports allow; four groups' state
// (16 vectors) spills a few registers, which costs less than idle ports. The
// blocks and their order in `out` do not depend on G. AVX-512 does the same
// with groups of sixteen blocks (philox_x16_groups): on an AVX-512 EPYC (a
// standalone loop, one thread, 2026-12-05) one group took 0.64 ns per word,
// two 0.52 and four 0.42, where the AVX2 build's four groups of eight take
// 0.48 on the same machine. (An AVX-512 build runs its 16-block loops first,
// so only its tail reaches the AVX2 ones.)

// Philox4x32-10 for the 8 * G blocks first_block .. first_block + 8G - 1, one
// block per lane, written in element order (block j's lanes at out[4j .. 4j+3]).
// Equal to philox4x32_10 in fxp_math.h; the C++ tests compare the two.
template <int G>
inline void philox_x8_groups(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* out) {
  __m256i c0[G], c1[G], c2[G], c3[G];
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = 0; g < G; ++g) {
    // Block indices as (lo, hi) words, carrying into hi where lo wraps (an
    // unsigned compare, done signed with the sign bits flipped).
    const uint64_t first = first_block + 8 * static_cast<uint64_t>(g);
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
    c2[g] = _mm256_add_epi32(base_lo, lanes);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(c2[g], sign));
    c3[g] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32))),
                             wrapped);  // wrapped lanes are -1
    c0[g] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    c1[g] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < G; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_x8(c0[g], m0, hi0, lo0);
      mulhilo_x8(c2[g], m1, hi1, lo1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), key0);
      c1[g] = lo1;
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), key1);
      c3[g] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int g = 0; g < G; ++g) {
    // 4 x 8 transpose: lanes (c0..c3) of block j become out[4j .. 4j+3].
    const __m256i t0 = _mm256_unpacklo_epi32(c0[g], c1[g]), t1 = _mm256_unpackhi_epi32(c0[g], c1[g]);
    const __m256i t2 = _mm256_unpacklo_epi32(c2[g], c3[g]), t3 = _mm256_unpackhi_epi32(c2[g], c3[g]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    auto* dst = reinterpret_cast<__m256i*>(out + 32 * g);
    _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
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

// Philox4x32-10 for the 16 * G blocks first_block .. first_block + 16G - 1,
// as philox_x8_groups, G groups of sixteen blocks interleaved round by round
// (Note [Philox in interleaved groups]).
template <int G>
inline void philox_x16_groups(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* out) {
  __m512i c0[G], c1[G], c2[G], c3[G];
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int g = 0; g < G; ++g) {
    // Block indices as (lo, hi) words, carrying into hi where lo wraps.
    const uint64_t first = first_block + 16 * static_cast<uint64_t>(g);
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
    c2[g] = _mm512_add_epi32(base_lo, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c2[g], base_lo);
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    c3[g] = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    c0[g] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    c1[g] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  }
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < G; ++g) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_x16(c0[g], m0, hi0, lo0);
      mulhilo_x16(c2[g], m1, hi1, lo1);
      c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], key0, 0x96);  // 0x96: a ^ b ^ c
      c1[g] = lo1;
      c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], key1, 0x96);
      c3[g] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int g = 0; g < G; ++g) {
    // Within each 128-bit lane k: u_j holds block 4k + j. Then a 4 x 4 transpose of lanes.
    const __m512i t0 = _mm512_unpacklo_epi32(c0[g], c1[g]), t1 = _mm512_unpackhi_epi32(c0[g], c1[g]);
    const __m512i t2 = _mm512_unpacklo_epi32(c2[g], c3[g]), t3 = _mm512_unpackhi_epi32(c2[g], c3[g]);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u2, u3, 0x44), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* dst = out + 64 * g;
    _mm512_storeu_si512(dst + 0, _mm512_shuffle_i32x4(v0, v2, 0x88));
    _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(v0, v2, 0xDD));
    _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(v1, v3, 0x88));
    _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(v1, v3, 0xDD));
  }
}
#endif

// Fills out[4j .. 4j+3] with the Philox block (seed, offset, first_block + j).
inline void philox_chunk(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,
                  uint32_t* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 64 <= nblocks; j += 64) philox_x16_groups<4>(seed, offset, first_block + j, out + 4 * j);
  for (; j + 16 <= nblocks; j += 16) philox_x16_groups<1>(seed, offset, first_block + j, out + 4 * j);
#endif
#if defined(__AVX2__)
  for (; j + 32 <= nblocks; j += 32) philox_x8_groups<4>(seed, offset, first_block + j, out + 4 * j);
  for (; j + 8 <= nblocks; j += 8) philox_x8_groups<1>(seed, offset, first_block + j, out + 4 * j);
#endif
  for (; j < nblocks; ++j) {
    const PhiloxBlock r = philox4x32_10(seed, offset, first_block + static_cast<uint64_t>(j));
    for (int l = 0; l < 4; ++l) out[4 * j + l] = r.lane[l];
  }
}

}  // namespace
}  // namespace fxp::kernels::FXP_CPU_CAPABILITY
