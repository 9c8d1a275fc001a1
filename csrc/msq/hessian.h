// Per-layer Hessian traces for MSQ's sensitivity (docs/msq.md), by
// Hutchinson's estimator over Hessian-vector products.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fxp::msq {

// Note [Hutchinson's estimator]
// For a layer's parameters w_l and Rademacher vectors v (each entry +-1 with
// probability 1/2, drawn for all layers at once), E[v_l . (H v)_l] = tr(H_ll):
// the cross terms v_i v_j H_ij (i != j) have mean 0, and v_i^2 = 1. One
// sample costs one Hessian-vector product, the gradient of g . v where g is
// the gradient built with create_graph. Its variance per sample is
// 2 (||H_ll||_F^2 - sum_i H_ii^2) + ||H_l,rest||_F^2 (the layer's own pairs,
// then its pairs with the other layers' parameters); the test checks the
// estimate against the exact trace within that bound. A layer whose Hessian
// rows are zero off the diagonal is exact after one sample. The vectors come
// from a CPU generator seeded with `seed`, drawn sample by sample and in
// parameter order, then moved to the parameters' device: the same seed gives
// the same vectors on CPU and CUDA.
// The loss must be differentiable twice in the parameters: MSQ evaluates it
// on the float path (docs/msq.md, "The Hessian").
struct HessianTraceOptions {
  int64_t samples = 16;
  uint64_t seed = 0;
};

// The estimate of tr(H_ll) for each group of parameters (a layer), as float64.
// loss: a scalar computed from the parameters with autograd on; its graph is
// kept (retain_graph) until the last sample. layer_names (one per layer, or
// none) name the layers in errors: a layer whose parameters do not require
// grad, or that the loss does not use.
std::vector<double> hessian_traces(const torch::Tensor& loss, const std::vector<std::vector<torch::Tensor>>& layers,
                                   const HessianTraceOptions& options,
                                   const std::vector<std::string>& layer_names = {});

}  // namespace fxp::msq
