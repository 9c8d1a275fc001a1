// CPU kernels of Note [Bit-packed codes]: the codes are cut into groups of 8,
// which fill exactly `bits` bytes, and each task packs or unpacks whole
// groups, streaming through a small bit accumulator. No two tasks share a
// byte, and the out-of-range count is an integer sum, so nothing depends on
// the thread count. Whole groups go through a path specialized per width.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

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

// Whole groups with the width known at compile time: a group's 8 codes are
// exactly kBits bytes, held as two 64-bit words (little-endian, as the stream
// is), so every code's offset is a constant and packing and unpacking are
// shifts and masks the compiler unrolls. The generic loops above stay for the
// last, partial group.
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define FXP_BIT_PACK_WORDS 1

// Code i's pattern (the low kBits bits of the result; higher bits are
// garbage) from the group's words w0 (bytes 0-7) and w1 (bytes 8-15).
template <int kBits, int kIndex>
FXP_FORCE_INLINE uint64_t group_field(uint64_t w0, uint64_t w1) {
  constexpr int kOffset = kIndex * kBits;
  if constexpr (kOffset + kBits <= 64) return w0 >> kOffset;
  else if constexpr (kOffset >= 64) return w1 >> (kOffset - 64);
  else return (w0 >> kOffset) | (w1 << (64 - kOffset));
}

// Code i's pattern placed in the group's word 0 (bytes 0-7) or word 1 (8-15).
template <int kBits, int kIndex>
FXP_FORCE_INLINE uint64_t group_word0_part(uint64_t pattern) {
  constexpr int kOffset = kIndex * kBits;
  if constexpr (kOffset >= 64) return 0;
  else return pattern << kOffset;
}

template <int kBits, int kIndex>
FXP_FORCE_INLINE uint64_t group_word1_part(uint64_t pattern) {
  constexpr int kOffset = kIndex * kBits;
  if constexpr (kOffset + kBits <= 64) return 0;
  else if constexpr (kOffset >= 64) return pattern << (kOffset - 64);
  else return pattern >> (64 - kOffset);
}

template <int kBits, typename scalar_t, int... kIndex>
FXP_FORCE_INLINE void pack_group_words(const scalar_t* c, uint8_t* out, std::integer_sequence<int, kIndex...>) {
  // Both words in registers, as one expression each.
  const uint64_t w[2] = {(group_word0_part<kBits, kIndex>(code_pattern(static_cast<int64_t>(c[kIndex]), kBits)) | ...),
                         (group_word1_part<kBits, kIndex>(code_pattern(static_cast<int64_t>(c[kIndex]), kBits)) | ...)};
  std::memcpy(out, w, kBits);  // exactly the group's bytes: the next group may be another task's
}

// The codes of [codes, codes + n) outside [lo, hi].
template <typename scalar_t>
int64_t codes_outside(const scalar_t* codes, int64_t n, int64_t lo, int64_t hi) {
  // The range in scalar_t, clamped to its limits (a bound beyond them excludes
  // nothing either way), so the test stays in the codes' width and vectorizes.
  using limits = std::numeric_limits<scalar_t>;
  const auto lo_t = static_cast<scalar_t>(std::max<int64_t>(lo, limits::min()));
  const auto hi_t = static_cast<scalar_t>(std::min<int64_t>(hi, limits::max()));
  int64_t outside = 0;
  for (int64_t block = 0; block < n; block += int64_t{1} << 20) {
    int32_t in_block = 0;  // at most 2^20
    for (int64_t i = block, end = std::min(n, block + (int64_t{1} << 20)); i < end; ++i) {
      in_block += (codes[i] < lo_t) | (codes[i] > hi_t);
    }
    outside += in_block;
  }
  return outside;
}

// Counts the codes outside [lo, hi] only when asked (fxp's own codes are in
// range, and the count is a second pass over them).
template <int kBits, typename scalar_t>
int64_t pack_full_groups(const scalar_t* codes, int64_t groups, int64_t lo, int64_t hi, bool count, uint8_t* out) {
  // Counted in a loop of its own: inside the group loop it stayed scalar.
  const int64_t outside = count ? codes_outside(codes, groups * kGroupCodes, lo, hi) : 0;
  for (int64_t g = 0; g < groups; ++g) {
    pack_group_words<kBits>(codes + g * kGroupCodes, out + g * kBits, std::make_integer_sequence<int, kGroupCodes>{});
  }
  return outside;
}

// code_from_pattern on a group's 64-bit field, with the width and signedness
// constants: two 64-bit shifts sign-extend it. (Calling code_from_pattern here,
// through a 32-bit pattern, made whole-group unpacking 10-15% slower.)
template <int kBits, bool kSigned, typename out_t>
FXP_FORCE_INLINE out_t code_of_field(uint64_t field) {
  if constexpr (kSigned) {
    return static_cast<out_t>(static_cast<int64_t>(field << (64 - kBits)) >> (64 - kBits));
  } else {
    return static_cast<out_t>(field & code_mask(kBits));
  }
}

template <int kBits, bool kSigned, typename out_t, int... kIndex>
FXP_FORCE_INLINE void unpack_group_words(uint64_t w0, uint64_t w1, out_t* out, std::integer_sequence<int, kIndex...>) {
  ((out[kIndex] = code_of_field<kBits, kSigned, out_t>(group_field<kBits, kIndex>(w0, w1))), ...);
}

