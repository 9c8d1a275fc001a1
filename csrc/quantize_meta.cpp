// Meta kernels of the quantize ops: shapes, dtypes and argument checks only,
// for FakeTensor, torch.compile and torch.library.opcheck.
#include <torch/library.h>

#include "backend.h"
#include "quantize_ops.h"

namespace fxp {
namespace {

struct MetaBackend {
  struct Philox {};
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;

  static Philox from_generator(const std::optional<at::Generator>&) { return {}; }
  static Philox from_seed(uint64_t, uint64_t) { return {}; }
  static void launch(const at::Tensor&, const at::Tensor&, const kernels::QuantizeParams&,
                     const Philox&, const at::Tensor&, const at::Tensor&) {}
  static kernels::PackCounts launch_pack(const at::Tensor&, const at::Tensor&, const kernels::QuantizeParams&,
                                         const Philox&, bool) {
    return {};
  }
  static int64_t launch_unpack(const at::Tensor&, const at::Tensor&, int, int) { return 0; }
};

}  // namespace

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_QUANTIZE_OPS(m, MetaBackend); }

}  // namespace fxp
