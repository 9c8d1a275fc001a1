// How packed storage holds the codes of FxP(B, F): as integer codes of the
// value's shape, or as a bit stream of B-bit codes. The ops that read stored
// codes (linear, conv2d, qpu_sgd_step_) call these; so do the modules and the
// optimizer that create them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fxp {

// Note [Bit-stream storage]
// Packed storage keeps FxP(B, F) at B bits per code. For B = 8, 16 or more
// than 16 the codes are int8 / int16 / int32 of the value's shape (packed_dtype;
// a stream would be the same bytes, or pack_bits cannot hold B). For any other
// B up to 16 they are a stream of signed B-bit codes (Note [Bit-packed codes]):
// 1-D uint8 of ceil(numel * B / 8) bytes, in the value's row-major order. Codes
// are signed, so uint8 never holds codes of the value's shape, and the ops
// tell the two forms apart by dtype alone (they take a stream of 8 or 16 bits
// too; what modules and optimizers create follows the rule). A consumer decodes a stream into
// integer codes for one tensor at a time and drops them after use (the layer
// ops unpack float weights the same way), so what stays allocated between
// steps, and what autograd saves, costs B bits per element.
bool stores_bit_stream(int64_t total_bits);

// Whether `stored` is a bit stream (uint8) rather than integer codes.
bool is_bit_stream(const at::Tensor& stored);

// The stored form of `codes` (integer codes of FxP(total_bits, .)): a new
// stream when stores_bit_stream(total_bits), else `codes` itself. A stream's
// encoding range-checks the codes (a read-back on CUDA) unless check_range is
// false, for codes that fxp's ops made (pack and the QPU step saturate).
at::Tensor store_codes(const at::Tensor& codes, int64_t total_bits, bool check_range = true);

// Stored zeros for a tensor of shape `sizes` (zero codes are zero bytes).
at::Tensor stored_zeros(at::IntArrayRef sizes, int64_t total_bits, const at::TensorOptions& options);

// The integer codes (packed_dtype) of a tensor of shape `sizes` held in
// `stored`; `stored` itself when it is not a stream. The caller has checked
// `stored` (check_stored_codes, or it saved the codes itself).
at::Tensor load_codes(const at::Tensor& stored, int64_t total_bits, at::IntArrayRef sizes);

// Checks that `stored` can hold the codes of a tensor of shape `sizes` in
// FxP(total_bits, .): a stream of that many codes, or codes of that shape
// (their integer dtype is the caller's to check). Symbolic sizes are fine
// (Meta and fake tensors).
void check_stored_codes(const char* op, const char* name, const at::Tensor& stored, int64_t total_bits,
                        c10::SymIntArrayRef sizes);

// Writes `codes` into `stored` in place (re-encoded when `stored` is a stream,
// without a range check: the QPU step's codes saturate to the format).
void assign_codes(const at::Tensor& stored, const at::Tensor& codes, int64_t total_bits);

}  // namespace fxp