// Note [Unpacking with whole-word loads]
// Each group's words are loaded as 16 bytes from its first byte, past its
// kBits bytes into the next group's: those bits are never used (each field
// takes only its own kBits bits). Loading through a 16-byte buffer filled
// with the group's kBits bytes instead costs a failed store-to-load forward
// per group (the partial stores cannot feed the wide loads), 3-4x the time.
// Only groups whose 16 bytes lie inside the packed tensor load whole words;
// the last ones go through the buffer.
template <int kBits, bool kSigned, typename out_t>
void unpack_full_groups(const uint8_t* in, int64_t first_group, int64_t groups, int64_t packed_bytes, out_t* out) {
  constexpr auto kIndices = std::make_integer_sequence<int, kGroupCodes>{};
  // Groups that start at least 16 bytes before the end load whole words.
  const int64_t whole_groups = packed_bytes >= 16 ? (packed_bytes - 16) / kBits + 1 : 0;
  const int64_t whole_end = std::clamp<int64_t>(whole_groups, first_group, first_group + groups);
  int64_t g = first_group;
  for (; g < whole_end; ++g) {
    uint64_t w[2];
    std::memcpy(w, in + g * kBits, 16);
    unpack_group_words<kBits, kSigned>(w[0], w[1], out + g * kGroupCodes, kIndices);
  }
  for (; g < first_group + groups; ++g) {
    uint64_t w[2] = {0, 0};
    std::memcpy(w, in + g * kBits, kBits);
    unpack_group_words<kBits, kSigned>(w[0], w[1], out + g * kGroupCodes, kIndices);
  }
}

// Calls f(std::integral_constant<int, bits>) for bits in [1, 16].
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
#define FXP_BITS_CASE(b) \
  case b: return f(std::integral_constant<int, b>{});
    FXP_BITS_CASE(1) FXP_BITS_CASE(2) FXP_BITS_CASE(3) FXP_BITS_CASE(4) FXP_BITS_CASE(5) FXP_BITS_CASE(6)
    FXP_BITS_CASE(7) FXP_BITS_CASE(8) FXP_BITS_CASE(9) FXP_BITS_CASE(10) FXP_BITS_CASE(11) FXP_BITS_CASE(12)
    FXP_BITS_CASE(13) FXP_BITS_CASE(14) FXP_BITS_CASE(15) FXP_BITS_CASE(16)
#undef FXP_BITS_CASE
  }
  TORCH_CHECK(false, "fxp bit packing: bits must be in [1, 16], but got ", bits);
}
#endif

// Packs groups [begin, end) of the n codes: whole groups word by word, a partial last one code by code.
template <typename scalar_t>
int64_t pack_groups(const scalar_t* in, int64_t n, int64_t begin, int64_t end, int bits, int64_t lo, int64_t hi,
                    bool count, uint8_t* out) {
  const int64_t full_end = std::min(end, n / kGroupCodes);
  int64_t outside = 0;
  int64_t g = begin;
#ifdef FXP_BIT_PACK_WORDS
  if (full_end > begin) {
    with_bits(bits, [&](auto b) {
      outside += pack_full_groups<decltype(b)::value>(in + begin * kGroupCodes, full_end - begin, lo, hi, count,
                                                      out + begin * bits);
    });
    g = full_end;
  }
#endif
  for (; g < end; ++g) {
    const int64_t first = g * kGroupCodes;
    outside += pack_group(in + first, std::min(kGroupCodes, n - first), bits, lo, hi, out + g * bits);
  }
  return outside;
}

template <typename out_t>
void unpack_groups(const uint8_t* in, int64_t n, int64_t begin, int64_t end, int bits, bool is_signed, out_t* out) {
  const int64_t full_end = std::min(end, n / kGroupCodes);
  int64_t g = begin;
#ifdef FXP_BIT_PACK_WORDS
  if (full_end > begin) {
    const int64_t packed_bytes = packed_byte_count(n, bits);
    with_bits(bits, [&](auto b) {
      constexpr int kBits = decltype(b)::value;
      if (is_signed) {
        unpack_full_groups<kBits, true>(in, begin, full_end - begin, packed_bytes, out);
      } else {
        unpack_full_groups<kBits, false>(in, begin, full_end - begin, packed_bytes, out);
      }
    });
    g = full_end;
  }
#endif
  for (; g < end; ++g) {
    const int64_t first = g * kGroupCodes;
    unpack_group(in + g * bits, std::min(kGroupCodes, n - first), bits, is_signed, out + first);
  }
}

}  // namespace

int64_t pack_bits_cpu(const at::Tensor& codes, int bits, bool is_signed, const at::Tensor& packed,
                      bool count_outside) {
  const int64_t n = codes.numel();
  if (n == 0) return 0;
  const int64_t lo = min_code(bits, is_signed), hi = max_code(bits, is_signed);
  uint8_t* out = packed.data_ptr<uint8_t>();
  std::atomic<int64_t> outside{0};
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "fxp::pack_bits", [&] {
    const scalar_t* in = codes.const_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kGroupCodes - 1) / kGroupCodes, kGrainGroups, [&](int64_t begin, int64_t end) {
      outside += pack_groups(in, n, begin, end, bits, lo, hi, count_outside, out);
    });
  });
  return count_outside ? outside.load() : 0;
}

void unpack_bits_cpu(const at::Tensor& packed, int bits, bool is_signed, const at::Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const uint8_t* in = packed.const_data_ptr<uint8_t>();
  AT_DISPATCH_INTEGRAL_TYPES(out.scalar_type(), "fxp::unpack_bits", [&] {
    scalar_t* codes = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kGroupCodes - 1) / kGroupCodes, kGrainGroups, [&](int64_t begin, int64_t end) {
      unpack_groups(in, n, begin, end, bits, is_signed, codes);
    });
  });
}

}  // namespace fxp::kernels
