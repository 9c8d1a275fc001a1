// Meta kernels of the fused ReLU + max-pool ops: shapes and checks only.
#include <torch/library.h>

#include "backend.h"
#include "pool_ops.h"

namespace fxp {
namespace {
struct MetaBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static void launch(const at::Tensor&, const at::Tensor&, const at::Tensor&, int, int) {}
  static int64_t launch_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, int, int) { return 0; }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_POOL_OPS(m, MetaBackend); }

}  // namespace fxp
