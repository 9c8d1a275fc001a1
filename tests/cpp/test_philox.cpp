// Philox4x32-10: known-answer vectors and agreement with ATen's engine.
#include <ATen/core/PhiloxRNGEngine.h>
#include <gtest/gtest.h>

#include <random>

#include "common/fxp_math.h"
#include "quantize/quantize_kernel.h"

#include <iostream>
#include <string>
#include <vector>

namespace {

uint64_t join(uint32_t lo, uint32_t hi) { return (static_cast<uint64_t>(hi) << 32) | lo; }

// Random123's kat_vectors for philox4x32_10: counter words, key words, output.
TEST(Philox, KnownAnswerVectors) {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& k : kats) {
    const auto r = fxp::philox4x32_10(join(k.key[0], k.key[1]), join(k.ctr[0], k.ctr[1]),
                                      join(k.ctr[2], k.ctr[3]));
    for (int l = 0; l < 4; ++l) EXPECT_EQ(r.lane[l], k.out[l]) << "lane " << l;
  }
}

// Block (seed, offset, b) is at::Philox4_32(seed, subsequence=b, offset), lanes in order.
TEST(Philox, MatchesATenEngine) {
  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 1000; ++trial) {
    const uint64_t seed = rng(), offset = rng() >> (trial % 64), block = rng() >> (trial % 64);
    at::Philox4_32 engine(seed, block, offset);
    const auto r = fxp::philox4x32_10(seed, offset, block);
    for (int l = 0; l < 4; ++l) ASSERT_EQ(r.lane[l], engine()) << "trial " << trial << " lane " << l;
  }
}

// Note [Philox offsets from a generator]: at generator offset O an fxp op draws
// counter O / 4 of subsequence b (its element block) and reserves 4. The next
// torch op starts at offset O' = O + 4: thread t calls curand_init(seed, t, O'),
// whose k-th block is at::Philox4_32(seed, t, O' / 4 + k). Those never meet.
TEST(Philox, GeneratorDrawsNeverMeetTheNextTorchOp) {
  const uint64_t seed = 0x1234567890ABCDEFull;
  for (const uint64_t offset : {uint64_t{0}, uint64_t{4}, uint64_t{8}, uint64_t{4} * 12345, uint64_t{4} << 40}) {
    const uint64_t fxp_counter = fxp::philox_counter_from_generator(offset);
    const uint64_t next_offset = offset + fxp::kGeneratorIncrement;
    ASSERT_EQ(next_offset % 4, 0u);
    EXPECT_LT(fxp_counter, next_offset / 4) << "offset " << offset;  // every later counter is larger still
    for (uint64_t b = 0; b < 64; ++b) {
      const auto ours = fxp::philox4x32_10(seed, fxp_counter, b);
      at::Philox4_32 next_op(seed, /*subsequence=*/b, /*offset=*/next_offset / 4);
      bool all_equal = true;
      for (int l = 0; l < 4; ++l) all_equal = all_equal && ours.lane[l] == next_op();
      EXPECT_FALSE(all_equal) << "offset " << offset << " block " << b;
    }
  }
  // The convention it replaces, the generator's offset as the counter, drew
  // exactly what a later torch op at offset 4 O draws, thread for block.
  const uint64_t offset = 8;
  for (uint64_t b = 0; b < 4; ++b) {
    const auto old = fxp::philox4x32_10(seed, offset, b);
    at::Philox4_32 later(seed, b, (4 * offset) / 4);
    for (int l = 0; l < 4; ++l) EXPECT_EQ(old.lane[l], later());
  }
}

}  // namespace

namespace {

// Every CPU build's vectorized Philox equals the scalar definition, including
// block indices whose low word wraps (the carry into the high word) in the
// first and in a later interleaved group (Note [Philox in interleaved
// groups]), and runs that end in narrower groups and the scalar tail.
TEST(Philox, CpuBuildsMatchScalar) {
  // Wraps in the first group, in a later group of a four-group call (both
  // builds run groups of eight blocks: AVX2 in 32-bit lanes, AVX-512 in
  // 64-bit lanes), in a one-group call (from block 96), and exactly at a
  // group's first block.
  const uint64_t firsts[] = {0,
                             (uint64_t{1} << 33) - 3,
                             (uint64_t{1} << 32) - 21,
                             (uint64_t{1} << 32) - 37,
                             (uint64_t{1} << 32) - 53,
                             (uint64_t{1} << 32) - 71,
                             (uint64_t{1} << 32) - 100,
                             (uint64_t{1} << 32) - 16,
                             123456789};
  for (const std::string cap : {"default", "avx2", "avx512"}) {
    if (!fxp::kernels::cpu_capability_available(cap)) {
      std::cout << "[   INFO   ] " << cap << " not available on this CPU\n";
      continue;
    }
    for (const uint64_t first : firsts) {
      constexpr int64_t kBlocks = 3 * 32 + 3 * 8 + 5;  // four-group calls, one-group calls, the scalar tail
      std::vector<uint32_t> got(4 * kBlocks);
      fxp::kernels::philox_fill_cpu(cap, 0xDEADBEEFCAFEF00Dull, 99, first, kBlocks, got.data());
      for (int64_t j = 0; j < kBlocks; ++j) {
        const auto r = fxp::philox4x32_10(0xDEADBEEFCAFEF00Dull, 99, first + j);
        for (int l = 0; l < 4; ++l) {
          ASSERT_EQ(got[4 * j + l], r.lane[l]) << cap << " first " << first << " block " << j;
        }
      }
    }
  }
}

TEST(Philox, UnknownCapabilityIsAnError) {
  uint32_t out[4];
  EXPECT_THROW(fxp::kernels::philox_fill_cpu("sse9", 0, 0, 0, 1, out), c10::Error);
}

}  // namespace
