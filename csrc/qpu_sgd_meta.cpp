// Meta kernel of the fused QPU SGD step: argument checks and the counts' shape.
#include <torch/library.h>

#include "backend.h"
#include "qpu_sgd_ops.h"

namespace fxp {
namespace {
struct MetaBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static void launch(at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                     const kernels::QpuSgdParams&, const at::Tensor&, const at::Tensor&) {}
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, Meta, m) { m.impl("qpu_sgd_step_", &qpu_sgd_step<MetaBackend>); }

}  // namespace fxp
