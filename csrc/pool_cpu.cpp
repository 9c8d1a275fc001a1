// CPU kernels of the fused ReLU + max-pool ops.
#include <torch/library.h>

#include "backend.h"
#include "pool_ops.h"

namespace fxp {
namespace {
struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static void launch(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw) {
    kernels::relu_max_pool2d_cpu(x, out, positions, kh, kw);
  }
  static int64_t launch_backward(const at::Tensor& g, const at::Tensor& positions, const at::Tensor& grad_x, int kh,
                                 int kw) {
    return kernels::relu_max_pool2d_backward_cpu(g, positions, grad_x, kh, kw);
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_POOL_OPS(m, CpuBackend); }

}  // namespace fxp
