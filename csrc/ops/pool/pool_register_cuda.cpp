// The fused ReLU + max-pool ops' CUDA registration (the others are in pool_register.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/pool/pool_op.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static void launch(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw) {
    kernels::relu_max_pool2d_cuda(x, out, positions, kh, kw);
  }
  static int64_t launch_backward(const at::Tensor& g, const at::Tensor& positions, const at::Tensor& grad_x, int kh,
                                 int kw) {
    kernels::relu_max_pool2d_backward_cuda(g, positions, grad_x, kh, kw);
    return 0;  // not counted on CUDA (kernels/pool/pool_kernel.h)
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_POOL_OPS(m, CudaBackend); }

}  // namespace fxp
