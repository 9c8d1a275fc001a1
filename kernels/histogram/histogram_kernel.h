// The fixed-point histogram of AdaPT's push-down: compute only.
// Note [Fused quantize and histogram] (kernels/histogram/histogram_bin.h) says why.
#pragma once

#include <ATen/core/Tensor.h>

#include "histogram/histogram_bin.h"

namespace fxp::kernels {

// counts (int64, contiguous, `spec.bins` entries, zeroed by the caller) +=
// the histogram of x (contiguous, floating point) after histogram_value.
void format_histogram_cpu(const at::Tensor& x, const HistogramSpec& spec, const at::Tensor& counts);
void format_histogram_cuda(const at::Tensor& x, const HistogramSpec& spec, const at::Tensor& counts);

}  // namespace fxp::kernels
