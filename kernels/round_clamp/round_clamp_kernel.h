// MSQ's RoundClamp quantizer (Note [RoundClamp]): compute only. csrc/ops/round_clamp
// validates the arguments and registers the ops.
#pragma once

#include <ATen/core/Tensor.h>

#include "round_clamp/round_clamp_math.h"

namespace fxp::kernels {

// What one pass over w writes; an undefined tensor is not wanted. All are
// contiguous and on w's device. quantized and lsb: shaped like w, of its
// dtype; codes: shaped like w, an integer type wide enough for +-(2^n - 1).
// totals (int64 [3], zeroed by the caller, always given): the numbers of
// non-zero LSBs and of NaN weights, and scratch. When the counts are final,
// lsb_l1 (0-dim, w's dtype) gets sum |LSB| (NaN if a weight is NaN) and
// lsb_nonzero (0-dim int64) the count: on CUDA the last block writes them, so
// no second launch and no synchronization.
struct RoundClampOutputs {
  at::Tensor quantized, lsb, codes, totals, lsb_l1, lsb_nonzero;
};

void round_clamp_cpu(const at::Tensor& w, const RoundClampOutputs& out, const RoundClampSpec& spec);
void round_clamp_cuda(const at::Tensor& w, const RoundClampOutputs& out, const RoundClampSpec& spec);

// grad_w = grad_quantized + grad_lsb_l1 * sign(LSB(w)); grad_lsb_l1 is a
// 0-dim tensor on w's device (read there: no synchronization).
void round_clamp_backward_cpu(const at::Tensor& grad_quantized, const at::Tensor& grad_lsb_l1, const at::Tensor& w,
                              const at::Tensor& grad_w, const RoundClampSpec& spec);
void round_clamp_backward_cuda(const at::Tensor& grad_quantized, const at::Tensor& grad_lsb_l1, const at::Tensor& w,
                               const at::Tensor& grad_w, const RoundClampSpec& spec);

}  // namespace fxp::kernels
