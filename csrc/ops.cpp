#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace fxp {
namespace {

using Generator = std::optional<at::Generator>;
using Str = c10::string_view;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Signature>();
}

}  // namespace

at::Tensor quantize(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, Str rounding,
                    Str overflow, const Generator& generator) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, Str, Str, const Generator&)>(
          "fxp::quantize");
  return op.call(x, total_bits, frac_bits, rounding, overflow, generator);
}

at::Tensor& quantize_(at::Tensor& x, int64_t total_bits, int64_t frac_bits, Str rounding,
                      Str overflow, const Generator& generator) {
  static const auto op =
      find_op<void(const at::Tensor&, int64_t, int64_t, Str, Str, const Generator&)>(
          "fxp::quantize_");
  op.call(x, total_bits, frac_bits, rounding, overflow, generator);
  return x;
}

std::tuple<at::Tensor, at::Tensor> quantize_stats(const at::Tensor& x, int64_t total_bits,
                                                  int64_t frac_bits, Str rounding, Str overflow,
                                                  const Generator& generator) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, int64_t, Str, Str, const Generator&)>("fxp::quantize_stats");
  return op.call(x, total_bits, frac_bits, rounding, overflow, generator);
}

std::tuple<at::Tensor, at::Tensor> quantize_mask(const at::Tensor& x, int64_t total_bits,
                                                 int64_t frac_bits, Str rounding, Str overflow,
                                                 const Generator& generator) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, int64_t, Str, Str, const Generator&)>("fxp::quantize_mask");
  return op.call(x, total_bits, frac_bits, rounding, overflow, generator);
}

at::Tensor quantize_ste(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, Str rounding,
                        Str overflow, const Generator& generator, bool zero_grad_saturated) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, Str, Str, const Generator&, bool)>(
          "fxp::quantize_ste");
  return op.call(x, total_bits, frac_bits, rounding, overflow, generator, zero_grad_saturated);
}

at::Tensor quantize_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                           Str rounding, int64_t seed, int64_t offset, Str overflow) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, Str, int64_t, int64_t, Str)>(
          "fxp::quantize_seeded");
  return op.call(x, total_bits, frac_bits, rounding, seed, offset, overflow);
}

at::Tensor& quantize_seeded_(at::Tensor& x, int64_t total_bits, int64_t frac_bits, Str rounding,
                             int64_t seed, int64_t offset, Str overflow) {
  static const auto op =
      find_op<void(const at::Tensor&, int64_t, int64_t, Str, int64_t, int64_t, Str)>(
          "fxp::quantize_seeded_");
  op.call(x, total_bits, frac_bits, rounding, seed, offset, overflow);
  return x;
}

std::tuple<at::Tensor, at::Tensor> quantize_seeded_stats(const at::Tensor& x, int64_t total_bits,
                                                         int64_t frac_bits, Str rounding,
                                                         int64_t seed, int64_t offset,
                                                         Str overflow) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, int64_t, Str, int64_t, int64_t, Str)>(
      "fxp::quantize_seeded_stats");
  return op.call(x, total_bits, frac_bits, rounding, seed, offset, overflow);
}

at::Tensor qpu_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         double lr, double momentum, double weight_decay, bool nesterov,
                         int64_t total_bits, int64_t frac_bits, int64_t momentum_total_bits,
                         int64_t momentum_frac_bits, Str rounding, int64_t seed, int64_t step,
                         Str momentum_form, at::OptionalIntArrayRef stream_indices) {
  static const auto op =
      find_op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double, double, double, bool,
                         int64_t, int64_t, int64_t, int64_t, Str, int64_t, int64_t, Str, at::OptionalIntArrayRef)>(
          "fxp::qpu_sgd_step_");
  return op.call(params, grads, momentum_buffers, lr, momentum, weight_decay, nesterov, total_bits,
                 frac_bits, momentum_total_bits, momentum_frac_bits, rounding, seed, step,
                 momentum_form, stream_indices);
}

at::Tensor pack(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, Str rounding, Str overflow,
                const Generator& generator) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, Str, Str, const Generator&)>("fxp::pack");
  return op.call(x, total_bits, frac_bits, rounding, overflow, generator);
}

at::Tensor pack_seeded(const at::Tensor& x, int64_t total_bits, int64_t frac_bits, Str rounding, int64_t seed,
                       int64_t offset, Str overflow) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, Str, int64_t, int64_t, Str)>("fxp::pack_seeded");
  return op.call(x, total_bits, frac_bits, rounding, seed, offset, overflow);
}

at::Tensor unpack(const at::Tensor& codes, int64_t total_bits, int64_t frac_bits,
                  std::optional<at::ScalarType> dtype) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, int64_t, int64_t, std::optional<at::ScalarType>)>("fxp::unpack");
  return op.call(codes, total_bits, frac_bits, dtype);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                  const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                  at::OptionalIntArrayRef output_format, Str output_rounding, const Generator& generator) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         at::OptionalIntArrayRef, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         at::OptionalIntArrayRef, at::OptionalIntArrayRef, Str, const Generator&)>("fxp::linear");
  return op.call(x, weight, bias, input_format, weight_codes, bias_codes, param_format, output_format,
                 output_rounding, generator);
}

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                  at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                  const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                  at::OptionalIntArrayRef output_format, Str output_rounding, const Generator& generator) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                         at::IntArrayRef, at::IntArrayRef, int64_t, at::OptionalIntArrayRef,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         at::OptionalIntArrayRef, at::OptionalIntArrayRef, Str, const Generator&)>("fxp::conv2d");
  return op.call(x, weight, bias, stride, padding, dilation, groups, input_format, weight_codes, bias_codes,
                 param_format, output_format, output_rounding, generator);
}

at::Tensor relu_max_pool2d(const at::Tensor& x, at::IntArrayRef kernel_size) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, at::IntArrayRef)>("fxp::relu_max_pool2d");
  return op.call(x, kernel_size);
}

std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_with_positions(const at::Tensor& x, at::IntArrayRef kernel_size) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef)>(
      "fxp::relu_max_pool2d_with_positions");
  return op.call(x, kernel_size);
}

at::Tensor relu_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& positions,
                                    at::IntArrayRef kernel_size, c10::SymIntArrayRef input_size) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, c10::SymIntArrayRef)>(
          "fxp::relu_max_pool2d_backward");
  return op.call(grad_out, positions, kernel_size, input_size);
}

}  // namespace fxp
