// CPU kernels of the quantize ops.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include <mutex>

#include "backend.h"
#include "quantize_ops.h"

namespace fxp {
namespace {

struct CpuBackend {
  struct Philox {
    uint64_t seed = 0;
    uint64_t offset = 0;
  };
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;

  // A fresh 64-bit key per call, drawn from the CPU generator under its lock.
  static Philox from_generator(const std::optional<at::Generator>& generator) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    return Philox{gen->random64(), 0};
  }
  static Philox from_seed(uint64_t seed, uint64_t offset) { return Philox{seed, offset}; }

  static void launch(const at::Tensor& x, const at::Tensor& out, const kernels::QuantizeParams& params,
                     const Philox& philox, const at::Tensor& saturated,
                     const at::Tensor& saturated_count) {
    kernels::quantize_cpu(x, out, params, philox.seed, philox.offset, saturated, saturated_count);
  }
  static kernels::PackCounts launch_pack(const at::Tensor& x, const at::Tensor& codes,
                                         const kernels::QuantizeParams& params, const Philox& philox, bool exact) {
    return kernels::pack_cpu(x, codes, params, philox.seed, philox.offset, exact);
  }
  static int64_t launch_unpack(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits) {
    return kernels::unpack_cpu(codes, out, total_bits, frac_bits);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_QUANTIZE_OPS(m, CpuBackend); }

}  // namespace fxp
