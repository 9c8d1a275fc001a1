// CUDA launcher of the fused QPU SGD step; same contract as qpu_sgd_cpu in
// qpu_sgd_kernel.h. One launch covers up to kMaxTensors tensors (a whole group
// when it is small), on the current stream of the tensors' device.
#pragma once

#include "qpu_sgd/qpu_sgd_kernel.h"

namespace fxp::kernels {

void qpu_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                  c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                  const at::Tensor& nan_count, const GradientPrologue& prologue = {});

}  // namespace fxp::kernels
