// CPU kernel of the fused QPU SGD step.
#include <torch/library.h>

#include "backend.h"
#include "qpu_sgd_ops.h"

namespace fxp {
namespace {
struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static void launch(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     c10::ArrayRef<int64_t> streams, const kernels::QpuSgdParams& p, const at::Tensor& counts,
                     const at::Tensor& nan_count) {
    kernels::qpu_sgd_cpu(params, grads, momentum, streams, p, counts, nan_count);
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { m.impl("qpu_sgd_step_", &qpu_sgd_step<CpuBackend>); }

}  // namespace fxp
