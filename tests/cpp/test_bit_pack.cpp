// Bit-packed codes through the C++ entry points (Note [Bit-packed codes]):
// exact round trips at every width, a hand-computed layout, the range check.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/ops.h"
#include "test_util.h"

namespace {

using fxp::testing::expect_error;

TEST(BitPack, RoundTripIsExactForEveryBits) {
  for (int64_t bits = 1; bits <= 16; ++bits) {
    for (const bool is_signed : {true, false}) {
      const int64_t lo = is_signed ? -(int64_t{1} << (bits - 1)) : 0;
      const int64_t hi = is_signed ? (int64_t{1} << (bits - 1)) - 1 : (int64_t{1} << bits) - 1;
      const torch::Tensor every = torch::arange(lo, hi + 1, torch::kLong);
      // Odd lengths leave the last byte partly unused at most widths.
      for (const torch::Tensor& codes : {every, every.flip(0).slice(0, 0, std::min<int64_t>(every.numel(), 13)),
                                         every.slice(0, 0, 1), torch::cat({every, every.slice(0, 1)})}) {
        const torch::Tensor packed = fxp::pack_bits(codes, bits, is_signed);
        ASSERT_EQ(packed.scalar_type(), torch::kByte);
        ASSERT_EQ(packed.numel(), (codes.numel() * bits + 7) / 8);
        const torch::Tensor out = fxp::unpack_bits(packed, bits, {codes.numel()}, is_signed);
        const auto expected = bits <= (is_signed ? 8 : 7) ? torch::kChar
                              : bits <= (is_signed ? 16 : 15) ? torch::kShort
                                                              : torch::kInt;
        EXPECT_EQ(out.scalar_type(), expected) << bits << (is_signed ? " signed" : " unsigned");
        EXPECT_TRUE(torch::equal(out.to(torch::kLong), codes)) << bits << (is_signed ? " signed" : " unsigned");
      }
    }
  }
}

// Note [Unpacking with whole-word loads]: every length from 1 to 80 codes
// puts the last group that may load 16 bytes at every position; under the
// sanitizers (scripts/sanitize.sh, in CI) a load past the packed tensor's
// bytes is an error.
TEST(BitPack, UnpacksEveryLengthWithinThePackedBytes) {
  torch::manual_seed(0);
  for (int64_t bits = 1; bits <= 16; ++bits) {
    for (const bool is_signed : {true, false}) {
      const int64_t lo = is_signed ? -(int64_t{1} << (bits - 1)) : 0;
      const int64_t hi = is_signed ? (int64_t{1} << (bits - 1)) - 1 : (int64_t{1} << bits) - 1;
      for (int64_t n = 1; n <= 80; ++n) {
        const torch::Tensor codes = torch::randint(lo, hi + 1, {n}, torch::kLong);
        const torch::Tensor packed = fxp::pack_bits(codes, bits, is_signed);
        const torch::Tensor out = fxp::unpack_bits(packed, bits, {n}, is_signed);
        ASSERT_TRUE(torch::equal(out.to(torch::kLong), codes)) << bits << " bits, n " << n;
      }
    }
  }
}

TEST(BitPack, HandComputedLayout) {
  // bits 3: 1 = 001, -1 = 111, 2 = 010, -4 = 100 (bit 0 first); stream bit j
  // is bit j % 8 of byte j / 8: byte 0 = 0b10111001, byte 1 = 0b00001000.
  const torch::Tensor packed = fxp::pack_bits(torch::tensor({1, -1, 2, -4}, torch::kInt), 3);
  const std::vector<uint8_t> bytes(packed.data_ptr<uint8_t>(), packed.data_ptr<uint8_t>() + packed.numel());
  EXPECT_EQ(bytes, (std::vector<uint8_t>{0xB9, 0x08}));
  const torch::Tensor codes = fxp::unpack_bits(packed, 3, {2, 2}, true, torch::kLong);
  EXPECT_TRUE(torch::equal(codes, torch::tensor({1, -1, 2, -4}, torch::kLong).reshape({2, 2})));
  // 12-bit unsigned: 0xABC | 0x123 << 12 = 0x123ABC, little-endian.
  const torch::Tensor wide = fxp::pack_bits(torch::tensor({0xABC, 0x123}, torch::kShort), 12, false);
  EXPECT_TRUE(torch::equal(wide, torch::tensor({0xBC, 0x3A, 0x12}, torch::kByte)));
}

TEST(BitPack, OutOfRangeCodesAreCountedAndShapesChecked) {
  expect_error([] { fxp::pack_bits(torch::tensor({4, -5, 3, -4, 100}, torch::kLong), 3); },
               "fxp::pack_bits: 3 codes lie outside [-4, 3], the range of 3-bit signed codes");
  expect_error([] { fxp::pack_bits(torch::zeros({2}, torch::kInt), 17); }, "bits must be in [1, 16], but got 17");
  expect_error([] { fxp::unpack_bits(torch::zeros({3}, torch::kByte), 3, {10}); },
               "10 codes of 3 bits (size [10]) take 4 bytes, but packed has 3");
  expect_error([] { fxp::unpack_bits(torch::zeros({1}, torch::kByte), 8, {1}, false, torch::kChar); },
               "dtype Char cannot hold every code of [0, 255]");
}

}  // namespace
