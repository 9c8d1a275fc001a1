// MSQ's RoundClamp ops' registrations: CPU, Meta and Autograd (CUDA in
// round_clamp_register_cuda.cpp). The ops are written once in round_clamp_op.h.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/backend.h"
#include "ops/not_differentiable.h"
#include "ops/ops.h"
#include "ops/round_clamp/round_clamp_op.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr auto launch = &kernels::round_clamp_cpu;
  static constexpr auto backward = &kernels::round_clamp_backward_cpu;
};

// Shapes and checks only (the kernels it names are never called).
struct MetaBackend : CpuBackend {
  static constexpr bool kIsMeta = true;
};

// --- autograd: straight through (Note [RoundClamp]), in C++ so that
// fxp-train and Python get the same gradient ---------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RoundClampFunction : public torch::autograd::Function<RoundClampFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& w, double scale, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [quantized, lsb_l1, lsb_nonzero] = round_clamp(w, scale, bits);
    ctx->save_for_backward({w});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["bits"] = bits;
    ctx->mark_non_differentiable({lsb_nonzero});
    return {quantized, lsb_l1, lsb_nonzero};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor w = ctx->get_saved_variables()[0];
    const at::Tensor& grad_quantized = grads[0];
    const at::Tensor& grad_lsb_l1 = grads[1];
    at::Tensor grad_w;
    if (!grad_lsb_l1.defined()) {
      grad_w = grad_quantized;  // the quantizer alone: the identity
    } else {
      grad_w = round_clamp_backward(grad_quantized.defined() ? grad_quantized : at::zeros_like(w), grad_lsb_l1, w,
                                    ctx->saved_data["scale"].toDouble(), ctx->saved_data["bits"].toInt());
    }
    return {grad_w, at::Tensor(), at::Tensor()};
  }
};

class RoundClampLsbFunction : public torch::autograd::Function<RoundClampLsbFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& w, double scale, int64_t bits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return round_clamp_lsb(w, scale, bits);
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], at::Tensor(), at::Tensor()}; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> round_clamp_autograd(const at::Tensor& w, double scale, int64_t bits) {
  auto out = RoundClampFunction::apply(w, scale, bits);
  return {out[0], out[1], out[2]};
}

at::Tensor round_clamp_lsb_autograd(const at::Tensor& w, double scale, int64_t bits) {
  return RoundClampLsbFunction::apply(w, scale, bits);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_ROUND_CLAMP_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_ROUND_CLAMP_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  m.impl("round_clamp", &round_clamp_autograd);
  m.impl("round_clamp_lsb", &round_clamp_lsb_autograd);
  register_not_differentiable(m, {"round_clamp_codes", "round_clamp_backward"});
}

}  // namespace fxp
