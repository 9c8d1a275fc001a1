// The fused QPU (quantized parameter update) SGD step: compute only.
// csrc/ops/qpu_sgd validates the lists and registers the op.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/fxp_math.h"
#include "qpu_sgd/qpu_update.h"

namespace fxp::kernels {

struct QpuSgdParams {
  QpuHyper hyper;
  int total_bits, frac_bits;                    // parameter format
  int momentum_total_bits, momentum_frac_bits;  // momentum-buffer format
  Rounding rounding;                            // NearestEven (HTEQPU) or Stochastic (SQPU)
  MomentumForm form;
  uint64_t seed;
  uint64_t step;
  // How each list stores its values; the same for every tensor of a list.
  // Packed params and momentum hold integer codes (Note [Packed QPU step]).
  Storage param_storage = Storage::Float32, grad_storage = Storage::Float32, momentum_storage = Storage::Float32;
};

// Note [Packed QPU step]
// With packed storage the step reads codes, computes the same float64 update
// (qpu_update_element) and writes codes: no float copy outlives the step, and
// the values equal those of float storage whenever float storage is exact
// (codes below 2^24 in float32). A NaN result cannot be a code: that element
// keeps its old code, and the kernel counts it so the op can raise. The op
// raises after the update: the step has happened (every other element is
// updated), and the optimizers count it as a step, so a caller that catches
// the error goes on with fresh random streams. On float storage a NaN result
// is stored as the default quiet NaN (Note [NaN keeps its bits] explains why
// not the computed one).

// Note [QPU random streams]
// The tensor with stream index k draws its parameter rounding from Philox
// offset step * 2^32 + 2k and its momentum rounding from step * 2^32 + 2k + 1,
// with key seed; element i uses lane i % 4 of block i / 4 as in
// quantize_seeded. The optimizers pass each parameter's position in its
// parameter group as k, whether or not the other parameters have gradients,
// so a frozen or unused parameter never shifts the draws of the others. A step
// is reproducible from (seed, step) alone, identical on CPU and CUDA, and
// equal to quantize_seeded applied to the float64 update.
// Stream indices are below 2^31, so the offsets of one step never reach the next's.
constexpr int64_t kMaxStreamIndex = (int64_t{1} << 31) - 1;
// QPU's initialization rounds with key seed + kInitKeyDelta (2^64 / the golden
// ratio), so its draws are independent of the update streams (key seed).
constexpr uint64_t kInitKeyDelta = 0x9E3779B97F4A7C15ull;

inline namespace FXP_ISA {
FXP_HOST_DEVICE uint64_t qpu_param_offset(uint64_t step, int64_t stream) {
  return (step << 32) + 2 * static_cast<uint64_t>(stream);
}
FXP_HOST_DEVICE uint64_t qpu_momentum_offset(uint64_t step, int64_t stream) {
  return qpu_param_offset(step, stream) + 1;
}

// The format prepared for float64 compute but bounded so the result is
// representable in the storage (Note [Saturation bound in float32]); codes and
// float64 take the format's exact bounds.
inline FxpSpec<double> qpu_storage_spec(int total_bits, int frac_bits, Storage storage) {
  FxpSpec<double> spec = make_fxp_spec<double>(total_bits, frac_bits);
  if (storage == Storage::Float32) spec.code_max = make_fxp_spec<float>(total_bits, frac_bits).code_max;
  return spec;
}
}  // namespace FXP_ISA

// Updates params[k] and momentum[k] (empty list: no momentum) in place from
// grads[k]; all contiguous, same numel per k, stored as p says. streams[k] is
// tensor k's stream index (Note [QPU random streams]).
// counts: int64 [n, 2], receives (saturated, vanished) per tensor.
// nan_count (int64 0-dim; only needed with packed storage) receives the
// number of NaN results that packed storage could not hold.
using QpuSgdCpu = void(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                       c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                       const at::Tensor& nan_count);

// One build per CPU capability (qpu_sgd_kernel_cpu.cpp); Note [CPU kernel tables].
extern CpuKernelTable qpu_sgd_cpu_kernel;

inline void qpu_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                        c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                        const at::Tensor& nan_count) {
  cpu_kernel<QpuSgdCpu>(qpu_sgd_cpu_kernel)(params, grads, momentum, streams, p, counts, nan_count);
}

}  // namespace fxp::kernels
