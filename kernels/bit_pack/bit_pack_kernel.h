// Bit-packed storage of integer codes (fxp::pack_bits, fxp::unpack_bits):
// compute only. csrc/ops/bit_pack validates the arguments and registers the ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "bit_pack/bit_pack_math.h"

namespace fxp::kernels {

// Note [Bit-packed codes]
// n codes of `bits` bits each (1 to 16) are stored as ceil(n * bits / 8)
// bytes (uint8) of one little-endian bit stream: stream bit j is bit j % 8 of
// byte j / 8, and bit t (t = 0: least significant) of code i's pattern is
// stream bit i * bits + t. The pattern is the code's `bits`-bit two's
// complement when is_signed (codes in [-2^(bits-1), 2^(bits-1) - 1]), else its
// unsigned binary (codes in [0, 2^bits - 1]). The last byte's unused high bits
// are 0, so equal codes always give equal bytes. Example, bits 3, codes
// [1, -1, 2]: patterns 001, 111, 010, stream bits (j = 0 first)
// 100 111 010, byte 0 = 0b10111001 = 0xB9, byte 1 = 0b00000000 = 0x00.
// Unpacking sign-extends the patterns when is_signed. Every 8 codes fill
// exactly `bits` bytes, so the CPU kernels split the work at such groups and
// no two threads ever write one byte; the CUDA kernels compute each byte
// (pack) or each code (unpack) from what overlaps it. Both are deterministic
// and give the same bytes.

// packed (uint8, contiguous, packed_byte_count(codes.numel(), bits) bytes) =
// the codes (contiguous, an integer dtype), as the note says. With
// count_outside, returns the number of codes outside [min_code, max_code]
// (their low bits are still written), which CUDA reads back (a sync); without
// it, returns 0 and nothing is read back or counted (codes that fxp's own ops
// made are in range by construction; on CPU the count is a second pass over
// the codes, and only the last partial group counts anyway).
int64_t pack_bits_cpu(const at::Tensor& codes, int bits, bool is_signed, const at::Tensor& packed, bool count_outside);
int64_t pack_bits_cuda(const at::Tensor& codes, int bits, bool is_signed, const at::Tensor& packed, bool count_outside);

// out (contiguous, an integer dtype that holds every code, out.numel() codes)
// = the codes in packed (uint8, contiguous, packed_byte_count(out.numel(), bits) bytes).
void unpack_bits_cpu(const at::Tensor& packed, int bits, bool is_signed, const at::Tensor& out);
void unpack_bits_cuda(const at::Tensor& packed, int bits, bool is_signed, const at::Tensor& out);

}  // namespace fxp::kernels
