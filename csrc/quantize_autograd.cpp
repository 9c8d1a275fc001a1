// Autograd kernel of quantize_ste: the straight-through estimator, in C++ so
// that C++ programs (fxp-train) get the same gradient as Python.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops.h"

namespace fxp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class QuantizeSTE : public torch::autograd::Function<QuantizeSTE> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t total_bits,
                            int64_t frac_bits, c10::string_view rounding, c10::string_view overflow,
                            const std::optional<at::Generator>& generator,
                            bool zero_grad_saturated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (!zero_grad_saturated) {
      return quantize(x, total_bits, frac_bits, rounding, overflow, generator);
    }
    auto [out, saturated] = quantize_mask(x, total_bits, frac_bits, rounding, overflow, generator);
    ctx->save_for_backward({saturated});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    at::Tensor grad = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    if (!saved.empty()) grad = grad.masked_fill(saved[0], 0);
    // One entry per forward argument; only x is differentiable.
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor quantize_ste_autograd(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                 c10::string_view rounding, c10::string_view overflow,
                                 const std::optional<at::Generator>& generator,
                                 bool zero_grad_saturated) {
  return QuantizeSTE::apply(x, total_bits, frac_bits, rounding, overflow, generator,
                            zero_grad_saturated);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, Autograd, m) { m.impl("quantize_ste", &quantize_ste_autograd); }

}  // namespace fxp
