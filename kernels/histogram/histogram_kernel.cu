// CUDA kernel of the fixed-point histogram: each block counts its grid-stride
// share into a histogram in shared memory, then adds it to the global counts
// (int64, atomically). Histograms too large for shared memory count in global
// memory directly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "histogram/histogram_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedBins = 8192;  // 32 KiB of unsigned counters

template <typename scalar_t, bool kShared>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const scalar_t* __restrict__ x, int64_t n, HistogramSpec spec,
                     unsigned long long* __restrict__ counts) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned int block_counts[];
  if constexpr (kShared) {
    for (int64_t b = threadIdx.x; b < spec.bins; b += blockDim.x) block_counts[b] = 0;
    __syncthreads();
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bin = histogram_bin(static_cast<double>(static_cast<acc_t>(x[i])), spec);
    if (bin < 0) continue;
    if constexpr (kShared) {
      atomicAdd(block_counts + bin, 1u);
    } else {
      atomicAdd(counts + bin, 1ull);
    }
  }
  if constexpr (kShared) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < spec.bins; b += blockDim.x) {
      if (block_counts[b] != 0) atomicAdd(counts + b, static_cast<unsigned long long>(block_counts[b]));
    }
  }
}

}  // namespace

void format_histogram_cuda(const at::Tensor& x, const HistogramSpec& spec, const at::Tensor& counts) {
  const int64_t n = x.numel();
  if (n == 0) return;
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are int64");
  auto* out = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // A block's shared counters are unsigned 32-bit: each block sees at most
  // ceil(n / blocks) elements, far below 2^32 at this grid size for any tensor
  // that fits a GPU's memory.
  const auto blocks =
      static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 4)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_format_histogram_cuda", [&] {
    if (spec.bins <= kMaxSharedBins) {
      histogram_kernel<scalar_t, true><<<blocks, kThreads, spec.bins * sizeof(unsigned int), stream>>>(
          x.const_data_ptr<scalar_t>(), n, spec, out);
    } else {
      histogram_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), n, spec, out);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fxp::kernels
