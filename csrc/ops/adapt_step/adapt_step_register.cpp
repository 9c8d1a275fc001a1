// AdaPT's per-step ops' registrations: CPU, Meta and Autograd (CUDA in
// adapt_step_register_cuda.cpp). The ops are written once in adapt_step_op.h.
#include <torch/library.h>

#include "ops/adapt_step/adapt_step_op.h"
#include "ops/backend.h"
#include "ops/not_differentiable.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr auto norms = &kernels::layer_gradient_norms_cpu;
  static constexpr auto normalize = &kernels::normalize_accumulate_cpu;
  static constexpr auto sgd = &kernels::adapt_sgd_step_cpu;
};

// Shapes and checks only (the kernels it names are never called).
struct MetaBackend : CpuBackend {
  static constexpr bool kIsMeta = true;
  static constexpr c10::DeviceType kDevice = c10::DeviceType::Meta;
};

// A call with empty lists has no backend for the dispatcher to pick: its
// CompositeExplicitAutograd kernel checks the arguments and launches nothing
// (tensors on a device without kernels reach it too, and are refused).
struct NoTensorsBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static void refuse(at::TensorList tensors) {
    TORCH_CHECK(false, "fxp's AdaPT step ops have no kernel for tensors on ", tensors[0].device());
  }
  static void norms(at::TensorList, at::TensorList grads, c10::ArrayRef<int64_t>, double, const at::Tensor&) {
    refuse(grads);
  }
  static void normalize(at::TensorList grads, at::TensorList, at::TensorList, const at::Tensor&,
                        c10::ArrayRef<int64_t>, double) {
    refuse(grads);
  }
  static void sgd(at::TensorList params, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                  c10::ArrayRef<int64_t>, double, const kernels::SgdHyper&) {
    refuse(params);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_ADAPT_STEP_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_ADAPT_STEP_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) { FXP_REGISTER_ADAPT_STEP_OPS(m, NoTensorsBackend); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  register_not_differentiable(m, {"layer_gradient_norms", "normalize_accumulate_", "adapt_sgd_step_"});
}

TORCH_LIBRARY_IMPL(fxp, ADInplaceOrView, m) { register_version_bump(m, {"normalize_accumulate_", "adapt_sgd_step_"}); }

}  // namespace fxp
