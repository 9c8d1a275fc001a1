// C++ entry points to the fxp ops (part of <fxp/fxp.h>). They call through the
// dispatcher, so they pick the CPU, CUDA or Meta kernel and record autograd
// like any ATen op. Each is declared and defined here, once: the functional
// ops take their dispatcher signature from their own type (decltype), so an
// argument list is typed in the schema, the kernel, here and the Python
// wrapper, and nowhere else.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fxp {

namespace detail {
// The typed handle of fxp::<name>, looked up once per entry point.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Signature>();
}
}  // namespace detail

// Calls the op of the enclosing entry point, whose signature is the entry's own type.
#define FXP_CALL_OP(entry, name, ...)                                                     \
  static const auto op = ::fxp::detail::find_op<decltype(entry)>("fxp::" name);          \
  return op.call(__VA_ARGS__)

using OptionalGenerator = std::optional<at::Generator>;

inline at::Tensor quantize(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                           c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
                           const OptionalGenerator& generator = std::nullopt) {
  FXP_CALL_OP(quantize, "quantize", x, total_bits, frac_bits, rounding, overflow, generator);
}

// In place; returns x (the op itself returns nothing, which keeps it functionalizable).
inline at::Tensor& quantize_(at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                             c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
                             const OptionalGenerator& generator = std::nullopt) {
  static const auto op = detail::find_op<void(const at::Tensor&, int64_t, int64_t, c10::string_view,
                                              c10::string_view, const OptionalGenerator&)>("fxp::quantize_");
  op.call(x, total_bits, frac_bits, rounding, overflow, generator);
  return x;
}

// (output, int64 0-dim count of saturated elements)
inline std::tuple<at::Tensor, at::Tensor> quantize_stats(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                                         c10::string_view rounding = "nearest_even",
                                                         c10::string_view overflow = "saturate",
                                                         const OptionalGenerator& generator = std::nullopt) {
  FXP_CALL_OP(quantize_stats, "quantize_stats", x, total_bits, frac_bits, rounding, overflow, generator);
}

// (output, bool tensor: true where saturated)
inline std::tuple<at::Tensor, at::Tensor> quantize_mask(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                                        c10::string_view rounding = "nearest_even",
                                                        c10::string_view overflow = "saturate",
                                                        const OptionalGenerator& generator = std::nullopt) {
  FXP_CALL_OP(quantize_mask, "quantize_mask", x, total_bits, frac_bits, rounding, overflow, generator);
}

// Straight-through quantization for training; differentiable.
inline at::Tensor quantize_ste(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                               c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
                               const OptionalGenerator& generator = std::nullopt, bool zero_grad_saturated = false) {
  FXP_CALL_OP(quantize_ste, "quantize_ste", x, total_bits, frac_bits, rounding, overflow, generator,
              zero_grad_saturated);
}

inline at::Tensor quantize_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                  c10::string_view rounding, int64_t seed, int64_t offset,
                                  c10::string_view overflow = "saturate") {
  FXP_CALL_OP(quantize_seeded, "quantize_seeded", x, total_bits, frac_bits, rounding, seed, offset, overflow);
}

inline at::Tensor& quantize_seeded_(at::Tensor& x, int64_t total_bits, int64_t frac_bits, c10::string_view rounding,
                                    int64_t seed, int64_t offset, c10::string_view overflow = "saturate") {
  static const auto op = detail::find_op<void(const at::Tensor&, int64_t, int64_t, c10::string_view, int64_t,
                                              int64_t, c10::string_view)>("fxp::quantize_seeded_");
  op.call(x, total_bits, frac_bits, rounding, seed, offset, overflow);
  return x;
}

inline std::tuple<at::Tensor, at::Tensor> quantize_seeded_stats(const at::Tensor& x, int64_t total_bits,
                                                                int64_t frac_bits, c10::string_view rounding,
                                                                int64_t seed, int64_t offset,
                                                                c10::string_view overflow = "saturate") {
  FXP_CALL_OP(quantize_seeded_stats, "quantize_seeded_stats", x, total_bits, frac_bits, rounding, seed, offset,
              overflow);
}

