// fxp::pack_bits and fxp::unpack_bits's CUDA registration (the others are in bit_pack_register.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/bit_pack/bit_pack_op.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static constexpr auto pack = &kernels::pack_bits_cuda;
  static constexpr auto unpack = &kernels::unpack_bits_cuda;
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_BIT_PACK_OPS(m, CudaBackend); }

}  // namespace fxp
