// The fused QPU (quantized parameter update) SGD step: compute only.
// csrc/ops/qpu_sgd validates the lists and registers the op.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "adapt_step/adapt_step_math.h"
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
  // Note [Capturable QPU step]: when set (CUDA only), the kernel reads lr and
  // step from these device scalars instead of hyper.lr and step.
  const double* lr_f64_on_device = nullptr;
  const float* lr_f32_on_device = nullptr;
  const int64_t* step_on_device = nullptr;
};

// Note [AdaPT's fused QPU step]
// AdaPT without a master copy (Note [AdaPT with QPU]) steps the normalized
// gradient. In place of normalize_accumulate_ before the step (a read and a
// write of every gradient more), the step takes AdaPT's gradient work as a
// prologue: each element's gradient becomes
//   g' = normalized_gradient(gradient_with_l1(g, w, l1), norm_divisor(norms[layers[k]]))
// (kernels/adapt_step/adapt_step_math.h, the same functions), accumulated[k]
// += g', and the update uses g' for g. So the parameters, momentum and
// accumulators are those of normalize_accumulate_ followed by the plain step,
// bit for bit (tested), and the grads are only read. w is the parameter's
// value as the step loads it. Float storage only: AdaPT's formats change, and
// packed storage cannot follow them yet. norms lives on the kernels' device.
struct GradientPrologue {
  at::TensorList accumulated;  // empty: no prologue
  const double* norms = nullptr;
  c10::ArrayRef<int64_t> layers;  // tensor k's layer: its norm is norms[layers[k]]
  double l1 = 0;
  bool active() const { return !accumulated.empty(); }
};

// Note [Capturable QPU step]
// qpu_sgd_step_.capturable takes lr and step as 0-dim tensors on the
// parameters' device and a NaN counter there too, so a step needs nothing from
// the host and CUDA-graph capture records it whole: a replay reads the current
// lr (a scheduler writes the tensor between replays), draws from the current
// step, and advances the step tensor by one on the device, as torch's
// optimizers do with capturable=True. Packed storage's NaN results are added to
// the counter instead of raising, which would need a device-to-host read; the
// caller checks the counter where it synchronizes anyway (fxp.optim.QPUSGD's
// and fxp::optim::QpuSgd's check_nan). Float storage stores NaN
// results as NaN and counts nothing, as the plain op does. The update is the
// plain op's, bit for bit, with lr rounded to the lr tensor's dtype first
// (float32 lr with float64 grads is the one case where that differs). On the
// CPU the op reads the scalars on the host, where reading them costs nothing.

// Note [Packed QPU step]
// With packed storage the step reads codes, computes the same update
// (qpu_update_element, Note [QPU update on codes]) and writes codes: no float
// copy outlives the step, and the codes equal those of float storage whenever
// float storage is exact (codes below 2^24 in float32). A NaN result cannot be
// a code: that element keeps its old code, and the kernel counts it so the op
// can raise. The op raises after the update: the step has happened (every
// other element is updated), and the optimizers count it as a step, so a
// caller that catches the error goes on with fresh random streams. On float
// storage a NaN result is stored as the default quiet NaN (Note [NaN keeps its
// bits] explains why not the computed one).

// Note [QPU random streams]
// The tensor with stream index k draws its parameter rounding from Philox
// offset step * 2^32 + 2k and its momentum rounding from step * 2^32 + 2k + 1,
// with key seed; element i uses lane i % 4 of block i / 4 as in
// quantize_seeded. The optimizers pass each parameter's position in its
// parameter group as k, whether or not the other parameters have gradients,
// so a frozen or unused parameter never shifts the draws of the others. A step
// is reproducible from (seed, step) alone and identical on CPU and CUDA. The
// words are quantize_seeded's at that offset, the decision is not: the step
// rounds a toward-zero split (Note [QPU rounding on codes]), quantize t − floor(t).
// Stream indices are below 2^31, so the offsets of one step never reach the next's.
constexpr int64_t kMaxStreamIndex = (int64_t{1} << 31) - 1;
// QPU's initialization rounds with key seed + kInitKeyDelta (2^64 / the golden
// ratio), so its draws are independent of the update streams (key seed).
constexpr uint64_t kInitKeyDelta = 0x9E3779B97F4A7C15ull;
// A format change (Note [QPU format change]) rounds with key seed +
// kFormatChangeKeyDelta (frac(sqrt(2)), SHA-512's first constant): no step or
// initialization uses that key.
constexpr uint64_t kFormatChangeKeyDelta = 0x6A09E667F3BCC908ull;

inline namespace FXP_ISA {
FXP_HOST_DEVICE uint64_t qpu_param_offset(uint64_t step, int64_t stream) {
  return (step << 32) + 2 * static_cast<uint64_t>(stream);
}
FXP_HOST_DEVICE uint64_t qpu_momentum_offset(uint64_t step, int64_t stream) {
  return qpu_param_offset(step, stream) + 1;
}

// Whether the step's integer arithmetic fits code type float32 (Note [QPU code arithmetic]).
inline bool qpu_float_codes(const QpuSgdParams& p) {
  return p.total_bits <= kMaxBitsForFloatCodes && p.momentum_total_bits <= kMaxBitsForFloatCodes;
}

// The step's constants in compute type T (the grads' float type).
template <typename T>
QpuConstants<T> qpu_constants(const QpuSgdParams& p) {
  QpuConstants<T> c;
  c.lr = static_cast<T>(p.hyper.lr);
  c.momentum = static_cast<T>(p.hyper.momentum);
  c.weight_decay = static_cast<T>(p.hyper.weight_decay);
  c.scale = exp2_int<T>(p.frac_bits);
  c.inv_scale = exp2_int<T>(-p.frac_bits);
  c.momentum_scale = exp2_int<T>(p.momentum_frac_bits);
  c.momentum_inv_scale = exp2_int<T>(-p.momentum_frac_bits);
  c.delta_to_param = exp2_int<T>(p.frac_bits - p.momentum_frac_bits);
  c.param_limit = exp2_int<T>(p.total_bits + 1);
  c.momentum_limit = exp2_int<T>(p.momentum_total_bits + 1);
  c.param = code_bounds(p.total_bits, p.param_storage);
  c.momentum_bounds = code_bounds(p.momentum_total_bits, p.momentum_storage);
  return c;
}
}  // namespace FXP_ISA

// Updates params[k] and momentum[k] (empty list: no momentum) in place from
// grads[k]; all contiguous, same numel per k, stored as p says. streams[k] is
// tensor k's stream index (Note [QPU random streams]).
// counts: int64 [n, 2], receives (saturated, vanished) per tensor.
// nan_count (int64 0-dim; only needed with packed storage) receives the
// number of NaN results that packed storage could not hold. prologue: AdaPT's
// gradient work, when active (Note [AdaPT's fused QPU step]).
using QpuSgdCpu = void(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                       c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                       const at::Tensor& nan_count, const GradientPrologue& prologue);

// One build per CPU capability (qpu_sgd_kernel_cpu.cpp); Note [CPU kernel tables].
extern CpuKernelTable qpu_sgd_cpu_kernel;

inline void qpu_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                        c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                        const at::Tensor& nan_count, const GradientPrologue& prologue = {}) {
  cpu_kernel<QpuSgdCpu>(qpu_sgd_cpu_kernel)(params, grads, momentum, streams, p, counts, nan_count, prologue);
}

}  // namespace fxp::kernels
