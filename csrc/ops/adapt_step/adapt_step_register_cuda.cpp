// AdaPT's per-step ops' CUDA registration (the others are in adapt_step_register.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/adapt_step/adapt_step_op.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr auto norms = &kernels::layer_gradient_norms_cuda;
  static constexpr auto normalize = &kernels::normalize_accumulate_cuda;
  static constexpr auto sgd = &kernels::adapt_sgd_step_cuda;
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_ADAPT_STEP_OPS(m, CudaBackend); }

}  // namespace fxp
