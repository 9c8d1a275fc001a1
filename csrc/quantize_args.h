// Argument parsing and validation shared by every backend of the quantize ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <c10/util/string_view.h>

#include <optional>

#include "quantize.h"

namespace fxp {

// Validates the format and the names and returns kernel parameters. Errors
// name the op and the bad value.
kernels::QuantizeParams parse_quantize_args(const char* op, const at::Tensor& x, int64_t total_bits,
                                            int64_t frac_bits, c10::string_view rounding,
                                            c10::string_view overflow);

// Validates a format alone (no tensor); used by modules and optimizers too.
void check_fxp_format(const char* op, int64_t total_bits, int64_t frac_bits);
Rounding parse_rounding(const char* op, c10::string_view name);
Overflow parse_overflow(const char* op, c10::string_view name);

void check_same_device(const char* op, const at::Tensor& x, const at::Tensor& other,
                       const char* other_name);
void check_generator_device(const char* op, const at::Tensor& x,
                            const std::optional<at::Generator>& generator);
void check_philox_offset(const char* op, int64_t offset);

// Packed storage: the integer dtype of FxP(B, .) codes (int8 for B <= 8, int16
// for B <= 16, int32 otherwise).
at::ScalarType packed_dtype(int total_bits);
// pack's arguments: the kernel parameters, and whether rounding is "exact"
// (x must lie on the grid already; rounding half to even then changes nothing).
struct PackArgs {
  kernels::QuantizeParams params;
  bool exact;
};
PackArgs parse_pack_args(const char* op, const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                         c10::string_view rounding, c10::string_view overflow);
// Raises ValueError for NaN elements ("cannot pack NaN", with the count) and,
// with exact, for elements off the grid.
void check_pack_counts(const char* op, const PackArgs& args, const kernels::PackCounts& counts, int64_t numel);
// Raises ValueError when `outside` codes lie outside FxP(total_bits, .)'s range.
void check_codes_in_range(const char* op, int64_t outside, int64_t numel, int64_t total_bits, int64_t frac_bits);
// Validates unpack's arguments; returns the output dtype (float32 by default).
at::ScalarType check_unpack_args(const char* op, const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                                 std::optional<at::ScalarType> dtype);

}  // namespace fxp
