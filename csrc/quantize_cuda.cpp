// CUDA kernels of the quantize ops.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "quantize_cuda.h"
#include "quantize_ops.h"

namespace fxp {
namespace {

struct CudaBackend {
  using Philox = at::PhiloxCudaState;
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;

  // Note [Philox offsets from the CUDA generator]
  // Each call reserves 4 counter values of the generator (its increment must
  // be a multiple of 4). Our counter layout is (offset, element / 4), so
  // distinct offsets already give disjoint streams. philox_cuda_state keeps
  // this valid under CUDA-graph capture; the kernel unpacks it on the device.
  static Philox from_generator(const std::optional<at::Generator>& generator) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    return gen->philox_cuda_state(4);
  }
  static Philox from_seed(uint64_t seed, uint64_t offset) { return Philox(seed, offset); }

  static void launch(const at::Tensor& x, const at::Tensor& out, const kernels::QuantizeParams& params,
                     const Philox& philox, const at::Tensor& saturated,
                     const at::Tensor& saturated_count) {
    kernels::quantize_cuda(x, out, params, philox, saturated, saturated_count);
  }
  // The NaN check reads the count back: one device-to-host copy per call.
  static int64_t launch_pack(const at::Tensor& x, const at::Tensor& codes, const kernels::QuantizeParams& params,
                             const Philox& philox) {
    at::Tensor nan_count = at::zeros({}, x.options().dtype(at::kLong));
    kernels::pack_cuda(x, codes, params, philox, nan_count);
    return nan_count.item<int64_t>();
  }
  static void launch_unpack(const at::Tensor& codes, const at::Tensor& out, int frac_bits) {
    kernels::unpack_cuda(codes, out, frac_bits);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_QUANTIZE_OPS(m, CudaBackend); }

}  // namespace fxp
