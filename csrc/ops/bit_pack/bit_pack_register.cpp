// fxp::pack_bits and fxp::unpack_bits's registrations: CPU, Meta and Autograd
// (CUDA in bit_pack_register_cuda.cpp). The ops are written once in bit_pack_op.h.
#include <torch/library.h>

#include "ops/backend.h"
#include "ops/bit_pack/bit_pack_op.h"
#include "ops/not_differentiable.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr auto pack = &kernels::pack_bits_cpu;
  static constexpr auto unpack = &kernels::unpack_bits_cpu;
};

// Shapes and checks only (the kernels it names are never called; codes are not range-checked).
struct MetaBackend : CpuBackend {
  static constexpr bool kIsMeta = true;
};

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_BIT_PACK_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_BIT_PACK_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) { register_not_differentiable(m, {"pack_bits", "unpack_bits"}); }

}  // namespace fxp
