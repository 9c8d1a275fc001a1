#include "ops/format_args.h"

#include <c10/util/Exception.h>

namespace fxp {

void check_fxp_format(const char* op, int64_t total_bits, int64_t frac_bits) {
  TORCH_CHECK(total_bits >= kMinTotalBits && total_bits <= kMaxTotalBits, op,
              ": total_bits must be in [", kMinTotalBits, ", ", kMaxTotalBits, "], but got ",
              total_bits);
  TORCH_CHECK(frac_bits >= 0 && frac_bits <= total_bits - 1, op,
              ": frac_bits must be in [0, total_bits - 1] = [0, ", total_bits - 1, "], but got ",
              frac_bits);
}

Rounding parse_rounding(const char* op, c10::string_view name) {
  if (name == "nearest_even") return Rounding::NearestEven;
  if (name == "stochastic") return Rounding::Stochastic;
  if (name == "floor") return Rounding::Floor;
  if (name == "nearest_away") return Rounding::NearestAway;
  TORCH_CHECK(false, op, ": unknown rounding '", name,
              "'; expected one of nearest_even, stochastic, floor, nearest_away");
}

Overflow parse_overflow(const char* op, c10::string_view name) {
  if (name == "saturate") return Overflow::Saturate;
  if (name == "wrap") return Overflow::Wrap;
  TORCH_CHECK(false, op, ": unknown overflow '", name, "'; expected one of saturate, wrap");
}

void check_same_device(const char* op, const at::Tensor& x, const at::Tensor& other,
                       const char* other_name) {
  TORCH_CHECK(x.device() == other.device(), op, ": expected ", other_name,
              " on the same device as x (", x.device(), "), but got ", other.device());
}

void check_generator_device(const char* op, const at::Tensor& x,
                            const std::optional<at::Generator>& generator) {
  if (!generator.has_value() || !generator->defined()) return;
  TORCH_CHECK(generator->device().type() == x.device().type(), op,
              ": expected a generator for ", x.device().type(), " (the device of x), but got one for ",
              generator->device());
}

void check_philox_offset(const char* op, int64_t offset) {
  TORCH_CHECK(offset >= 0, op, ": offset must be non-negative, but got ", offset);
}

at::ScalarType packed_dtype(int total_bits) {
  switch (packed_storage_bits(total_bits)) {
    case 8: return at::kChar;
    case 16: return at::kShort;
    default: return at::kInt;
  }
}

}  // namespace fxp
