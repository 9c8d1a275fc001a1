// AdaPT's per-step gradient work (L1, Eq. 3.4, Eq. 3.5's accumulation) and
// its fusion with the float SGD step: compute only. csrc/ops/adapt_step
// validates the lists and registers the ops; Note [AdaPT's fused step]
// (csrc/adapt/precision_controller.cpp) says how the controller uses them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "adapt_step/adapt_step_math.h"

namespace fxp::kernels {

// Where each tensor's chunk sums go (Note [Deterministic gradient norms]):
// a layer's sums are contiguous, its tensors in list order.
struct NormPlan {
  std::vector<int64_t> tensor_offset;  // first chunk sum of tensor k
  std::vector<int64_t> layer_begin;    // layer l's sums are [layer_begin[l], layer_begin[l + 1])
  int64_t chunks = 0;
};
NormPlan plan_norms(at::TensorList tensors, c10::ArrayRef<int64_t> layers, int64_t num_layers);

struct SgdHyper {
  double lr, momentum, weight_decay;
  bool nesterov;
};

// Every list contiguous, one dtype per tensor pair (float32 or float64), checked by the op.
// norms (float64 [num_layers]) = the norm of each layer's gradients with L1's term.
void layer_gradient_norms_cpu(at::TensorList params, at::TensorList grads, c10::ArrayRef<int64_t> layers,
                              double l1, const at::Tensor& norms);
void layer_gradient_norms_cuda(at::TensorList params, at::TensorList grads, c10::ArrayRef<int64_t> layers,
                               double l1, const at::Tensor& norms);

// grads[k] = Eq. 3.4 of (grads[k] + L1's term), divided by norms[layers[k]]; accumulated[k] += it.
void normalize_accumulate_cpu(at::TensorList grads, at::TensorList accumulated, at::TensorList params,
                              const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1);
void normalize_accumulate_cuda(at::TensorList grads, at::TensorList accumulated, at::TensorList params,
                               const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1);

// The same normalized gradient, added to accumulated[k] and applied to
// params[k] by SGD (momentum_buffers empty without momentum); grads are only read.
void adapt_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        at::TensorList accumulated, const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1,
                        const SgdHyper& sgd);
void adapt_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         at::TensorList accumulated, const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1,
                         const SgdHyper& sgd);

}  // namespace fxp::kernels