// Note [Per-member QPU step]: every tensor stacks the fleet's members along
// dim 0; each active member is stepped as qpu_sgd_step_ steps its solo run.
// Returns int64 counts [members, params.size(), 2].
inline at::Tensor qpu_sgd_members_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                        at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
                                        at::ArrayRef<double> weight_decay, bool nesterov, at::IntArrayRef total_bits,
                                        at::IntArrayRef frac_bits, at::IntArrayRef momentum_total_bits,
                                        at::IntArrayRef momentum_frac_bits, const c10::List<std::string>& rounding,
                                        at::IntArrayRef seed, at::IntArrayRef step, const c10::List<bool>& active,
                                        c10::string_view momentum_form = "standard",
                                        at::OptionalIntArrayRef stream_indices = std::nullopt) {
  FXP_CALL_OP(qpu_sgd_members_step_, "qpu_sgd_members_step_", params, grads, momentum_buffers, lr, momentum,
              weight_decay, nesterov, total_bits, frac_bits, momentum_total_bits, momentum_frac_bits, rounding, seed,
              step, active, momentum_form, stream_indices);
}

// Note [Per-member quantization]: member m, x.select(member_dim, m), as
// quantize_seeded quantizes it alone with the m-th format, rounding, seed and offset.
inline at::Tensor quantize_members(const at::Tensor& x, int64_t member_dim, at::IntArrayRef total_bits,
                                   at::IntArrayRef frac_bits, const c10::List<std::string>& rounding,
                                   at::IntArrayRef seed, at::IntArrayRef offset,
                                   c10::string_view overflow = "saturate") {
  FXP_CALL_OP(quantize_members, "quantize_members", x, member_dim, total_bits, frac_bits, rounding, seed, offset,
              overflow);
}

// quantize_members with the straight-through gradient; differentiable.
inline at::Tensor quantize_members_ste(const at::Tensor& x, int64_t member_dim, at::IntArrayRef total_bits,
                                       at::IntArrayRef frac_bits, const c10::List<std::string>& rounding,
                                       at::IntArrayRef seed, at::IntArrayRef offset,
                                       c10::string_view overflow = "saturate") {
  FXP_CALL_OP(quantize_members_ste, "quantize_members_ste", x, member_dim, total_bits, frac_bits, rounding, seed,
              offset, overflow);
}

// The fused QPU SGD step over a parameter group; see docs/design.md. Updates
// params and momentum_buffers in place; returns int64 [n, 2] of
// (saturated, vanished) elements per tensor. stream_indices: each tensor's
// random stream (default: its position in params; Note [QPU random streams]).
inline at::Tensor qpu_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                double lr, double momentum, double weight_decay, bool nesterov, int64_t total_bits,
                                int64_t frac_bits, int64_t momentum_total_bits, int64_t momentum_frac_bits,
                                c10::string_view rounding, int64_t seed, int64_t step,
                                c10::string_view momentum_form = "standard",
                                at::OptionalIntArrayRef stream_indices = std::nullopt) {
  FXP_CALL_OP(qpu_sgd_step_, "qpu_sgd_step_", params, grads, momentum_buffers, lr, momentum, weight_decay, nesterov,
              total_bits, frac_bits, momentum_total_bits, momentum_frac_bits, rounding, seed, step, momentum_form,
              stream_indices);
}

// The capturable form (Note [Capturable QPU step]): lr, step and nan_count are
// 0-dim tensors on the parameters' device; step advances by one on the device,
// and packed storage's NaN results are added to nan_count instead of raising.
inline at::Tensor qpu_sgd_step_capturable_(at::TensorList params, at::TensorList grads,
                                           at::TensorList momentum_buffers, const at::Tensor& lr,
                                           const at::Tensor& step, const at::Tensor& nan_count, double momentum,
                                           double weight_decay, bool nesterov, int64_t total_bits, int64_t frac_bits,
                                           int64_t momentum_total_bits, int64_t momentum_frac_bits,
                                           c10::string_view rounding, int64_t seed,
                                           c10::string_view momentum_form = "standard",
                                           at::OptionalIntArrayRef stream_indices = std::nullopt) {
  static const auto op = detail::find_op<decltype(qpu_sgd_step_capturable_)>("fxp::qpu_sgd_step_", "capturable");
  return op.call(params, grads, momentum_buffers, lr, step, nan_count, momentum, weight_decay, nesterov, total_bits,
                 frac_bits, momentum_total_bits, momentum_frac_bits, rounding, seed, momentum_form, stream_indices);
}

