// fxp::pack_bits and fxp::unpack_bits (Note [Bit-packed codes]), written once
// over a Backend (pack, unpack, DeviceGuard, kIsMeta), like histogram_op.h.
// The kernels are in kernels/bit_pack.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

#include "bit_pack/bit_pack_kernel.h"

namespace fxp {

namespace bit_pack_detail {

inline void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK(bits >= kMinPackBits && bits <= kMaxPackBits, op, ": bits must be in [", kMinPackBits, ", ", kMaxPackBits,
              "], but got ", bits);
}

// "[-4, 3], the range of 3-bit signed codes"
inline std::string code_range(int bits, bool is_signed) {
  std::ostringstream text;
  text << "[" << min_code(bits, is_signed) << ", " << max_code(bits, is_signed) << "], the range of " << bits << "-bit "
       << (is_signed ? "signed" : "unsigned") << " codes";
  return text.str();
}

// The integer dtypes that codes may have (and unpack_bits may return).
inline bool is_code_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// Whether every code of the range fits dtype t (one of is_code_dtype's).
inline bool holds_codes(at::ScalarType t, int bits, bool is_signed) {
  if (t == at::kByte) return !is_signed && bits <= 8;
  const int value_bits = static_cast<int>(c10::elementSize(t)) * 8 - 1;  // beside the sign
  return bits - (is_signed ? 1 : 0) <= value_bits;
}

// The smallest of int8, int16 and int32 that holds every code.
inline at::ScalarType default_dtype(int bits, bool is_signed) {
  for (at::ScalarType t : {at::kChar, at::kShort}) {
    if (holds_codes(t, bits, is_signed)) return t;
  }
  return at::kInt;
}

// The element count of shape `size`, checked so that count * 16 bits cannot overflow int64.
inline int64_t checked_numel(const char* op, at::IntArrayRef size) {
  constexpr int64_t kMaxCodes = std::numeric_limits<int64_t>::max() / kMaxPackBits;
  for (const int64_t d : size) TORCH_CHECK(d >= 0, op, ": size must not have negative entries, but got ", size);
  for (const int64_t d : size) {
    if (d == 0) return 0;
  }
  int64_t numel = 1;
  for (const int64_t d : size) {
    TORCH_CHECK(numel <= kMaxCodes / d, op, ": size ", size, " has too many elements");
    numel *= d;
  }
  return numel;
}

}  // namespace bit_pack_detail

template <class Backend>
struct BitPackOps {
  static at::Tensor pack_bits(const at::Tensor& codes, int64_t bits, bool is_signed, bool check_range) {
    constexpr const char* op = "fxp::pack_bits";
    using namespace bit_pack_detail;
    check_bits(op, bits);
    TORCH_CHECK(is_code_dtype(codes.scalar_type()), op,
                ": codes must be an integer tensor (int8, int16, int32, int64 or uint8), but got ",
                codes.scalar_type());
    typename Backend::DeviceGuard guard(codes.device());
    // ceil(numel * bits / 8), symbolic under torch.compile's dynamic shapes.
    at::Tensor packed = at::empty_symint({(codes.sym_numel() * bits + 7) / 8}, codes.options().dtype(at::kByte));
    if constexpr (!Backend::kIsMeta) {
      const int b = static_cast<int>(bits);
      const int64_t outside = Backend::pack(codes.contiguous(), b, is_signed, packed, check_range);
      TORCH_CHECK(outside == 0, op, ": ", outside, outside == 1 ? " code lies" : " codes lie", " outside ",
                  code_range(b, is_signed));
    }
    return packed;
  }

  static at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, at::IntArrayRef size, bool is_signed,
                                std::optional<at::ScalarType> dtype) {
    constexpr const char* op = "fxp::unpack_bits";
    using namespace bit_pack_detail;
    check_bits(op, bits);
    const int b = static_cast<int>(bits);
    const at::ScalarType out_dtype = dtype.value_or(default_dtype(b, is_signed));
    TORCH_CHECK(is_code_dtype(out_dtype), op,
                ": dtype must be an integer type (int8, int16, int32, int64 or uint8), but got ", out_dtype);
    TORCH_CHECK(holds_codes(out_dtype, b, is_signed), op, ": dtype ", out_dtype, " cannot hold every code of ",
                code_range(b, is_signed));
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1, op,
                ": packed must be a 1-D uint8 tensor, but got ", packed.scalar_type(), " of shape ",
                packed.sym_sizes());
    const int64_t numel = checked_numel(op, size);
    const int64_t bytes = packed_byte_count(numel, b);
    TORCH_CHECK(packed.sym_size(0) == bytes, op, ": ", numel, " codes of ", bits, " bits (size ", size, ") take ",
                bytes, " bytes, but packed has ", packed.sym_size(0));
    typename Backend::DeviceGuard guard(packed.device());
    at::Tensor out = at::empty(size, packed.options().dtype(out_dtype));
    if constexpr (!Backend::kIsMeta) {
      Backend::unpack(packed.contiguous(), b, is_signed, out);
    }
    return out;
  }
};

#define FXP_REGISTER_BIT_PACK_OPS(m, Backend)                    \
  (m).impl("pack_bits", &::fxp::BitPackOps<Backend>::pack_bits); \
  (m).impl("unpack_bits", &::fxp::BitPackOps<Backend>::unpack_bits)

}  // namespace fxp
