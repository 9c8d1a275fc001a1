// CUDA kernel of the fused QPU SGD step.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "qpu_sgd_cuda.h"
#include "qpu_sgd_ops.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static void launch(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     c10::ArrayRef<int64_t> streams, const kernels::QpuSgdParams& p, const at::Tensor& counts,
                     const at::Tensor& nan_count) {
    kernels::qpu_sgd_cuda(params, grads, momentum, streams, p, counts, nan_count);
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { m.impl("qpu_sgd_step_", &qpu_sgd_step<CudaBackend>); }

}  // namespace fxp