// AdaPT's fused QPU step (Note [AdaPT's fused QPU step]): qpu_sgd_step_ on each
// gradient normalized as normalize_accumulate_ would, added to accumulated in
// the same pass; grads are only read.
inline at::Tensor qpu_sgd_step_adapt_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                      at::TensorList accumulated, const at::Tensor& norms, at::IntArrayRef layers,
                                      double l1, double lr, double momentum, double weight_decay, bool nesterov,
                                      int64_t total_bits, int64_t frac_bits, int64_t momentum_total_bits,
                                      int64_t momentum_frac_bits, c10::string_view rounding, int64_t seed,
                                      int64_t step, c10::string_view momentum_form = "standard",
                                      at::OptionalIntArrayRef stream_indices = std::nullopt) {
  static const auto op = detail::find_op<decltype(qpu_sgd_step_adapt_)>("fxp::qpu_sgd_step_", "adapt");
  return op.call(params, grads, momentum_buffers, accumulated, norms, layers, l1, lr, momentum, weight_decay, nesterov,
                 total_bits, frac_bits, momentum_total_bits, momentum_frac_bits, rounding, seed, step, momentum_form,
                 stream_indices);
}

// QPU's initialization: params[k] rounded in place onto FxP(total_bits[k],
// frac_bits[k]) with the Philox streams of Note [QPU initialization].
inline void quantize_parameters_(at::TensorList params, at::IntArrayRef total_bits, at::IntArrayRef frac_bits,
                                 c10::string_view rounding, int64_t seed) {
  FXP_CALL_OP(quantize_parameters_, "quantize_parameters_", params, total_bits, frac_bits, rounding, seed);
}

// A QPU parameter group's move to a new format (Note [QPU format change]):
// params rounded onto it, and momentum_buffers[j] (params[momentum_positions[j]]'s).
inline void qpu_change_format_(at::TensorList params, at::TensorList momentum_buffers,
                               at::IntArrayRef momentum_positions, int64_t total_bits, int64_t frac_bits,
                               c10::string_view rounding, int64_t seed, int64_t step) {
  FXP_CALL_OP(qpu_change_format_, "qpu_change_format_", params, momentum_buffers, momentum_positions, total_bits,
              frac_bits, rounding, seed, step);
}

// Packed storage: integer codes of FxP(total_bits, frac_bits) (int8 for B <= 8,
// int16 for B <= 16, int32 otherwise), rounded like quantize; NaN is an error.
// rounding "exact": x must lie on the grid already.
inline at::Tensor pack(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                       c10::string_view rounding = "nearest_even", c10::string_view overflow = "saturate",
                       const OptionalGenerator& generator = std::nullopt) {
  FXP_CALL_OP(pack, "pack", x, total_bits, frac_bits, rounding, overflow, generator);
}

// pack, adding (NaN, off-grid) counts to `counts` (contiguous int64 [2] on
// x's device) instead of raising: nothing is read back to the host (Note
// [Deferred pack checks]); the caller checks the counts later.
inline at::Tensor pack_counted(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, c10::string_view rounding,
                               c10::string_view overflow, const OptionalGenerator& generator,
                               const at::Tensor& counts) {
  static const auto op = detail::find_op<decltype(pack_counted)>("fxp::pack", "counted");
  return op.call(x, total_bits, frac_bits, rounding, overflow, generator, counts);
}

inline at::Tensor pack_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, c10::string_view rounding,
                              int64_t seed, int64_t offset, c10::string_view overflow = "saturate") {
  FXP_CALL_OP(pack_seeded, "pack_seeded", x, total_bits, frac_bits, rounding, seed, offset, overflow);
}

// codes * 2^-frac_bits, as dtype (default float32), rounded once.
inline at::Tensor unpack(const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                         std::optional<at::ScalarType> dtype = std::nullopt) {
  FXP_CALL_OP(unpack, "unpack", codes, total_bits, frac_bits, dtype);
}

// Bit-packed storage (Note [Bit-packed codes]): integer codes of `bits` bits
// (1 to 16; two's complement when is_signed) as 1-D uint8 of
// ceil(numel * bits / 8) bytes, code i in stream bits [i * bits, (i + 1) * bits).
// A code outside the range is an error that gives the count, unless
// check_range is false (codes known to be in range: no check, no CUDA sync).
inline at::Tensor pack_bits(const at::Tensor& codes, int64_t bits, bool is_signed = true, bool check_range = true) {
  FXP_CALL_OP(pack_bits, "pack_bits", codes, bits, is_signed, check_range);
}

