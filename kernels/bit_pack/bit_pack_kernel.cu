// CUDA kernels of Note [Bit-packed codes]. pack: one thread per output byte,
// which gathers the bits of the (at most 9) codes that overlap it, so no two
// threads write one byte and no data atomics are needed; each code is
// range-checked by the thread of the byte that holds its bit 0, and the
// count (when asked for) is added atomically to one device int64. unpack: one thread per code,
// which reads the (at most 3) bytes it spans.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "bit_pack/bit_pack_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{sms} * 32)));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pack_bits_kernel(const scalar_t* __restrict__ codes, int64_t n, int64_t bytes, int bits, int64_t lo, int64_t hi,
                     uint8_t* __restrict__ packed, unsigned long long* __restrict__ outside) {
  unsigned long long local = 0;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < bytes;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first_bit = 8 * k;
    const int64_t last = min(n - 1, (first_bit + 7) / bits);
    uint32_t byte = 0;
    for (int64_t i = first_bit / bits; i <= last; ++i) {
      const auto code = static_cast<int64_t>(codes[i]);
      const uint32_t pattern = code_pattern(code, bits);
      const int64_t shift = i * bits - first_bit;  // where the code's bit 0 falls in this byte, in (-bits, 8)
      if (shift >= 0) {
        byte |= pattern << shift;
        local += static_cast<unsigned long long>((code < lo) | (code > hi));
      } else {
        byte |= pattern >> -shift;
      }
    }
    packed[k] = static_cast<uint8_t>(byte);  // drops the bits that belong to the next byte
  }
  if (outside != nullptr && local != 0) atomicAdd(outside, local);
}

template <typename out_t>
__global__ void __launch_bounds__(kThreads) unpack_bits_kernel(const uint8_t* __restrict__ packed, int64_t n, int bits,
                                                               bool is_signed, out_t* __restrict__ out) {
  const uint32_t mask = code_mask(bits);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first_bit = i * bits;
    const int64_t first = first_bit / 8, last = (first_bit + bits - 1) / 8;  // last < the byte count
    uint32_t word = 0;
    for (int64_t b = first; b <= last; ++b) word |= static_cast<uint32_t>(packed[b]) << (8 * (b - first));
    out[i] = static_cast<out_t>(code_from_pattern((word >> (first_bit % 8)) & mask, bits, is_signed));
  }
}

}  // namespace

int64_t pack_bits_cuda(const at::Tensor& codes, int bits, bool is_signed, const at::Tensor& packed,
                       bool count_outside) {
  const int64_t n = codes.numel();
  if (n == 0) return 0;
  const int64_t bytes = packed.numel();
  at::Tensor outside = count_outside ? at::zeros({}, codes.options().dtype(at::kLong)) : at::Tensor();
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the count is int64");
  auto* count = count_outside ? reinterpret_cast<unsigned long long*>(outside.data_ptr<int64_t>()) : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "fxp_pack_bits_cuda", [&] {
    pack_bits_kernel<scalar_t><<<grid_for(bytes), kThreads, 0, stream>>>(
        codes.const_data_ptr<scalar_t>(), n, bytes, bits, min_code(bits, is_signed), max_code(bits, is_signed),
        packed.data_ptr<uint8_t>(), count);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return count_outside ? outside.item<int64_t>() : 0;  // the check's one sync
}

void unpack_bits_cuda(const at::Tensor& packed, int bits, bool is_signed, const at::Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(out.scalar_type(), "fxp_unpack_bits_cuda", [&] {
    unpack_bits_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(packed.const_data_ptr<uint8_t>(), n, bits,
                                                                       is_signed, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fxp::kernels
