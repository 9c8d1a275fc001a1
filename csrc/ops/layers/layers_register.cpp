// Autograd kernels of fxp::linear and fxp::conv2d.
//
// Note [Packed saved inputs]
// The backward needs the layer input (for the weight gradient) and the weight
// (for the input gradient). With input_format, the input is saved as codes
// (fxp::pack with rounding "exact": the input must lie on that grid, as a
// quantized activation does, and an input off the grid is an error, because
// its codes would give the weight gradient of another input; with
// pack_counts, such inputs and NaN are counted there instead, Note [Deferred
// pack checks]); with weight_codes, the weight is saved as its codes. Codes are kept at their
// width (Note [Bit-stream storage]: a 12-bit input costs 12 bits per element,
// and weight codes are saved in the form the layer stores them). The backward
// decodes and unpacks them
// and calls what ATen's own derivatives call (mm in addmm's formulas,
// at::sum_to for the bias, at::convolution_backward), on equal values, so the
// gradients equal torch's bit for bit.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/bit_pack/code_storage.h"
#include "ops/layers/layers_op.h"
#include "ops/ops.h"

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
  // x as codes of format, which x must lie on: checked now, or counted into
  // pack_counts for the caller to check (Note [Deferred pack checks]). The
  // Function writes pack_counts without mark_dirty: int64 never requires grad,
  // so autograd has nothing to track, and pack.counted bumps its version.
  static at::Tensor pack_on_grid(const char* op, const at::Tensor& x, const OptionalFormat& format,
                                 const std::optional<at::Tensor>& pack_counts) {
    if (defined(pack_counts)) {
      return pack_counted(x, format.total_bits, format.frac_bits, "exact", "saturate", std::nullopt, *pack_counts);
    }
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
                   const std::optional<at::Tensor>& weight_codes, const OptionalFormat& param_format,
                   const std::optional<at::Tensor>& pack_counts, bool save_x, bool save_w) {
    at::Tensor saved_x, saved_w;
    // Note [Bit-stream storage]: input codes are saved as a stream where their
    // width calls for one (pack's codes are in range: no check, no read-back).
    if (save_x) {
      saved_x = input_format.present ? store_codes(pack_on_grid(op, x, input_format, pack_counts),
                                                   input_format.total_bits, /*check_range=*/false)
                                     : x;
    }
    if (save_w) saved_w = defined(weight_codes) ? *weight_codes : weight;
    ctx->save_for_backward({saved_x, saved_w});
    ctx->saved_data["x_format"] = std::vector<int64_t>{input_format.present, input_format.total_bits,
                                                       input_format.frac_bits};
    ctx->saved_data["w_format"] = std::vector<int64_t>{defined(weight_codes), param_format.total_bits,
                                                       param_format.frac_bits};
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["w_sizes"] = weight.sizes().vec();
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
    // The forward checked (weight codes) or made (input codes) what it saved.
    auto restore_one = [&](const at::Tensor& t, const char* format_key, const char* sizes_key) {
      const auto f = ctx->saved_data[format_key].toIntVector();
      if (!t.defined() || !f[0]) return t;
      return unpack(load_codes(t, f[1], ctx->saved_data[sizes_key].toIntVector()), f[1], f[2], dtype);
    };
    return {restore_one(saved[0], "x_format", "x_sizes"), restore_one(saved[1], "w_format", "w_sizes")};
  }
};

// Each layer op's arguments, by position in its schema (and in its C++ entry
// point, ops.h, whose type the autograd kernel takes).
struct LinearArgs {
  static constexpr const char* kOp = "fxp::linear";
  static constexpr size_t kInputFormat = 3, kWeightCodes = 4, kParamFormat = 6, kPackCounts = 10, kCount = 11;
};
struct Conv2dArgs {
  static constexpr const char* kOp = "fxp::conv2d";
  static constexpr size_t kStride = 3, kPadding = 4, kDilation = 5, kGroups = 6;
  static constexpr size_t kInputFormat = 7, kWeightCodes = 8, kParamFormat = 10, kPackCounts = 14, kCount = 15;
};

