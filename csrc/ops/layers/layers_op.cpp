// The forward of fxp::linear and fxp::conv2d, for every backend: ATen ops and
// fxp::unpack, so CPU, CUDA and Meta all run through here.
#include <torch/library.h>

#include <string>
#include <utility>

#include "ops/bit_pack/code_storage.h"
#include "ops/layers/layers_op.h"
#include "ops/ops.h"
#include "ops/format_args.h"
#include "ops/quantize/quantize_args.h"

namespace fxp {

OptionalFormat parse_format(const char* op, const char* name, at::OptionalIntArrayRef format) {
  OptionalFormat f;
  if (!format.has_value()) return f;
  TORCH_CHECK(format->size() == 2, op, ": ", name, " must be [total_bits, frac_bits], but got ", *format);
  check_fxp_format(op, (*format)[0], (*format)[1]);
  return OptionalFormat{true, (*format)[0], (*format)[1]};
}

namespace {

// The float value of a weight or bias: unpacked from codes when they are given.
at::Tensor layer_value(const char* op, const char* name, const at::Tensor& value,
                       const std::optional<at::Tensor>& codes, const OptionalFormat& param_format) {
  if (!codes.has_value() || !codes->defined()) return value;
  const std::string codes_name = std::string(name) + "_codes";
  // Named here: unpack's own check would speak of fxp::unpack and its "codes".
  const at::ScalarType expected = packed_dtype(static_cast<int>(param_format.total_bits));
  TORCH_CHECK(codes->scalar_type() == expected || is_bit_stream(*codes), op, ": ", codes_name, " of FxP(",
              param_format.total_bits, ",", param_format.frac_bits, ") must be ", expected,
              " codes or a uint8 bit stream of them, but got ", codes->scalar_type());
  check_stored_codes(op, codes_name.c_str(), *codes, param_format.total_bits, value.sym_sizes());
  if (!is_bit_stream(*codes)) return unpack(*codes, param_format.total_bits, param_format.frac_bits, value.scalar_type());
  // Note [Bit-stream storage]: a stream is decoded for this call only. Traced
  // with symbolic shapes (fake tensors), the op only needs the value's shape.
  const std::optional<at::IntArrayRef> sizes = c10::asIntArrayRefSlowOpt(value.sym_sizes());
  if (!sizes.has_value()) return at::empty_symint(value.sym_sizes(), value.options());
  return unpack(load_codes(*codes, param_format.total_bits, *sizes), param_format.total_bits, param_format.frac_bits,
                value.scalar_type());
}

// Checks dtypes and the pairing of codes with param_format.
void check_layer_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight_codes,
                      const std::optional<at::Tensor>& bias_codes, const OptionalFormat& param_format) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, but got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (", x.scalar_type(),
              "), but got ", weight.scalar_type());
  // A meta weight beside a CPU x once gave a CPU result of uninitialized memory.
  check_same_device(op, x, weight, "weight");
  for (const auto& [tensor, name] : {std::pair{&bias, "bias"}, {&weight_codes, "weight_codes"},
                                     {&bias_codes, "bias_codes"}}) {
    if (tensor->has_value() && (*tensor)->defined()) check_same_device(op, x, **tensor, name);
  }
  const bool has_weight_codes = weight_codes.has_value() && weight_codes->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_bias_codes = bias_codes.has_value() && bias_codes->defined();
  TORCH_CHECK(has_weight_codes == param_format.present, op,
              ": weight_codes and param_format go together (packed weights); got ",
              has_weight_codes ? "weight_codes without param_format" : "param_format without weight_codes");
  TORCH_CHECK(!has_bias_codes || has_bias, op, ": bias_codes needs bias");
  TORCH_CHECK(has_bias_codes == (has_weight_codes && has_bias), op,
              ": with packed weights a bias must be packed too (bias_codes), and only then");
}

// The checked float weight and bias of a layer op: from codes when given.
std::pair<at::Tensor, std::optional<at::Tensor>> layer_weights(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
    const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
    const std::optional<at::Tensor>& pack_counts) {
  parse_format(op, "input_format", input_format);  // validated here; the autograd uses them
  if (pack_counts.has_value() && pack_counts->defined()) check_pack_count_tensor(op, x, *pack_counts);
  const OptionalFormat p_fmt = parse_format(op, "param_format", param_format);
  check_layer_args(op, x, weight, bias, weight_codes, bias_codes, p_fmt);
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = layer_value(op, "bias", *bias, bias_codes, p_fmt);
  return {layer_value(op, "weight", weight, weight_codes, p_fmt), b};
}

// The layer's output quantization, in place on the fresh output (the same
// generator draws as quantize_ste would take).
at::Tensor quantize_output(const char* op, at::Tensor y, at::OptionalIntArrayRef output_format,
                           c10::string_view output_rounding, const std::optional<at::Generator>& generator) {
  const OptionalFormat fmt = parse_format(op, "output_format", output_format);
  // Checked with or without a format, under the op's name (quantize_ would name itself).
  const std::string rounding_op = std::string(op) + " output_rounding";
  parse_rounding(rounding_op.c_str(), output_rounding);
  if (fmt.present) quantize_(y, fmt.total_bits, fmt.frac_bits, output_rounding, "saturate", generator);
  return y;
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                          const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                          at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                          const std::optional<at::Generator>& generator, const std::optional<at::Tensor>& pack_counts) {
  const auto [w, b] = layer_weights("fxp::linear", x, weight, bias, input_format, weight_codes, bias_codes,
                                    param_format, pack_counts);
  return quantize_output("fxp::linear", at::linear(x, w, b), output_format, output_rounding, generator);
}

at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                          const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                          at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                          const std::optional<at::Generator>& generator, const std::optional<at::Tensor>& pack_counts) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4,
              "fxp::conv2d: expected a 4-D x (N, C, H, W) and a 4-D weight, but got ", x.dim(), "-D and ",
              weight.dim(), "-D");
  const auto [w, b] =
      layer_weights("fxp::conv2d", x, weight, bias, input_format, weight_codes, bias_codes, param_format, pack_counts);
  // What torch.conv2d computes (at::convolution), so gradients match its autograd.
  return quantize_output(
      "fxp::conv2d",
      at::convolution(x, w, b, stride, padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups),
      output_format, output_rounding, generator);
}

// Each op's two overloads (without and with pack_counts) as one forward.
template <auto Forward, class... Args>
at::Tensor without_counts(Args... args) {
  return Forward(args..., std::nullopt);
}
template <auto Forward, class... Args>
at::Tensor with_counts(Args... args, const at::Tensor& pack_counts) {
  return Forward(args..., pack_counts);
}

}  // namespace

// The forwards run on every backend (ATen ops and fxp's own); the autograd
// (layers_register.cpp) calls them below the autograd key.
TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) {
  m.impl("linear", &without_counts<&linear_forward, FXP_LINEAR_ARGS>);
  m.impl("linear.counted", &with_counts<&linear_forward, FXP_LINEAR_ARGS>);
  m.impl("conv2d", &without_counts<&conv2d_forward, FXP_CONV2D_ARGS>);
  m.impl("conv2d.counted", &with_counts<&conv2d_forward, FXP_CONV2D_ARGS>);
}

}  // namespace fxp
