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

}  // namespace fxp
