// Autograd kernels of fxp::linear and fxp::conv2d.
//
// Note [Packed saved inputs]
// The backward needs the layer input (for the weight gradient) and the weight
// (for the input gradient). With input_format, the input is saved as codes
// (fxp::pack with rounding "exact": the input must lie on that grid, as a
// quantized activation does, and an input off the grid is an error, because
// its codes would give the weight gradient of another input); with
// weight_codes, the weight is saved as its codes. The backward unpacks them
// and calls what ATen's own derivatives call (mm in addmm's formulas,
// at::sum_to for the bias, at::convolution_backward), on equal values, so the
// gradients equal torch's bit for bit.
#include <torch/autograd.h>
#include <torch/library.h>

#include "layers.h"
#include "ops.h"

namespace fxp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

bool any_requires_grad(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || weight.requires_grad() || (defined(bias) && bias->requires_grad()));
}

// What the forward saves: the input (packed or not) and the weight (its codes
// or itself), with what it takes to restore them.
struct SavedInputs {
  // x as codes of format, which x must lie on.
  static at::Tensor pack_on_grid(const char* op, const at::Tensor& x, const OptionalFormat& format) {
    try {
      return pack(x, format.total_bits, format.frac_bits, "exact");
    } catch (const c10::ValueError& e) {
      TORCH_CHECK_VALUE(false, op, ": input_format promises an input on the grid of FxP(", format.total_bits, ",",
                        format.frac_bits, ") (a quantized activation), which the autograd saves as codes; but ",
                        e.what_without_backtrace());
    }
  }

  static void save(const char* op, AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const OptionalFormat& input_format,
                   const std::optional<at::Tensor>& weight_codes, const OptionalFormat& param_format, bool save_x,
                   bool save_w) {
    at::Tensor saved_x, saved_w;
    if (save_x) saved_x = input_format.present ? pack_on_grid(op, x, input_format) : x;
    if (save_w) saved_w = defined(weight_codes) ? *weight_codes : weight;
    ctx->save_for_backward({saved_x, saved_w});
    ctx->saved_data["x_format"] = std::vector<int64_t>{input_format.present, input_format.total_bits,
                                                       input_format.frac_bits};
    ctx->saved_data["w_format"] = std::vector<int64_t>{defined(weight_codes), param_format.total_bits,
                                                       param_format.frac_bits};
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    if (defined(bias)) ctx->saved_data["bias_sizes"] = bias->sizes().vec();
  }

  // The bias's sizes, if the layer had a bias.
  static std::optional<std::vector<int64_t>> bias_sizes(AutogradContext* ctx) {
    const auto it = ctx->saved_data.find("bias_sizes");
    if (it == ctx->saved_data.end()) return std::nullopt;
    return it->second.toIntVector();
  }

  static std::pair<at::Tensor, at::Tensor> restore(AutogradContext* ctx) {
    const auto saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    auto restore_one = [&](const at::Tensor& t, const char* key) {
      const auto f = ctx->saved_data[key].toIntVector();
      return t.defined() && f[0] ? unpack(t, f[1], f[2], dtype) : t;
    };
    return {restore_one(saved[0], "x_format"), restore_one(saved[1], "w_format")};
  }
};

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::OptionalIntArrayRef input_format,
                            const std::optional<at::Tensor>& weight_codes,
                            const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                            at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                            const std::optional<at::Generator>& generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The output quantization, if any, is straight-through: the backward ignores it.
    at::Tensor out = linear_forward(x, weight, bias, input_format, weight_codes, bias_codes, param_format,
                                    output_format, output_rounding, generator);
    // As ATen's mm derivatives: the input only for the weight gradient, the weight only for the input's.
    SavedInputs::save("fxp::linear", ctx, x, weight, bias, parse_format("fxp::linear", "input_format", input_format),
                      weight_codes, parse_format("fxp::linear", "param_format", param_format),
                      weight.requires_grad(), x.requires_grad());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    auto [x, w] = SavedInputs::restore(ctx);
    at::Tensor grad_x, grad_w, grad_b;
    const int64_t out_features = g.size(-1);
    const bool two_d = g.dim() == 2;
    const at::Tensor g2 = two_d ? g : g.reshape({-1, out_features});
    if (ctx->needs_input_grad(0)) {
      // addmm's mat1 gradient: grad.mm(mat2.t()) with mat2 = weight.t().
      grad_x = g2.mm(w);
      if (!two_d) {
        std::vector<int64_t> sizes = g.sizes().vec();
        sizes.back() = w.size(1);  // in_features
        grad_x = grad_x.view(sizes);
      }
    }
    if (ctx->needs_input_grad(1)) {
      // addmm's mat2 gradient for the column-major weight.t(): grad.t().mm(mat1).t(), then transposed back.
      grad_w = g2.t().mm(two_d ? x : x.reshape({-1, x.size(-1)}));
    }
    const auto bias = SavedInputs::bias_sizes(ctx);
    if (bias && ctx->needs_input_grad(2)) grad_b = at::sum_to(g, *bias);
    variable_list grads(10);  // one per forward argument; only x, weight and bias are differentiable
    grads[0] = grad_x, grads[1] = grad_w, grads[2] = grad_b;
    return grads;
  }
};

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, at::OptionalIntArrayRef input_format,
                            const std::optional<at::Tensor>& weight_codes,
                            const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                            at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                            const std::optional<at::Generator>& generator) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = conv2d_forward(x, weight, bias, stride, padding, dilation, groups, input_format, weight_codes,
                                    bias_codes, param_format, output_format, output_rounding, generator);
    // convolution_backward takes both, whichever gradient is asked for.
    SavedInputs::save("fxp::conv2d", ctx, x, weight, bias, parse_format("fxp::conv2d", "input_format", input_format),
                      weight_codes, parse_format("fxp::conv2d", "param_format", param_format), true, true);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto [x, w] = SavedInputs::restore(ctx);
    const auto bias = SavedInputs::bias_sizes(ctx);
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   bias.has_value() && ctx->needs_input_grad(2)};
    auto [grad_x, grad_w, grad_b] = at::convolution_backward(
        grad_outputs[0], x, w, bias ? at::OptionalIntArrayRef(*bias) : std::nullopt,
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), /*transposed=*/false, /*output_padding=*/{0, 0},
        ctx->saved_data["groups"].toInt(), mask);
    variable_list grads(14);  // one per forward argument; only x, weight and bias are differentiable
    grads[0] = grad_x, grads[1] = grad_w, grads[2] = grad_b;
    return grads;
  }
};

