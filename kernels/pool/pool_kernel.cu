// CUDA kernels of the fused ReLU + max-pool: one thread per output (forward)
// or per input element (backward, so every element is written once).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "pool/pool_kernel.h"
#include "pool/pool_window.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 32)));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, uint8_t* __restrict__ positions,
                   int64_t n, int64_t height, int64_t width, int64_t out_h, int64_t out_w, int kh, int kw) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < n;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = o % out_w, oh = (o / out_w) % out_h, p = o / (out_w * out_h);
    out[o] = relu_max_window<scalar_t, acc_t>(x + p * height * width, width, oh * kh, ow * kw, kh, kw, positions + o);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const uint8_t* __restrict__ positions,
                    scalar_t* __restrict__ grad_x, int64_t n, int64_t height, int64_t width, int64_t out_h,
                    int64_t out_w, int kh, int kw) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = i % width, h = (i / width) % height, p = i / (width * height);
    const int64_t oh = h / kh, ow = w / kw;
    scalar_t g = scalar_t(0);
    if (oh < out_h && ow < out_w) {
      const int64_t o = (p * out_h + oh) * out_w + ow;
      const uint8_t pos = positions[o];
      if (pos != kNotPositive && pos == (h - oh * kh) * kw + (w - ow * kw)) {
        g = static_cast<scalar_t>(acc_t(0) + static_cast<acc_t>(grad_out[o]));
      }
    }
    grad_x[i] = g;
  }
}

}  // namespace

void relu_max_pool2d_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw) {
  const int64_t n = out.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_relu_max_pool2d_cuda", [&] {
    forward_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), positions.data_ptr<uint8_t>(), n, x.size(2),
        x.size(3), out.size(2), out.size(3), kh, kw);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void relu_max_pool2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& positions, const at::Tensor& grad_x,
                                   int kh, int kw) {
  const int64_t n = grad_x.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "fxp_relu_max_pool2d_backward_cuda", [&] {
    backward_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), positions.const_data_ptr<uint8_t>(), grad_x.data_ptr<scalar_t>(), n,
        grad_x.size(2), grad_x.size(3), grad_out.size(2), grad_out.size(3), kh, kw);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fxp::kernels
