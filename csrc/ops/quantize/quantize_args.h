// Argument parsing and validation of the quantize, pack and unpack ops, shared by their backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <c10/util/string_view.h>

#include <optional>

#include "ops/format_args.h"
#include "quantize/quantize_kernel.h"

namespace fxp {

// Validates the format and the names and returns kernel parameters. Errors
// name the op and the bad value.
kernels::QuantizeParams parse_quantize_args(const char* op, const at::Tensor& x, int64_t total_bits,
                                            int64_t frac_bits, c10::string_view rounding,
                                            c10::string_view overflow);

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
// pack.counted's counts: a contiguous int64 tensor of shape [2] on x's device.
void check_pack_count_tensor(const char* op, const at::Tensor& x, const at::Tensor& counts);
// Raises ValueError when `outside` codes lie outside FxP(total_bits, .)'s range.
void check_codes_in_range(const char* op, int64_t outside, int64_t numel, int64_t total_bits, int64_t frac_bits);
// Validates unpack's arguments; returns the output dtype (float32 by default).
at::ScalarType check_unpack_args(const char* op, const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                                 std::optional<at::ScalarType> dtype);

}  // namespace fxp
