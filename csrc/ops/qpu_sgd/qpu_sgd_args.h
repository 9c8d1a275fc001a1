// Validation of the fused QPU SGD step's arguments, shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <vector>

#include "ops/aliasing.h"
#include "qpu_sgd/qpu_sgd_kernel.h"

namespace fxp {

// The schema's arguments, as the op receives them.
struct QpuSgdArgs {
  double lr, momentum, weight_decay;
  bool nesterov;
  int64_t total_bits, frac_bits, momentum_total_bits, momentum_frac_bits;
  c10::string_view rounding;
  int64_t seed, step;
  c10::string_view momentum_form;
  at::OptionalIntArrayRef stream_indices;
  const char* op = "fxp::qpu_sgd_step_";  // the overload, which errors name
};

// Checks the lists (lengths, devices, dtypes, shapes, contiguity, overlaps)
// and the scalars, and returns the kernel parameters. Errors name the bad argument.
// `scalars`: more tensors of the call (the capturable form's lr, step and
// nan_count), in the same overlap check as the lists.
kernels::QpuSgdParams check_qpu_sgd(at::TensorList params, at::TensorList grads,
                                    at::TensorList momentum_buffers, const QpuSgdArgs& args,
                                    bool check_memory = true, c10::ArrayRef<NamedTensorList> scalars = {});

// The capturable form's device scalars (Note [Capturable QPU step]): lr a
// 0-dim float32 or float64 tensor, step and nan_count 0-dim int64 tensors,
// all on the parameters' device (check_qpu_sgd checks that they overlap nothing).
void check_capturable_scalars(at::TensorList params, const at::Tensor& lr, const at::Tensor& step,
                              const at::Tensor& nan_count);

// The error of a step whose results had `nans` NaNs that packed storage could
// not hold (Note [Packed QPU step]): the plain op raises it at once, the
// capturable optimizers when their count is checked.
void check_no_nan_results(int64_t nans, const char* op = "fxp::qpu_sgd_step_");

// Each tensor's stream index (Note [QPU random streams]): stream_indices, or
// the tensors' positions in the list. Checked: one per tensor, in range, distinct.
std::vector<int64_t> qpu_stream_indices(const char* op, size_t n, at::OptionalIntArrayRef stream_indices);

}  // namespace fxp
