// The bit arithmetic of Note [Bit-packed codes] (bit_pack_kernel.h), shared
// by the CPU and CUDA kernels so that both give the same bytes.
#pragma once

#include <cstdint>

#include "common/fxp_math.h"

namespace fxp {

constexpr int kMinPackBits = 1;
constexpr int kMaxPackBits = 16;

inline namespace FXP_ISA {

// The bytes that n codes of `bits` bits take: ceil(n * bits / 8).
FXP_HOST_DEVICE int64_t packed_byte_count(int64_t n, int bits) { return (n * bits + 7) / 8; }

FXP_HOST_DEVICE int64_t min_code(int bits, bool is_signed) { return is_signed ? -(int64_t{1} << (bits - 1)) : 0; }

FXP_HOST_DEVICE int64_t max_code(int bits, bool is_signed) {
  return is_signed ? (int64_t{1} << (bits - 1)) - 1 : (int64_t{1} << bits) - 1;
}

FXP_HOST_DEVICE uint32_t code_mask(int bits) { return (uint32_t{1} << bits) - 1; }

// The low `bits` bits of the code's two's complement.
FXP_HOST_DEVICE uint32_t code_pattern(int64_t code, int bits) {
  return static_cast<uint32_t>(static_cast<uint64_t>(code)) & code_mask(bits);
}

// The code of a `bits`-bit pattern: sign-extended when is_signed.
FXP_HOST_DEVICE int32_t code_from_pattern(uint32_t pattern, int bits, bool is_signed) {
  if (!is_signed) return static_cast<int32_t>(pattern);
  const uint32_t sign = uint32_t{1} << (bits - 1);
  return static_cast<int32_t>(pattern ^ sign) - static_cast<int32_t>(sign);
}

}  // namespace FXP_ISA
}  // namespace fxp
