// The quantize ops' CUDA registration (the others are in quantize_register.cpp).
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "ops/quantize/quantize_op.h"
#include "quantize/quantize_kernel_cuda.h"

namespace fxp {
namespace {

struct CudaBackend {
  using Philox = kernels::CudaPhilox;
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static constexpr bool kRunsMembersOnThreads = false;  // Note [Members over the threads]

  // Note [Philox offsets from a generator] (kernels/common/fxp_math.h): each call
  // reserves kGeneratorIncrement (4) of the generator's offset and draws from
  // counter offset / 4. philox_cuda_state keeps this valid under CUDA-graph
  // capture; the kernel unpacks it on the device. The default is x's device's
  // generator, as ATen's random ops take it (the op draws before it takes the
  // device guard: Note [Check, then guard]).
  static Philox from_generator(const std::optional<at::Generator>& generator, const at::Tensor& x) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    return Philox{gen->philox_cuda_state(kGeneratorIncrement), /*from_generator=*/true};
  }
  static Philox from_seed(uint64_t seed, uint64_t offset) { return Philox{at::PhiloxCudaState(seed, offset), false}; }

  static void launch(const at::Tensor& x, const at::Tensor& out, const kernels::QuantizeParams& params,
                     const Philox& philox, const at::Tensor& saturated,
                     const at::Tensor& saturated_count) {
    kernels::quantize_cuda(x, out, params, philox, saturated, saturated_count);
  }
  static void launch_pack(const at::Tensor& x, const at::Tensor& codes, const kernels::QuantizeParams& params,
                          const Philox& philox, bool exact, const at::Tensor& counts) {
    kernels::pack_cuda(x, codes, params, philox, exact, counts);
  }
  // Codes are not range-checked on CUDA (see unpack_cuda).
  static int64_t launch_unpack(const at::Tensor& codes, const at::Tensor& out, int /*total_bits*/, int frac_bits) {
    kernels::unpack_cuda(codes, out, frac_bits);
    return 0;
  }
};


}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_QUANTIZE_OPS(m, CudaBackend); }

}  // namespace fxp
