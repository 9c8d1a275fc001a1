// The fused QPU SGD step's CUDA registration (the others are in qpu_sgd_register.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/qpu_sgd/qpu_sgd_op.h"
#include "qpu_sgd/qpu_sgd_kernel_cuda.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static constexpr bool kRunsMembersOnThreads = false;  // Note [Members over the threads]
  static void launch(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     c10::ArrayRef<int64_t> streams, const kernels::QpuSgdParams& p, const at::Tensor& counts,
                     const at::Tensor& nan_count, const kernels::GradientPrologue& prologue) {
    kernels::qpu_sgd_cuda(params, grads, momentum, streams, p, counts, nan_count, prologue);
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<CudaBackend>);
  m.impl("qpu_sgd_step_.capturable", &qpu_sgd_step_capturable<CudaBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<CudaBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<CudaBackend>);
}

}  // namespace fxp