// The codes of pack_bits, with shape `size`, as dtype (default: the smallest
// of int8, int16 and int32 that holds every code).
inline at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, at::IntArrayRef size, bool is_signed = true,
                              std::optional<at::ScalarType> dtype = std::nullopt) {
  FXP_CALL_OP(unpack_bits, "unpack_bits", packed, bits, size, is_signed, dtype);
}

// torch's linear / conv2d for quantized layers: weights from packed codes
// (weight_codes, bias_codes in param_format), the input saved packed in
// input_format for the backward, and the output quantized in place to
// output_format (straight-through). With pack_counts, the saved input's pack
// adds its (NaN, off-grid) counts there instead of raising (Note [Deferred
// pack checks]). See docs/design.md, "Packed storage".
// The schemas' argument lists (linear.counted and conv2d.counted add pack_counts).
#define FXP_LINEAR_ARGS                                                                                          \
  const at::Tensor &, const at::Tensor &, const std::optional<at::Tensor> &, at::OptionalIntArrayRef,           \
      const std::optional<at::Tensor> &, const std::optional<at::Tensor> &, at::OptionalIntArrayRef,            \
      at::OptionalIntArrayRef, c10::string_view, const OptionalGenerator &
#define FXP_CONV2D_ARGS                                                                                          \
  const at::Tensor &, const at::Tensor &, const std::optional<at::Tensor> &, at::IntArrayRef, at::IntArrayRef,  \
      at::IntArrayRef, int64_t, at::OptionalIntArrayRef, const std::optional<at::Tensor> &,                     \
      const std::optional<at::Tensor> &, at::OptionalIntArrayRef, at::OptionalIntArrayRef, c10::string_view,   \
      const OptionalGenerator &

inline at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias = std::nullopt,
                         at::OptionalIntArrayRef input_format = std::nullopt,
                         const std::optional<at::Tensor>& weight_codes = std::nullopt,
                         const std::optional<at::Tensor>& bias_codes = std::nullopt,
                         at::OptionalIntArrayRef param_format = std::nullopt,
                         at::OptionalIntArrayRef output_format = std::nullopt,
                         c10::string_view output_rounding = "nearest_even",
                         const OptionalGenerator& generator = std::nullopt,
                         const std::optional<at::Tensor>& pack_counts = std::nullopt) {
  if (pack_counts.has_value() && pack_counts->defined()) {
    static const auto counted = detail::find_op<at::Tensor(FXP_LINEAR_ARGS, const at::Tensor&)>("fxp::linear", "counted");
    return counted.call(x, weight, bias, input_format, weight_codes, bias_codes, param_format, output_format,
                        output_rounding, generator, *pack_counts);
  }
  static const auto op = detail::find_op<at::Tensor(FXP_LINEAR_ARGS)>("fxp::linear");
  return op.call(x, weight, bias, input_format, weight_codes, bias_codes, param_format, output_format, output_rounding,
                 generator);
}

inline at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         at::OptionalIntArrayRef input_format = std::nullopt,
                         const std::optional<at::Tensor>& weight_codes = std::nullopt,
                         const std::optional<at::Tensor>& bias_codes = std::nullopt,
                         at::OptionalIntArrayRef param_format = std::nullopt,
                         at::OptionalIntArrayRef output_format = std::nullopt,
                         c10::string_view output_rounding = "nearest_even",
                         const OptionalGenerator& generator = std::nullopt,
                         const std::optional<at::Tensor>& pack_counts = std::nullopt) {
  if (pack_counts.has_value() && pack_counts->defined()) {
    static const auto counted = detail::find_op<at::Tensor(FXP_CONV2D_ARGS, const at::Tensor&)>("fxp::conv2d", "counted");
    return counted.call(x, weight, bias, stride, padding, dilation, groups, input_format, weight_codes, bias_codes,
                        param_format, output_format, output_rounding, generator, *pack_counts);
  }
  static const auto op = detail::find_op<at::Tensor(FXP_CONV2D_ARGS)>("fxp::conv2d");
  return op.call(x, weight, bias, stride, padding, dilation, groups, input_format, weight_codes, bias_codes,
                 param_format, output_format, output_rounding, generator);
}

