// CUDA quantize launcher. Same contract as quantize_cpu in quantize.h; runs on
// the current stream of x's device (the caller holds the device guard).
#pragma once

#include <ATen/cuda/PhiloxCudaState.h>

#include "quantize.h"

namespace fxp::kernels {

void quantize_cuda(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                   at::PhiloxCudaState philox, const at::Tensor& saturated,
                   const at::Tensor& saturated_count);

// Same contracts as pack_cpu and unpack_cpu; pack adds its NaN count to
// nan_count (int64, 0-dim, on the device).
void pack_cuda(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params,
               at::PhiloxCudaState philox, const at::Tensor& nan_count);
void unpack_cuda(const at::Tensor& codes, const at::Tensor& out, int frac_bits);

}  // namespace fxp::kernels
