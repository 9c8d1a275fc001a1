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

#if defined(__AVX2__) && !defined(__AVX512F__)  // an AVX-512 build has its own (below)
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
// in its own layout (philox_x8_zmm_groups); each build's tail of fewer than
// eight blocks is scalar.

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
// Note [AVX-512 Philox in 64-bit lanes]
// The AVX-512 build keeps each Philox word in the low half of a 64-bit lane,
// eight blocks per register. _mm512_mul_epu32 reads only those low halves and
// returns the whole 64-bit product, whose low half is already the next
// round's c1 (c3) and whose high half one shift away from c0's (c2's)
// product term; the high halves left behind are never read. A round is then
// two multiplies, two shifts and two three-way xors per eight blocks, with no
// permutes: sixteen blocks per register in 32-bit lanes needed two
// _mm512_permutex2var_epi32 per multiply to split even and odd products. The
// block index is one 64-bit add, so the carry into its high word is free. On
// an AVX-512 EPYC (a standalone loop, one thread, 2026-12-06) four groups
// take 0.36-0.38 ns per word against 0.42-0.43 for four groups of sixteen in
// 32-bit lanes (two groups 0.46, six 0.38, twelve 0.76: spilled). The same
// layout gains nothing for AVX2 (0.53 ns per word either way), which keeps
// its 32-bit lanes.

// Philox4x32-10 for the 8 * G blocks first_block .. first_block + 8G - 1, as
// philox_x8_groups, G groups of eight blocks interleaved round by round
// (Note [Philox in interleaved groups]) in 64-bit lanes (Note [AVX-512
// Philox in 64-bit lanes]).
template <int G>
inline void philox_x8_zmm_groups(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* out) {
  __m512i c0[G], c1[G], c2[G], c3[G];
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int g = 0; g < G; ++g) {
    const uint64_t first = first_block + 8 * static_cast<uint64_t>(g);
    const __m512i block = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first)), iota);
    c2[g] = block;                         // the index's low word, in the low half
    c3[g] = _mm512_srli_epi64(block, 32);  // its high word
    c0[g] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    c1[g] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  }
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < G; ++g) {
      const __m512i p0 = _mm512_mul_epu32(c0[g], m0);
      const __m512i p1 = _mm512_mul_epu32(c2[g], m1);
      c0[g] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[g], key0, 0x96);  // 0x96: a ^ b ^ c
      c1[g] = p1;
      c2[g] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[g], key1, 0x96);
      c3[g] = p0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m512i first_half = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i second_half = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  for (int g = 0; g < G; ++g) {
    // Block j's words as two 64-bit lanes, (c0, c1) and (c2, c3), then interleaved into element order.
    const __m512i low = _mm512_mask_blend_epi32(0xAAAA, c0[g], _mm512_slli_epi64(c1[g], 32));
    const __m512i high = _mm512_mask_blend_epi32(0xAAAA, c2[g], _mm512_slli_epi64(c3[g], 32));
    uint32_t* dst = out + 32 * g;
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(low, first_half, high));
    _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi64(low, second_half, high));
  }
}
#endif

// Fills out[4j .. 4j+3] with the Philox block (seed, offset, first_block + j).
inline void philox_chunk(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,
                  uint32_t* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 32 <= nblocks; j += 32) philox_x8_zmm_groups<4>(seed, offset, first_block + j, out + 4 * j);
  for (; j + 8 <= nblocks; j += 8) philox_x8_zmm_groups<1>(seed, offset, first_block + j, out + 4 * j);
#elif defined(__AVX2__)
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
