// Argument checks every op family shares: formats, rounding and overflow
// names, devices, Philox offsets, and the dtype of packed codes. Errors name
// the op and the bad value.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "common/fxp_math.h"

namespace fxp {

// Validates a format alone (no tensor); used by modules and optimizers too.
void check_fxp_format(const char* op, int64_t total_bits, int64_t frac_bits);
Rounding parse_rounding(const char* op, c10::string_view name);
Overflow parse_overflow(const char* op, c10::string_view name);

void check_same_device(const char* op, const at::Tensor& x, const at::Tensor& other, const char* other_name);
void check_generator_device(const char* op, const at::Tensor& x, const std::optional<at::Generator>& generator);
void check_philox_offset(const char* op, int64_t offset);

// Packed storage: the integer dtype of FxP(B, .) codes (int8 for B <= 8, int16
// for B <= 16, int32 otherwise).
at::ScalarType packed_dtype(int total_bits);

}  // namespace fxp
