// CUDA kernels of AdaPT's per-step gradient work. The norms follow Note
// [Deterministic gradient norms] with one warp per chunk and one warp per
// layer, so they equal the CPU's bit for bit; the elementwise kernels read
// each layer's norm on the device (no host synchronization).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "adapt_step/adapt_step_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / static_cast<int>(kNormLanes);
static_assert(kNormLanes == 32, "the norms' lanes are a warp's");

__device__ __forceinline__ double warp_combine(double lane) {
  // Lane j += lane j + offset, as combine_lanes does.
  for (int offset = static_cast<int>(kNormLanes) / 2; offset > 0; offset /= 2) {
    lane += __shfl_down_sync(0xffffffffu, lane, offset);
  }
  return lane;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_squares_kernel(const T* __restrict__ g, const T* __restrict__ w, int64_t n, T l1, double* __restrict__ sums) {
  const int lane = threadIdx.x % kNormLanes;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kNormLanes;
  const int64_t start = chunk * kNormChunk;
  if (start >= n) return;  // whole warps leave together
  const int64_t end = min(n, start + kNormChunk);
  double sum = 0;
  for (int64_t i = start + lane; i < end; i += kNormLanes) {
    const double x = static_cast<double>(gradient_with_l1(g[i], w[i], l1));
    sum += x * x;
  }
  sum = warp_combine(sum);
  if (lane == 0) sums[chunk] = sum;
}

// Layers [first, first + count)'s chunk sums, passed by value: no host-to-device
// copy, so the norms need no synchronization and can be captured in a CUDA graph.
constexpr int kLayersPerLaunch = 240;  // the struct stays under 2 KB of kernel arguments
struct LayerSums {
  int64_t begin[kLayersPerLaunch + 1];  // layer first + j's sums are [begin[j], begin[j + 1])
  int64_t first;
};

// One warp per layer.
__global__ void layer_norms_kernel(const double* __restrict__ sums, const LayerSums layers, double* __restrict__ norms) {
  const int j = blockIdx.x;
  double sum = 0;
  for (int64_t c = layers.begin[j] + threadIdx.x; c < layers.begin[j + 1]; c += kNormLanes) sum += sums[c];
  sum = warp_combine(sum);
  if (threadIdx.x == 0) norms[layers.first + j] = sqrt(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_accumulate_kernel(T* __restrict__ g, T* __restrict__ a, const T* __restrict__ w, int64_t n, T l1,
                                const double* __restrict__ norm) {
  const double divisor = norm_divisor(*norm);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T gi = normalized_gradient(gradient_with_l1(g[i], w[i], l1), divisor);
    g[i] = gi;
    a[i] += gi;
  }
}

template <typename T, bool kMomentum, bool kNesterov>
__global__ void __launch_bounds__(kThreads)
    adapt_sgd_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ v, T* __restrict__ a, int64_t n, T l1,
                     const double* __restrict__ norm, T lr, T momentum, T weight_decay) {
  const double divisor = norm_divisor(*norm);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T wi = w[i], vi = kMomentum ? v[i] : T(0);
    const T gi = normalized_gradient(gradient_with_l1(g[i], wi, l1), divisor);
    a[i] += gi;
    sgd_element<T, kMomentum, kNesterov>(wi, gi, vi, lr, momentum, weight_decay);
    w[i] = wi;
    if constexpr (kMomentum) v[i] = vi;
  }
}

unsigned elementwise_blocks(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 8)));
}

}  // namespace

void layer_gradient_norms_cuda(at::TensorList params, at::TensorList grads, c10::ArrayRef<int64_t> layers,
                               double l1, const at::Tensor& norms) {
  const int64_t num_layers = norms.numel();
  if (num_layers == 0) return;
  const NormPlan plan = plan_norms(grads, layers, num_layers);
  const auto options = norms.options();
  at::Tensor sums = at::empty({std::max<int64_t>(plan.chunks, 1)}, options);
  auto stream = at::cuda::getCurrentCUDAStream();
  for (size_t k = 0; k < grads.size(); ++k) {
    const int64_t n = grads[k].numel();
    if (n == 0) continue;
    const int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
    const auto blocks = static_cast<unsigned>((chunks + kWarpsPerBlock - 1) / kWarpsPerBlock);
    AT_DISPATCH_FLOATING_TYPES(grads[k].scalar_type(), "fxp_layer_gradient_norms_cuda", [&] {
      chunk_squares_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          grads[k].const_data_ptr<scalar_t>(), params[k].const_data_ptr<scalar_t>(), n, static_cast<scalar_t>(l1),
          sums.data_ptr<double>() + plan.tensor_offset[k]);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (int64_t first = 0; first < num_layers; first += kLayersPerLaunch) {
    const int64_t count = std::min<int64_t>(kLayersPerLaunch, num_layers - first);
    LayerSums bounds{};
    bounds.first = first;
    std::copy_n(plan.layer_begin.begin() + first, count + 1, bounds.begin);
    layer_norms_kernel<<<static_cast<unsigned>(count), static_cast<unsigned>(kNormLanes), 0, stream>>>(
        sums.const_data_ptr<double>(), bounds, norms.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void normalize_accumulate_cuda(at::TensorList grads, at::TensorList accumulated, at::TensorList params,
                               const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1) {
  auto stream = at::cuda::getCurrentCUDAStream();
  for (size_t k = 0; k < grads.size(); ++k) {
    const int64_t n = grads[k].numel();
    if (n == 0) continue;
    AT_DISPATCH_FLOATING_TYPES(grads[k].scalar_type(), "fxp_normalize_accumulate_cuda", [&] {
      normalize_accumulate_kernel<scalar_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
          grads[k].data_ptr<scalar_t>(), accumulated[k].data_ptr<scalar_t>(), params[k].const_data_ptr<scalar_t>(), n,
          static_cast<scalar_t>(l1), norms.const_data_ptr<double>() + layers[k]);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void adapt_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         at::TensorList accumulated, const at::Tensor& norms, c10::ArrayRef<int64_t> layers, double l1,
                         const SgdHyper& sgd) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool has_momentum = !momentum_buffers.empty();
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t n = params[k].numel();
    if (n == 0) continue;
    AT_DISPATCH_FLOATING_TYPES(params[k].scalar_type(), "fxp_adapt_sgd_step_cuda", [&] {
      const auto l1_t = static_cast<scalar_t>(l1), lr = static_cast<scalar_t>(sgd.lr),
                 mu = static_cast<scalar_t>(sgd.momentum), wd = static_cast<scalar_t>(sgd.weight_decay);
      scalar_t* w = params[k].data_ptr<scalar_t>();
      const scalar_t* g = grads[k].const_data_ptr<scalar_t>();
      scalar_t* a = accumulated[k].data_ptr<scalar_t>();
      const double* norm = norms.const_data_ptr<double>() + layers[k];
      const auto launch = [&](auto kernel, scalar_t* v) {
        kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(w, g, v, a, n, l1_t, norm, lr, mu, wd);
      };
      if (!has_momentum) {
        launch(adapt_sgd_kernel<scalar_t, false, false>, nullptr);
      } else if (sgd.nesterov) {
        launch(adapt_sgd_kernel<scalar_t, true, true>, momentum_buffers[k].data_ptr<scalar_t>());
      } else {
        launch(adapt_sgd_kernel<scalar_t, true, false>, momentum_buffers[k].data_ptr<scalar_t>());
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fxp::kernels
