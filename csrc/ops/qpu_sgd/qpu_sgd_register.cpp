// The fused QPU SGD step's registrations, both forms: CPU, Meta, the call without
// tensors, and Autograd (CUDA in qpu_sgd_register_cuda.cpp). The op is written once in qpu_sgd_op.h.
#include <torch/library.h>

#include "ops/backend.h"
#include "ops/not_differentiable.h"
#include "ops/ops.h"
#include "ops/qpu_sgd/qpu_sgd_op.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static bool capturing() { return false; }  // no CUDA graph captures CPU or Meta work
  static void launch(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     c10::ArrayRef<int64_t> streams, const kernels::QpuSgdParams& p, const at::Tensor& counts,
                     const at::Tensor& nan_count, const kernels::GradientPrologue& prologue) {
    kernels::qpu_sgd_cpu(params, grads, momentum, streams, p, counts, nan_count, prologue);
  }
};

// Argument checks and the counts' shape.
struct MetaBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static bool capturing() { return false; }  // no CUDA graph captures CPU or Meta work
  static void launch(at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                     const kernels::QpuSgdParams&, const at::Tensor&, const at::Tensor&,
                     const kernels::GradientPrologue&) {}
};

// A call with empty lists has no backend for the dispatcher to pick; its
// CompositeExplicitAutograd kernel checks the arguments and does nothing. (The
// CPU, CUDA and Meta kernels take precedence whenever there are tensors.)
struct NoTensorsBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static bool capturing() { return false; }  // no CUDA graph captures CPU or Meta work
  static void launch(at::TensorList params, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                     const kernels::QpuSgdParams&, const at::Tensor&, const at::Tensor&,
                     const kernels::GradientPrologue&) {
    TORCH_CHECK(false, "fxp::qpu_sgd_step_ has no kernel for tensors on ", params[0].device());
  }
};

// Note [QPU initialization]
// QPU keeps no float copy, so a model's parameters are put on the grid once,
// with the update rounding: tensor k of the model (in parameter order) with
// Philox key seed + kInitKeyDelta and offset k. One offset per tensor of the
// whole model: restarting k at 0 per layer would give layers the same draws.
// The Python and C++ front ends both call this op.
void quantize_parameters(at::TensorList params, at::IntArrayRef total_bits, at::IntArrayRef frac_bits,
                         c10::string_view rounding, int64_t seed) {
  constexpr const char* op = "fxp::quantize_parameters_";
  TORCH_CHECK(total_bits.size() == params.size() && frac_bits.size() == params.size(), op,
              ": expected a format per parameter (", params.size(), "), but got ", total_bits.size(), " total_bits and ",
              frac_bits.size(), " frac_bits");
  const auto key = static_cast<int64_t>(static_cast<uint64_t>(seed) + kernels::kInitKeyDelta);
  for (size_t k = 0; k < params.size(); ++k) {
    quantize_seeded_(const_cast<at::Tensor&>(params[k]), total_bits[k], frac_bits[k], rounding, key,
                     static_cast<int64_t>(k));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<CpuBackend>);
  m.impl("qpu_sgd_step_.capturable", &qpu_sgd_step_capturable<CpuBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<CpuBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<CpuBackend>);
}

TORCH_LIBRARY_IMPL(fxp, Meta, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<MetaBackend>);
  m.impl("qpu_sgd_step_.capturable", &qpu_sgd_step_capturable<MetaBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<MetaBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<MetaBackend>);
}

TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<NoTensorsBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<NoTensorsBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<NoTensorsBackend>);  // empty lists: its own error
  m.impl("quantize_parameters_", &quantize_parameters);
}

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  register_not_differentiable(
      m, {"qpu_sgd_step_", "qpu_sgd_step_.capturable", "qpu_sgd_step_.adapt", "qpu_sgd_members_step_",
                          "quantize_parameters_"});
}

TORCH_LIBRARY_IMPL(fxp, ADInplaceOrView, m) {
  register_version_bump(m, {"qpu_sgd_step_", "qpu_sgd_step_.capturable", "qpu_sgd_step_.adapt",
                            "qpu_sgd_members_step_"});
}

}  // namespace fxp
