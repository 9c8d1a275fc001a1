// AdaPT's per-step ops (layer_gradient_norms, normalize_accumulate_,
// adapt_sgd_step_), written once over a Backend (norms, normalize, sgd,
// DeviceGuard, kIsMeta), like histogram_op.h. The kernels are in kernels/adapt_step.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>

#include "adapt_step/adapt_step_kernel.h"
#include "ops/aliasing.h"

namespace fxp {

namespace adapt_step_detail {

struct Named {
  at::TensorList tensors;
  const char* name;
};

// Every list as long as `layers`, its tensors float32 or float64, each shaped
// and typed as the first list's tensor k and on its device, contiguous (on
// real backends); layers in [0, num_layers).
inline void check_lists(const char* op, std::initializer_list<Named> lists, c10::ArrayRef<int64_t> layers,
                        int64_t num_layers, bool check_memory) {
  TORCH_CHECK(num_layers >= 0, op, ": num_layers must not be negative, but got ", num_layers);
  const Named& first = *lists.begin();
  for (const Named& list : lists) {
    TORCH_CHECK(list.tensors.size() == layers.size(), op, ": expected one layer index per tensor, but ", list.name,
                " has ", list.tensors.size(), " tensors and layers ", layers.size());
  }
  for (size_t k = 0; k < layers.size(); ++k) {
    TORCH_CHECK(layers[k] >= 0 && layers[k] < num_layers, op, ": layers[", k, "] is ", layers[k],
                ", outside [0, ", num_layers, ")");
    const at::Tensor& ref = first.tensors[k];
    TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op, ": ", first.name, "[", k,
                "] must be float32 or float64, but got ", ref.scalar_type());
    TORCH_CHECK(ref.device() == first.tensors[0].device(), op, ": ", first.name, "[", k, "] is on ", ref.device(),
                " but ", first.name, "[0] is on ", first.tensors[0].device(), "; all tensors must share one device");
    for (const Named& list : lists) {
      const at::Tensor& t = list.tensors[k];
      TORCH_CHECK(t.device() == ref.device(), op, ": ", list.name, "[", k, "] is on ", t.device(), " but ",
                  first.name, "[", k, "] is on ", ref.device());
      TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", list.name, "[", k, "] has dtype ", t.scalar_type(),
                  " but ", first.name, "[", k, "] has ", ref.scalar_type());
      TORCH_CHECK(t.sym_sizes() == ref.sym_sizes(), op, ": ", list.name, "[", k, "] has shape ", t.sym_sizes(), " but ",
                  first.name, "[", k, "] has ", ref.sym_sizes());
      if (check_memory) TORCH_CHECK(t.is_contiguous(), op, ": ", list.name, "[", k, "] must be contiguous");
    }
  }
}

inline void check_l1(const char* op, double l1) {
  TORCH_CHECK(l1 >= 0 && std::isfinite(l1), op, ": l1 must be a non-negative finite number, but got ", l1);
}

// norms: float64 of shape [num_layers] on the tensors' device; returns num_layers.
inline int64_t check_norms(const char* op, const at::Tensor& norms, at::TensorList like) {
  TORCH_CHECK(norms.scalar_type() == at::kDouble && norms.dim() == 1, op,
              ": norms must be float64 of shape [num_layers] (one per layer), but got ", norms.scalar_type(),
              " of shape ", norms.sizes());
  TORCH_CHECK(norms.is_contiguous(), op, ": norms must be contiguous (the kernels index it by layer)");
  if (!like.empty()) {
    TORCH_CHECK(norms.device() == like[0].device(), op, ": norms is on ", norms.device(), " but the tensors on ",
                like[0].device());
  }
  return norms.size(0);
}

}  // namespace adapt_step_detail

