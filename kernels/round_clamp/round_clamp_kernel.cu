// CUDA kernels of MSQ's RoundClamp: a grid-stride loop per tensor; each block
// sums its counts in shared memory and adds them to the device totals with
// integer atomics (exact, so the order does not matter). Nothing synchronizes
// with the host.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "round_clamp/round_clamp_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads)
    round_clamp_kernel(const T* __restrict__ w, T* __restrict__ quantized, T* __restrict__ lsb, C* __restrict__ codes,
                       int64_t n, RoundClampSpec spec, unsigned long long* __restrict__ totals, T* __restrict__ lsb_l1,
                       int64_t* __restrict__ lsb_nonzero) {
  __shared__ unsigned long long block_counts[2];
  __shared__ bool last_block;
  if (threadIdx.x < 2) block_counts[threadIdx.x] = 0;
  __syncthreads();
  unsigned long long nonzero = 0, nan = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T x = w[i];
    const RoundClampElement e = round_clamp_element(static_cast<double>(x), spec);
    nonzero += e.lsb != 0;
    nan += x != x;
    if (quantized) quantized[i] = round_clamp_value(x, e, spec);
    if (lsb) lsb[i] = round_clamp_lsb_value(x, e, spec);
    if (codes) codes[i] = e.code == e.code ? static_cast<C>(e.code) : C(0);
  }
  if (nonzero) atomicAdd(&block_counts[0], nonzero);
  if (nan) atomicAdd(&block_counts[1], nan);
  __syncthreads();
  // The last block to finish writes the totals' outputs (the threadfence
  // reduction pattern): its fence orders every block's counts before them.
  if (threadIdx.x == 0) {
    if (block_counts[0]) atomicAdd(&totals[0], block_counts[0]);
    if (block_counts[1]) atomicAdd(&totals[1], block_counts[1]);
    __threadfence();
    last_block = atomicAdd(&totals[2], 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (last_block && threadIdx.x == 0) {
    __threadfence();
    const auto nonzero_total = static_cast<int64_t>(atomicAdd(&totals[0], 0ull));
    const auto nan_total = static_cast<int64_t>(atomicAdd(&totals[1], 0ull));
    if (lsb_nonzero) *lsb_nonzero = nonzero_total;
    if (lsb_l1) *lsb_l1 = lsb_l1_from_counts<T>(nonzero_total, nan_total, spec);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    round_clamp_backward_kernel(const T* __restrict__ grad_quantized, const T* __restrict__ grad_lsb_l1,
                                const T* __restrict__ w, T* __restrict__ grad_w, int64_t n, RoundClampSpec spec) {
  const T g_l1 = *grad_lsb_l1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad_w[i] = round_clamp_gradient(grad_quantized[i], g_l1, round_clamp_element(static_cast<double>(w[i]), spec).lsb);
  }
}

unsigned blocks_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 8)));
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void round_clamp_cuda(const at::Tensor& w, const RoundClampOutputs& out, const RoundClampSpec& spec) {
  const int64_t n = w.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the totals are int64");
  auto* totals = reinterpret_cast<unsigned long long*>(out.totals.data_ptr<int64_t>());
  int64_t* lsb_nonzero = out.lsb_nonzero.defined() ? out.lsb_nonzero.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fxp::round_clamp_cuda", [&] {
    using weight_t = scalar_t;
    const weight_t* x = w.const_data_ptr<weight_t>();
    weight_t* quantized = data_or_null<weight_t>(out.quantized);
    weight_t* lsb = data_or_null<weight_t>(out.lsb);
    weight_t* lsb_l1 = data_or_null<weight_t>(out.lsb_l1);
    const auto launch = [&](auto* codes) {
      round_clamp_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, quantized, lsb, codes, n, spec, totals, lsb_l1,
                                                                  lsb_nonzero);
    };
    if (!out.codes.defined()) {
      launch(static_cast<int8_t*>(nullptr));
    } else {
      AT_DISPATCH_INTEGRAL_TYPES(out.codes.scalar_type(), "fxp::round_clamp_codes_cuda",
                                 [&] { launch(out.codes.data_ptr<scalar_t>()); });
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void round_clamp_backward_cuda(const at::Tensor& grad_quantized, const at::Tensor& grad_lsb_l1, const at::Tensor& w,
                               const at::Tensor& grad_w, const RoundClampSpec& spec) {
  const int64_t n = w.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fxp::round_clamp_backward_cuda", [&] {
    round_clamp_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_quantized.const_data_ptr<scalar_t>(), grad_lsb_l1.const_data_ptr<scalar_t>(),
        w.const_data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(), n, spec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fxp::kernels
