// The QPU step's kernel for calls without tensors (empty lists), where the
// dispatcher has no backend to pick: a CompositeExplicitAutograd kernel is its
// fallback. The lists are empty, so the step is a no-op after its checks.
// (The CPU, CUDA and Meta kernels take precedence whenever there are tensors.)
#include <torch/library.h>

#include "backend.h"
#include "qpu_sgd_ops.h"

namespace fxp {
namespace {
struct NoTensorsBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static void launch(at::TensorList params, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                     const kernels::QpuSgdParams&, const at::Tensor&, const at::Tensor&) {
    TORCH_CHECK(false, "fxp::qpu_sgd_step_ has no kernel for tensors on ", params[0].device());
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) { m.impl("qpu_sgd_step_", &qpu_sgd_step<NoTensorsBackend>); }

}  // namespace fxp