// Note [Fused ReLU and max-pool]
// Autograd of max_pool2d(relu(x)) keeps relu's float output and the pool's
// int64 indices: 12 bytes per input element for 2x2 windows. With
// non-overlapping windows the gradient only needs, per output, where in its
// window the maximum was and whether it was positive: one byte. The backward
// rebuilds what ATen's does: the pool's backward adds the output gradient to
// a zero (0 + g, so -0 becomes +0), and relu's keeps it where the maximum is
// positive; every other input gets +0. The kernels are in kernels/pool*.
class ReluMaxPool2dFunction : public torch::autograd::Function<ReluMaxPool2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef kernel_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, positions] = relu_max_pool2d_with_positions(x, kernel_size);
    ctx->save_for_backward({positions});
    ctx->saved_data["input_sizes"] = x.sizes().vec();
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto sizes = ctx->saved_data["input_sizes"].toIntVector();
    const at::Tensor grad_x =
        relu_max_pool2d_backward(grad_outputs[0], ctx->get_saved_variables()[0],
                                 ctx->saved_data["kernel_size"].toIntVector(), c10::fromIntArrayRefSlow(sizes));
    return {grad_x, at::Tensor()};
  }
};

at::Tensor relu_max_pool2d_autograd(const at::Tensor& x, at::IntArrayRef kernel_size) {
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(relu_max_pool2d_with_positions(x, kernel_size));
  }
  return ReluMaxPool2dFunction::apply(x, kernel_size);
}

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                           const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                           at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                           const std::optional<at::Generator>& generator) {
  if (!any_requires_grad(x, weight, bias)) {  // inference: nothing to save, nothing to pack
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_forward(x, weight, bias, input_format, weight_codes, bias_codes, param_format, output_format,
                          output_rounding, generator);
  }
  return LinearFunction::apply(x, weight, bias, input_format, weight_codes, bias_codes, param_format, output_format,
                               output_rounding, generator);
}

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           at::OptionalIntArrayRef input_format, const std::optional<at::Tensor>& weight_codes,
                           const std::optional<at::Tensor>& bias_codes, at::OptionalIntArrayRef param_format,
                           at::OptionalIntArrayRef output_format, c10::string_view output_rounding,
                           const std::optional<at::Generator>& generator) {
  if (!any_requires_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return conv2d_forward(x, weight, bias, stride, padding, dilation, groups, input_format, weight_codes, bias_codes,
                          param_format, output_format, output_rounding, generator);
  }
  return Conv2dFunction::apply(x, weight, bias, stride, padding, dilation, groups, input_format, weight_codes,
                               bias_codes, param_format, output_format, output_rounding, generator);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("conv2d", &conv2d_autograd);
  m.impl("relu_max_pool2d", &relu_max_pool2d_autograd);
}

}  // namespace fxp