template <class Backend>
struct AdaptStepOps {
  static at::Tensor layer_gradient_norms(at::TensorList params, at::TensorList grads, at::IntArrayRef layers,
                                         int64_t num_layers, double l1) {
    constexpr const char* op = "fxp::layer_gradient_norms";
    using namespace adapt_step_detail;
    check_lists(op, {{grads, "grads"}, {params, "params"}}, layers, num_layers, !Backend::kIsMeta);
    check_l1(op, l1);
    const auto options = at::TensorOptions(at::kDouble).device(grads.empty() ? c10::Device(Backend::kDevice)
                                                                              : grads[0].device());
    at::Tensor norms = at::zeros({num_layers}, options);
    if constexpr (!Backend::kIsMeta) {
      if (!grads.empty()) {
        typename Backend::DeviceGuard guard(grads[0].device());
        Backend::norms(params, grads, layers, l1, norms);
      }
    }
    return norms;
  }

  static void normalize_accumulate(at::TensorList grads, at::TensorList accumulated, at::TensorList params,
                                   const at::Tensor& norms, at::IntArrayRef layers, double l1) {
    constexpr const char* op = "fxp::normalize_accumulate_";
    using namespace adapt_step_detail;
    const int64_t num_layers = check_norms(op, norms, grads);
    check_lists(op, {{grads, "grads"}, {accumulated, "accumulated"}, {params, "params"}}, layers, num_layers,
                !Backend::kIsMeta);
    check_l1(op, l1);
    if constexpr (!Backend::kIsMeta) {
      check_no_aliasing(op, {{grads, "grads", true}, {accumulated, "accumulated", true}, {params, "params", false}});
      if (!grads.empty()) {
        typename Backend::DeviceGuard guard(grads[0].device());
        Backend::normalize(grads, accumulated, params, norms, layers, l1);
      }
    }
  }

  static void adapt_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                             at::TensorList accumulated, const at::Tensor& norms, at::IntArrayRef layers, double l1,
                             double lr, double momentum, double weight_decay, bool nesterov) {
    constexpr const char* op = "fxp::adapt_sgd_step_";
    using namespace adapt_step_detail;
    const int64_t num_layers = check_norms(op, norms, params);
    const bool has_momentum = momentum != 0;
    TORCH_CHECK(lr >= 0 && std::isfinite(lr), op, ": lr must be a non-negative finite number, but got ", lr);
    TORCH_CHECK(momentum >= 0 && std::isfinite(momentum), op,
                ": momentum must be a non-negative finite number, but got ", momentum);
    TORCH_CHECK(weight_decay >= 0 && std::isfinite(weight_decay), op,
                ": weight_decay must be a non-negative finite number, but got ", weight_decay);
    TORCH_CHECK(!nesterov || has_momentum, op, ": nesterov needs momentum > 0");
    TORCH_CHECK(momentum_buffers.size() == (has_momentum ? params.size() : 0), op,
                has_momentum ? ": momentum > 0 needs one momentum buffer per param ("
                             : ": momentum == 0 takes no momentum buffers (",
                has_momentum ? params.size() : 0, "), but got ", momentum_buffers.size());
    if (has_momentum) {
      check_lists(op, {{params, "params"}, {grads, "grads"}, {accumulated, "accumulated"},
                       {momentum_buffers, "momentum_buffers"}},
                  layers, num_layers, !Backend::kIsMeta);
    } else {
      check_lists(op, {{params, "params"}, {grads, "grads"}, {accumulated, "accumulated"}}, layers, num_layers,
                  !Backend::kIsMeta);
    }
    check_l1(op, l1);
    if constexpr (!Backend::kIsMeta) {
      check_no_aliasing(op, {{params, "params", true}, {grads, "grads", false}, {accumulated, "accumulated", true},
                             {momentum_buffers, "momentum_buffers", true}});
      if (!params.empty()) {
        typename Backend::DeviceGuard guard(params[0].device());
        Backend::sgd(params, grads, momentum_buffers, accumulated, norms, layers, l1,
                     kernels::SgdHyper{lr, momentum, weight_decay, nesterov});
      }
    }
  }
};

#define FXP_REGISTER_ADAPT_STEP_OPS(m, Backend)                                                   \
  (m).impl("layer_gradient_norms", &::fxp::AdaptStepOps<Backend>::layer_gradient_norms);         \
  (m).impl("normalize_accumulate_", &::fxp::AdaptStepOps<Backend>::normalize_accumulate);        \
  (m).impl("adapt_sgd_step_", &::fxp::AdaptStepOps<Backend>::adapt_sgd_step)

}  // namespace fxp