// Runs the op's forward below the autograd key and saves what its backward needs.
template <class A, auto Entry, class... Args>
at::Tensor forward_and_save(AutogradContext* ctx, bool save_x, bool save_w, const Args&... args) {
  const auto a = std::forward_as_tuple(args...);
  const at::Tensor& x = std::get<0>(a);
  const at::Tensor& weight = std::get<1>(a);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = Entry(args...);
  }
  SavedInputs::save(A::kOp, ctx, x, weight, std::get<2>(a), parse_format(A::kOp, "input_format", std::get<A::kInputFormat>(a)),
                    std::get<A::kWeightCodes>(a), parse_format(A::kOp, "param_format", std::get<A::kParamFormat>(a)),
                    std::get<A::kPackCounts>(a), save_x, save_w);
  return out;
}

// The output quantization, if any, is straight-through: the backward ignores it.
class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  template <class... Args>
  static at::Tensor forward(AutogradContext* ctx, const Args&... args) {
    const auto a = std::forward_as_tuple(args...);
    // As ATen's mm derivatives: the input only for the weight gradient, the weight only for the input's.
    return forward_and_save<LinearArgs, &fxp::linear>(ctx, std::get<1>(a).requires_grad(),
                                                      std::get<0>(a).requires_grad(), args...);
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
    variable_list grads(LinearArgs::kCount);  // only x, weight and bias are differentiable
    grads[0] = grad_x, grads[1] = grad_w, grads[2] = grad_b;
    return grads;
  }
};

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  template <class... Args>
  static at::Tensor forward(AutogradContext* ctx, const Args&... args) {
    const auto a = std::forward_as_tuple(args...);
    // convolution_backward takes both, whichever gradient is asked for.
    at::Tensor out = forward_and_save<Conv2dArgs, &fxp::conv2d>(ctx, true, true, args...);
    ctx->saved_data["stride"] = std::get<Conv2dArgs::kStride>(a).vec();
    ctx->saved_data["padding"] = std::get<Conv2dArgs::kPadding>(a).vec();
    ctx->saved_data["dilation"] = std::get<Conv2dArgs::kDilation>(a).vec();
    ctx->saved_data["groups"] = std::get<Conv2dArgs::kGroups>(a);
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
    variable_list grads(Conv2dArgs::kCount);  // only x, weight and bias are differentiable
    grads[0] = grad_x, grads[1] = grad_w, grads[2] = grad_b;
    return grads;
  }
};

// The Autograd kernel of a layer op, over the arguments of its C++ entry point
// (pack_counts last, absent for the plain overload): inference saves and
// packs nothing; otherwise the Function records the graph.
template <auto Entry, class Function, class... Args>
at::Tensor layer_autograd(const Args&... args) {
  const auto a = std::forward_as_tuple(args...);
  if (!any_requires_grad(std::get<0>(a), std::get<1>(a), std::get<2>(a))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Entry(args...);
  }
  return Function::apply(args...);
}

// The kernels of the two overloads of one op (ops.h's entry point picks the overload again below the autograd).
template <auto Entry, class Function, class... Args>
at::Tensor plain_autograd(Args... args) {
  return layer_autograd<Entry, Function>(args..., std::optional<at::Tensor>());
}
template <auto Entry, class Function, class... Args>
at::Tensor counted_autograd(Args... args, const at::Tensor& pack_counts) {
  return layer_autograd<Entry, Function>(args..., std::optional<at::Tensor>(pack_counts));
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  m.impl("linear", &plain_autograd<&fxp::linear, LinearFunction, FXP_LINEAR_ARGS>);
  m.impl("linear.counted", &counted_autograd<&fxp::linear, LinearFunction, FXP_LINEAR_ARGS>);
  m.impl("conv2d", &plain_autograd<&fxp::conv2d, Conv2dFunction, FXP_CONV2D_ARGS>);
  m.impl("conv2d.counted", &counted_autograd<&fxp::conv2d, Conv2dFunction, FXP_CONV2D_ARGS>);
}

}  // namespace fxp