// max_pool2d(relu(x), kernel_size), stride = kernel_size, whose autograd saves
// one byte per output; gradients equal torch's. See docs/design.md.
inline at::Tensor relu_max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size) {
  FXP_CALL_OP(relu_max_pool2d, "relu_max_pool2d", x, kernel_size);
}

// Its parts (what the autograd calls): the output and each output's window
// position of the maximum (uint8, 255: not positive); the input gradient.
inline std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_with_positions(const at::Tensor& x,
                                                                        at::IntArrayRef kernel_size) {
  FXP_CALL_OP(relu_max_pool2d_with_positions, "relu_max_pool2d_with_positions", x, kernel_size);
}

inline at::Tensor relu_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& positions,
                                           at::IntArrayRef kernel_size, c10::SymIntArrayRef input_size) {
  FXP_CALL_OP(relu_max_pool2d_backward, "relu_max_pool2d_backward", grad_out, positions, kernel_size, input_size);
}

// AdaPT's push-down histogram: int64 counts of x (rounded half to even to
// FxP(format[0], format[1]) first when format is given; format[0] = 0: no
// saturation) in `bins` equal bins over [min, max], torch.histc's bins.
inline at::Tensor format_histogram(const at::Tensor& x, int64_t bins, double min, double max,
                                   at::OptionalIntArrayRef format = std::nullopt) {
  FXP_CALL_OP(format_histogram, "format_histogram", x, bins, min, max, format);
}

// AdaPT's per-step gradient work (Note [AdaPT's fused step]); layers[k] is tensor k's layer.
// The norm of each layer's gradients with L1's term (float64 [num_layers]).
inline at::Tensor layer_gradient_norms(at::TensorList params, at::TensorList grads, at::IntArrayRef layers,
                                       int64_t num_layers, double l1 = 0) {
  FXP_CALL_OP(layer_gradient_norms, "layer_gradient_norms", params, grads, layers, num_layers, l1);
}

// grads[k] = (grads[k] + l1 sign(params[k])) / norms[layers[k]] (Eq. 3.4); accumulated[k] += grads[k].
inline void normalize_accumulate_(at::TensorList grads, at::TensorList accumulated, at::TensorList params,
                                  const at::Tensor& norms, at::IntArrayRef layers, double l1 = 0) {
  FXP_CALL_OP(normalize_accumulate_, "normalize_accumulate_", grads, accumulated, params, norms, layers, l1);
}

// The same normalized gradient added to accumulated[k] and applied to params[k]
// by SGD, in one pass; grads are only read.
inline void adapt_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList accumulated, const at::Tensor& norms, at::IntArrayRef layers, double l1,
                            double lr, double momentum = 0, double weight_decay = 0, bool nesterov = false) {
  FXP_CALL_OP(adapt_sgd_step_, "adapt_sgd_step_", params, grads, momentum_buffers, accumulated, norms, layers, l1, lr,
              momentum, weight_decay, nesterov);
}

// MSQ's RoundClamp (Note [RoundClamp]): (w quantized at `bits` bits with the
// per-layer scale, sum |LSB| as a 0-dim tensor, the count of non-zero LSBs),
// in one pass, straight through for autograd.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> round_clamp(const at::Tensor& w, double scale, int64_t bits) {
  FXP_CALL_OP(round_clamp, "round_clamp", w, scale, bits);
}

// The LSBs themselves: the value at `bits` minus the value at bits - 1.
inline at::Tensor round_clamp_lsb(const at::Tensor& w, double scale, int64_t bits) {
  FXP_CALL_OP(round_clamp_lsb, "round_clamp_lsb", w, scale, bits);
}

// The signed integer codes sign(w) c_n (int8 for bits <= 7, int16 for bits <= 15, else int32).
inline at::Tensor round_clamp_codes(const at::Tensor& w, double scale, int64_t bits) {
  FXP_CALL_OP(round_clamp_codes, "round_clamp_codes", w, scale, bits);
}

// round_clamp's gradient: grad_quantized + grad_lsb_l1 sign(LSB(w)).
inline at::Tensor round_clamp_backward(const at::Tensor& grad_quantized, const at::Tensor& grad_lsb_l1,
                                       const at::Tensor& w, double scale, int64_t bits) {
  FXP_CALL_OP(round_clamp_backward, "round_clamp_backward", grad_quantized, grad_lsb_l1, w, scale, bits);
}

#undef FXP_CALL_OP

}  // namespace fxp
