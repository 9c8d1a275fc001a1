// MSQ's RoundClamp ops' CUDA registration (the others are in round_clamp_register.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/round_clamp/round_clamp_op.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static constexpr auto launch = &kernels::round_clamp_cuda;
  static constexpr auto backward = &kernels::round_clamp_backward_cuda;
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_ROUND_CLAMP_OPS(m, CudaBackend); }

}  // namespace fxp
