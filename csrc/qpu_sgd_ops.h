// The fused QPU SGD step op, written once over a Backend (see quantize_ops.h
// for the pattern): Backend::launch(params, grads, momentum, p, counts),
// Backend::DeviceGuard and Backend::kIsMeta.
#pragma once

#include <ATen/ATen.h>

#include "qpu_sgd_args.h"

namespace fxp {

template <class Backend>
at::Tensor qpu_sgd_step(at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers, double lr, double momentum,
                        double weight_decay, bool nesterov, int64_t total_bits, int64_t frac_bits,
                        int64_t momentum_total_bits, int64_t momentum_frac_bits,
                        c10::string_view rounding, int64_t seed, int64_t step,
                        c10::string_view momentum_form) {
  const QpuSgdArgs args{lr,        momentum,   weight_decay,        nesterov,
                        total_bits, frac_bits, momentum_total_bits, momentum_frac_bits,
                        rounding,  seed,       step,                momentum_form};
  const auto p = check_qpu_sgd(params, grads, momentum_buffers, args, !Backend::kIsMeta);
  const auto options = params.empty() ? at::TensorOptions(at::kLong) : params[0].options().dtype(at::kLong);
  // (saturated, vanished) per tensor; see kernels/qpu_sgd.h.
  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size()), 2}, options);
  if constexpr (!Backend::kIsMeta) {
    if (!params.empty()) {
      typename Backend::DeviceGuard guard(params[0].device());
      Backend::launch(params, grads, momentum_buffers, p, counts);
    }
  }
  return counts;
}

}  // namespace fxp
