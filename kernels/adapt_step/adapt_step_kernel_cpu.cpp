// CPU kernels of AdaPT's per-step gradient work. The norms follow Note
// [Deterministic gradient norms]: chunks are summed in parallel into their
// own slots, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "adapt_step/adapt_step_kernel.h"

namespace fxp::kernels {

NormPlan plan_norms(at::TensorList tensors, c10::ArrayRef<int64_t> layers, int64_t num_layers) {
  NormPlan plan;
  plan.tensor_offset.assign(tensors.size(), 0);
  plan.layer_begin.assign(static_cast<size_t>(num_layers) + 1, 0);
  for (int64_t l = 0; l < num_layers; ++l) {
    plan.layer_begin[static_cast<size_t>(l)] = plan.chunks;
    for (size_t k = 0; k < tensors.size(); ++k) {
      if (layers[k] != l) continue;
      plan.tensor_offset[k] = plan.chunks;
      plan.chunks += (tensors[k].numel() + kNormChunk - 1) / kNormChunk;
    }
  }
  plan.layer_begin[static_cast<size_t>(num_layers)] = plan.chunks;
  return plan;
}

namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task of the elementwise kernels

template <typename T>
double chunk_squares(const T* g, const T* w, int64_t n, T l1) {
  double lanes[kNormLanes] = {};
  const auto add = [&](int64_t i, int64_t j) {
    const double x = static_cast<double>(gradient_with_l1(g[i], w[i], l1));
    lanes[j] += x * x;
  };
  int64_t base = 0;
  for (; base + kNormLanes <= n; base += kNormLanes) {  // whole rows: a fixed trip count vectorizes
    for (int64_t j = 0; j < kNormLanes; ++j) add(base + j, j);
  }
  for (int64_t j = 0; base + j < n; ++j) add(base + j, j);
  return combine_lanes(lanes);
}

template <typename T>
struct SgdSpan {
  T* w;
  const T* g;
  T* v;  // null without momentum
  T* a;
  double divisor;
  T l1, lr, momentum, weight_decay;
};

template <typename T, bool kMomentum, bool kNesterov>
void sgd_range(const SgdSpan<T>& s, int64_t begin, int64_t end) {
  T* __restrict__ w = s.w;
  const T* __restrict__ g = s.g;
  T* __restrict__ v = s.v;
  T* __restrict__ a = s.a;
  const double divisor = s.divisor;
  const T l1 = s.l1, lr = s.lr, momentum = s.momentum, weight_decay = s.weight_decay;
  for (int64_t i = begin; i < end; ++i) {
    const T gi = normalized_gradient(gradient_with_l1(g[i], w[i], l1), divisor);
    a[i] += gi;
    T wi = w[i], vi = kMomentum ? v[i] : T(0);
    sgd_element<T, kMomentum, kNesterov>(wi, gi, vi, lr, momentum, weight_decay);
    w[i] = wi;
    if constexpr (kMomentum) v[i] = vi;
  }
}

template <typename Fn>
void for_each_tensor(at::TensorList tensors, const Fn& fn) {
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (tensors[k].numel() > 0) fn(k);
  }
}

}  // namespace

void layer_gradient_norms_cpu(at::TensorList params, at::TensorList grads, c10::ArrayRef<int64_t> layers,
                              double l1, const at::Tensor& norms) {
  const int64_t num_layers = norms.numel();
  const NormPlan plan = plan_norms(grads, layers, num_layers);
  std::vector<double> sums(static_cast<size_t>(plan.chunks));
  for_each_tensor(grads, [&](size_t k) {
    AT_DISPATCH_FLOATING_TYPES(grads[k].scalar_type(), "fxp::layer_gradient_norms", [&] {
      const scalar_t* g = grads[k].const_data_ptr<scalar_t>();
      const scalar_t* w = params[k].const_data_ptr<scalar_t>();
      const int64_t n = grads[k].numel();
      double* out = sums.data() + plan.tensor_offset[k];
      at::parallel_for(0, (n + kNormChunk - 1) / kNormChunk, 4, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t s = c * kNormChunk;
          out[c] = chunk_squares(g + s, w + s, std::min(kNormChunk, n - s), static_cast<scalar_t>(l1));
        }
      });
    });
  });
  double* result = norms.data_ptr<double>();
  for (int64_t l = 0; l < num_layers; ++l) {
    double lanes[kNormLanes] = {};
    const int64_t begin = plan.layer_begin[static_cast<size_t>(l)], end = plan.layer_begin[static_cast<size_t>(l) + 1];
    for (int64_t c = begin; c < end; ++c) lanes[(c - begin) % kNormLanes] += sums[static_cast<size_t>(c)];
    result[l] = std::sqrt(combine_lanes(lanes));
  }
}

void normalize_accumulate_cpu(at::TensorList grads, at::TensorList accumulated, at::TensorList params,
                              const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1) {
  const double* norm = norms.const_data_ptr<double>();
  for_each_tensor(grads, [&](size_t k) {
    AT_DISPATCH_FLOATING_TYPES(grads[k].scalar_type(), "fxp::normalize_accumulate_", [&] {
      scalar_t* __restrict__ g = grads[k].data_ptr<scalar_t>();
      scalar_t* __restrict__ a = accumulated[k].data_ptr<scalar_t>();
      const scalar_t* __restrict__ w = params[k].const_data_ptr<scalar_t>();
      const double divisor = norm_divisor(norm[layers[k]]);
      const auto l1_t = static_cast<scalar_t>(l1);
      at::parallel_for(0, grads[k].numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t gi = normalized_gradient(gradient_with_l1(g[i], w[i], l1_t), divisor);
          g[i] = gi;
          a[i] += gi;
        }
      });
    });
  });
}

void adapt_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        at::TensorList accumulated, const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1,
                        const SgdHyper& sgd) {
  const double* norm = norms.const_data_ptr<double>();
  const bool has_momentum = !momentum_buffers.empty();
  for_each_tensor(params, [&](size_t k) {
    AT_DISPATCH_FLOATING_TYPES(params[k].scalar_type(), "fxp::adapt_sgd_step_", [&] {
      const SgdSpan<scalar_t> span{params[k].data_ptr<scalar_t>(), grads[k].const_data_ptr<scalar_t>(),
                                   has_momentum ? momentum_buffers[k].data_ptr<scalar_t>() : nullptr,
                                   accumulated[k].data_ptr<scalar_t>(), norm_divisor(norm[layers[k]]),
                                   static_cast<scalar_t>(l1), static_cast<scalar_t>(sgd.lr),
                                   static_cast<scalar_t>(sgd.momentum), static_cast<scalar_t>(sgd.weight_decay)};
      // A loop per (momentum, nesterov): run-time flags inside the loop stop GCC vectorizing it.
      const auto run = has_momentum ? (sgd.nesterov ? &sgd_range<scalar_t, true, true> : &sgd_range<scalar_t, true, false>)
                                    : &sgd_range<scalar_t, false, false>;
      at::parallel_for(0, params[k].numel(), kGrain, [&](int64_t begin, int64_t end) { run(span, begin, end); });
    });
  });
}

}  // namespace fxp::kernels
