// CPU kernels of Note [Bit-packed codes]: the codes are cut into groups of 8,
// which fill exactly `bits` bytes, and each task packs or unpacks whole
// groups, streaming through a small bit accumulator. No two tasks share a
// byte, and the out-of-range count is an integer sum, so nothing depends on
// the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "bit_pack/bit_pack_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int64_t kGroupCodes = 8;      // a group's codes fill `bits` whole bytes
constexpr int64_t kGrainGroups = 4096;  // groups per task, at least

// Packs count (<= kGroupCodes) codes into ceil(count * bits / 8) bytes at out;
// returns how many lie outside [lo, hi].
template <typename scalar_t>
int64_t pack_group(const scalar_t* codes, int64_t count, int bits, int64_t lo, int64_t hi, uint8_t* out) {
  uint32_t acc = 0;  // at most 7 + 16 pending bits
  int filled = 0;
  int64_t outside = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto code = static_cast<int64_t>(codes[i]);
    outside += static_cast<int64_t>((code < lo) | (code > hi));
    acc |= code_pattern(code, bits) << filled;
    for (filled += bits; filled >= 8; filled -= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
    }
  }
  if (filled > 0) *out = static_cast<uint8_t>(acc);  // the stream's last byte; its high bits are 0
  return outside;
}

// Unpacks count (<= kGroupCodes) codes from the ceil(count * bits / 8) bytes at in.
template <typename out_t>
void unpack_group(const uint8_t* in, int64_t count, int bits, bool is_signed, out_t* out) {
  const uint32_t mask = code_mask(bits);
  uint32_t acc = 0;  // fewer than 16 + 8 bits
  int filled = 0;
  for (int64_t i = 0; i < count; ++i) {
    for (; filled < bits; filled += 8) acc |= static_cast<uint32_t>(*in++) << filled;
    out[i] = static_cast<out_t>(code_from_pattern(acc & mask, bits, is_signed));
    acc >>= bits;
    filled -= bits;
  }
}

}  // namespace

int64_t pack_bits_cpu(const at::Tensor& codes, int bits, bool is_signed, const at::Tensor& packed) {
  const int64_t n = codes.numel();
  if (n == 0) return 0;
  const int64_t lo = min_code(bits, is_signed), hi = max_code(bits, is_signed);
  uint8_t* out = packed.data_ptr<uint8_t>();
  std::atomic<int64_t> outside{0};
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "fxp::pack_bits", [&] {
    const scalar_t* in = codes.const_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kGroupCodes - 1) / kGroupCodes, kGrainGroups, [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      for (int64_t g = begin; g < end; ++g) {
        const int64_t first = g * kGroupCodes;
        local += pack_group(in + first, std::min(kGroupCodes, n - first), bits, lo, hi, out + g * bits);
      }
      outside += local;
    });
  });
  return outside.load();
}

void unpack_bits_cpu(const at::Tensor& packed, int bits, bool is_signed, const at::Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const uint8_t* in = packed.const_data_ptr<uint8_t>();
  AT_DISPATCH_INTEGRAL_TYPES(out.scalar_type(), "fxp::unpack_bits", [&] {
    scalar_t* codes = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kGroupCodes - 1) / kGroupCodes, kGrainGroups, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t first = g * kGroupCodes;
        unpack_group(in + g * bits, std::min(kGroupCodes, n - first), bits, is_signed, codes + first);
      }
    });
  });
}

}  // namespace fxp::kernels
