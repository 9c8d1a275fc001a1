// CUDA quantize launcher. Same contract as quantize_cpu in quantize_kernel.h; runs on
// the current stream of x's device (the caller holds the device guard).
#pragma once

#include <ATen/cuda/PhiloxCudaState.h>

#include "quantize/quantize_kernel.h"

namespace fxp::kernels {

// The Philox key and counter of a launch. A CUDA generator's state is unpacked
// on the device (so CUDA-graph replays draw fresh numbers), and its offset is
// read as ATen reads it (Note [Philox offsets from a generator]); an explicit
// offset is the counter itself.
struct CudaPhilox {
  at::PhiloxCudaState state;
  bool from_generator = false;
};

void quantize_cuda(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                   const CudaPhilox& philox, const at::Tensor& saturated, const at::Tensor& saturated_count);

// Same contracts as pack_cpu and unpack_cpu. pack adds its PackCounts to
// counts (int64 [2]: nan, off_grid, on the device); unpack does not check the
// codes' range (a check would cost a device-to-host copy per call).
void pack_cuda(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, const CudaPhilox& philox,
               bool exact, const at::Tensor& counts);
void unpack_cuda(const at::Tensor& codes, const at::Tensor& out, int frac_bits);

}  // namespace fxp::kernels
