#include "ops/quantize/quantize_args.h"

#include <c10/util/Exception.h>

namespace fxp {

kernels::QuantizeParams parse_quantize_args(const char* op, const at::Tensor& x, int64_t total_bits,
                                            int64_t frac_bits, c10::string_view rounding,
                                            c10::string_view overflow) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, but got ", dtype);
  check_fxp_format(op, total_bits, frac_bits);
  return kernels::QuantizeParams{static_cast<int>(total_bits), static_cast<int>(frac_bits),
                                 parse_rounding(op, rounding), parse_overflow(op, overflow)};
}

PackArgs parse_pack_args(const char* op, const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                         c10::string_view rounding, c10::string_view overflow) {
  const bool exact = rounding == "exact";
  return PackArgs{parse_quantize_args(op, x, total_bits, frac_bits, exact ? "nearest_even" : rounding, overflow),
                  exact};
}

void check_pack_counts(const char* op, const PackArgs& args, const kernels::PackCounts& counts, int64_t numel) {
  TORCH_CHECK_VALUE(counts.nan == 0, op, ": cannot pack NaN into integer codes: ", counts.nan, " of ", numel,
                    " elements are NaN");
  TORCH_CHECK_VALUE(counts.off_grid == 0, op, ": with rounding='exact' x must lie on the grid of FxP(",
                    args.params.total_bits, ",", args.params.frac_bits, "), but ", counts.off_grid, " of ", numel,
                    " elements do not (they would be rounded or saturated)");
}

void check_pack_count_tensor(const char* op, const at::Tensor& x, const at::Tensor& counts) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.sym_size(0) == 2 &&
                  counts.is_contiguous(),
              op, ": counts must be a contiguous int64 tensor of shape [2] (NaN, off-grid), but got ",
              counts.scalar_type(), " of shape ", counts.sym_sizes(), counts.is_contiguous() ? "" : ", not contiguous");
  TORCH_CHECK(counts.device() == x.device(), op, ": counts must be on x's device (", x.device(), "), but it is on ",
              counts.device());
}

void check_codes_in_range(const char* op, int64_t outside, int64_t numel, int64_t total_bits, int64_t frac_bits) {
  TORCH_CHECK_VALUE(outside == 0, op, ": ", outside, " of ", numel, " codes lie outside the range [",
                    -(int64_t{1} << (total_bits - 1)), ", ", (int64_t{1} << (total_bits - 1)) - 1, "] of FxP(",
                    total_bits, ",", frac_bits, ")");
}

at::ScalarType check_unpack_args(const char* op, const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                                 std::optional<at::ScalarType> dtype) {
  check_fxp_format(op, total_bits, frac_bits);
  const at::ScalarType expected = packed_dtype(static_cast<int>(total_bits));
  TORCH_CHECK(codes.scalar_type() == expected, op, ": codes of FxP(", total_bits, ",", frac_bits, ") must be ",
              expected, ", but got ", codes.scalar_type());
  const at::ScalarType out = dtype.value_or(at::kFloat);
  TORCH_CHECK(out == at::kFloat || out == at::kDouble || out == at::kHalf || out == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, but got ", out);
  return out;
}

}  // namespace fxp
