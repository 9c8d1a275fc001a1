// CUDA quantize kernel: one thread per Philox block of four elements, a
// grid-stride loop, and vector loads and stores where the pointers allow.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <utility>

#include "common/fxp_math.h"
#include "quantize/quantize_kernel_cuda.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;

// The Philox key and counter of this launch (see CudaPhilox); deterministic
// roundings need none.
template <Rounding R>
__device__ __forceinline__ std::pair<uint64_t, uint64_t> philox_key_and_counter(const CudaPhilox& philox) {
  if constexpr (R != Rounding::Stochastic) return {0, 0};
  const auto seeds = at::cuda::philox::unpack(philox.state);
  const uint64_t offset = std::get<1>(seeds);
  return {std::get<0>(seeds), philox.from_generator ? philox_counter_from_generator(offset) : offset};
}

template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

template <typename scalar_t, Rounding R, Overflow O, bool kWriteMask, bool kCount>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const scalar_t* x, scalar_t* y,  // may alias (in-place)
                    bool* __restrict__ saturated, int64_t n,
                    FxpSpec<at::opmath_type<scalar_t>> spec, CudaPhilox philox,
                    unsigned long long* __restrict__ saturated_count, bool aligned) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto [seed, offset] = philox_key_and_counter<R>(philox);
  const int64_t nblocks = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long local = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nblocks;
       b += stride) {
    PhiloxBlock bits{{0u, 0u, 0u, 0u}};
    if constexpr (R == Rounding::Stochastic) bits = philox4x32_10(seed, offset, static_cast<uint64_t>(b));
    const int64_t i0 = b * 4;
    bool sat[4] = {false, false, false, false};
    if (aligned && i0 + 4 <= n) {
      Vec4<scalar_t> in = reinterpret_cast<const Vec4<scalar_t>*>(x)[b];
      Vec4<scalar_t> res;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const opmath_t v = static_cast<opmath_t>(in.v[l]);
        res.v[l] = nan_or(in.v[l], v, quantize_value<R, O>(v, spec, bits.lane[l], &sat[l]));  // Note [NaN keeps its bits]
      }
      reinterpret_cast<Vec4<scalar_t>*>(y)[b] = res;
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (i0 + l < n) {
          const scalar_t in = x[i0 + l];
          const opmath_t v = static_cast<opmath_t>(in);
          y[i0 + l] = nan_or(in, v, quantize_value<R, O>(v, spec, bits.lane[l], &sat[l]));
        }
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if constexpr (kWriteMask) {
        if (i0 + l < n) saturated[i0 + l] = sat[l];
      }
      local += sat[l];
    }
  }
  if constexpr (kCount) {
    for (int delta = 16; delta > 0; delta /= 2) local += __shfl_down_sync(0xffffffffu, local, delta);
    if ((threadIdx.x & 31) == 0 && local != 0) atomicAdd(saturated_count, local);
  }
}

template <typename scalar_t, Rounding R, Overflow O>
void launch_typed(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                  const CudaPhilox& philox, bool* saturated, unsigned long long* count) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = x.numel();
  const auto* xp = x.const_data_ptr<scalar_t>();
  auto* yp = out.mutable_data_ptr<scalar_t>();
  const auto spec = make_fxp_spec<opmath_t>(params.total_bits, params.frac_bits);
  constexpr auto kVecBytes = sizeof(Vec4<scalar_t>);
  const bool aligned = reinterpret_cast<uintptr_t>(xp) % kVecBytes == 0 &&
                       reinterpret_cast<uintptr_t>(yp) % kVecBytes == 0;
  const int64_t nblocks = (n + 3) / 4;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::min<int64_t>((nblocks + kThreads - 1) / kThreads, int64_t{sms} * 16);
  auto stream = at::cuda::getCurrentCUDAStream();
#define FXP_LAUNCH(MASK, COUNT)                                                                  \
  quantize_kernel<scalar_t, R, O, MASK, COUNT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>( \
      xp, yp, saturated, n, spec, philox, count, aligned)
  if (saturated != nullptr && count != nullptr) FXP_LAUNCH(true, true);
  else if (saturated != nullptr) FXP_LAUNCH(true, false);
  else if (count != nullptr) FXP_LAUNCH(false, true);
  else FXP_LAUNCH(false, false);
#undef FXP_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Rounding R, Overflow O>
void launch_dtype(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                  const CudaPhilox& philox, bool* saturated, unsigned long long* count) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_quantize_cuda", [&] {
    launch_typed<scalar_t, R, O>(x, out, params, philox, saturated, count);
  });
}

template <Rounding R>
void launch_overflow(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                     const CudaPhilox& philox, bool* saturated, unsigned long long* count) {
  if (params.overflow == Overflow::Wrap) {
    launch_dtype<R, Overflow::Wrap>(x, out, params, philox, saturated, count);
  } else {
    launch_dtype<R, Overflow::Saturate>(x, out, params, philox, saturated, count);
  }
}

// --- packed storage: one thread per Philox block, as above ----------------
// counts[0] receives the NaN elements, counts[1] (kExact) the off-grid ones; see pack_span in quantize_kernel_cpu.cpp.
template <typename scalar_t, typename code_t, Rounding R, Overflow O, bool kExact>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const scalar_t* __restrict__ x, code_t* __restrict__ codes, int64_t n,
                FxpSpec<code_compute_t<scalar_t>> spec,
                CudaPhilox philox, unsigned long long* __restrict__ counts) {
  const auto [seed, offset] = philox_key_and_counter<R>(philox);
  const int64_t nblocks = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long nans = 0, off_grid = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nblocks; b += stride) {
    PhiloxBlock bits{{0u, 0u, 0u, 0u}};
    if constexpr (R == Rounding::Stochastic) bits = philox4x32_10(seed, offset, static_cast<uint64_t>(b));
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = b * 4 + l;
      if (i < n) {
        bool sat, off;
        const auto v = static_cast<code_compute_t<scalar_t>>(x[i]);  // Note [Codes in float32]
        const int64_t code = pack_code<R, O>(v, spec, bits.lane[l], &sat, &off);
        const bool nan = v != v;
        nans += nan;
        if constexpr (kExact) off_grid += !nan && (sat || off);
        codes[i] = static_cast<code_t>(code);
      }
    }
  }
  for (int delta = 16; delta > 0; delta /= 2) {
    nans += __shfl_down_sync(0xffffffffu, nans, delta);
    off_grid += __shfl_down_sync(0xffffffffu, off_grid, delta);
  }
  if ((threadIdx.x & 31) == 0) {
    if (nans != 0) atomicAdd(counts, nans);
    if (off_grid != 0) atomicAdd(counts + 1, off_grid);
  }
}

template <typename code_t, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const code_t* __restrict__ codes, scalar_t* __restrict__ out, int64_t n,
                  code_compute_t<scalar_t> inv_scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = unpack_code<scalar_t>(codes[i], inv_scale);  // Note [Codes in float32]
  }
}

int64_t grid_for(int64_t threads_needed) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, int64_t{sms} * 16));
}

template <Rounding R, Overflow O, bool kExact>
void launch_pack(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params,
                 const CudaPhilox& philox, unsigned long long* counts) {
  const int64_t n = x.numel();
  const auto grid = static_cast<unsigned>(grid_for((n + 3) / 4));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_pack_cuda", [&] {
    const auto spec = make_code_spec<code_compute_t<scalar_t>>(params.total_bits, params.frac_bits);
    const auto* xp = x.const_data_ptr<scalar_t>();
    switch (codes.scalar_type()) {
      case at::kChar:
        pack_kernel<scalar_t, int8_t, R, O, kExact><<<grid, kThreads, 0, stream>>>(
            xp, codes.data_ptr<int8_t>(), n, spec, philox, counts);
        break;
      case at::kShort:
        pack_kernel<scalar_t, int16_t, R, O, kExact><<<grid, kThreads, 0, stream>>>(
            xp, codes.data_ptr<int16_t>(), n, spec, philox, counts);
        break;
      default:
        pack_kernel<scalar_t, int32_t, R, O, kExact><<<grid, kThreads, 0, stream>>>(
            xp, codes.data_ptr<int32_t>(), n, spec, philox, counts);
        break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Rounding R>
void launch_pack_overflow(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params,
                          const CudaPhilox& philox, unsigned long long* counts) {
  if (params.overflow == Overflow::Wrap) {
    launch_pack<R, Overflow::Wrap, false>(x, codes, params, philox, counts);
  } else {
    launch_pack<R, Overflow::Saturate, false>(x, codes, params, philox, counts);
  }
}

}  // namespace

void pack_cuda(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, const CudaPhilox& philox,
               bool exact, const at::Tensor& counts) {
  if (x.numel() == 0) return;
  auto* count = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  if (exact) return launch_pack<Rounding::NearestEven, Overflow::Saturate, true>(x, codes, params, philox, count);
  switch (params.rounding) {
    case Rounding::NearestEven: return launch_pack_overflow<Rounding::NearestEven>(x, codes, params, philox, count);
    case Rounding::Stochastic: return launch_pack_overflow<Rounding::Stochastic>(x, codes, params, philox, count);
    case Rounding::Floor: return launch_pack_overflow<Rounding::Floor>(x, codes, params, philox, count);
    case Rounding::NearestAway: return launch_pack_overflow<Rounding::NearestAway>(x, codes, params, philox, count);
  }
}

void unpack_cuda(const at::Tensor& codes, const at::Tensor& out, int frac_bits) {
  const int64_t n = codes.numel();
  if (n == 0) return;
  const auto grid = static_cast<unsigned>(grid_for(n));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fxp_unpack_cuda", [&] {
    const auto inv_scale = exp2_int<code_compute_t<scalar_t>>(-frac_bits);
    auto* yp = out.data_ptr<scalar_t>();
    switch (codes.scalar_type()) {
      case at::kChar:
        unpack_kernel<int8_t, scalar_t><<<grid, kThreads, 0, stream>>>(codes.const_data_ptr<int8_t>(), yp, n, inv_scale);
        break;
      case at::kShort:
        unpack_kernel<int16_t, scalar_t><<<grid, kThreads, 0, stream>>>(codes.const_data_ptr<int16_t>(), yp, n, inv_scale);
        break;
      default:
        unpack_kernel<int32_t, scalar_t><<<grid, kThreads, 0, stream>>>(codes.const_data_ptr<int32_t>(), yp, n, inv_scale);
        break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quantize_cuda(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                   const CudaPhilox& philox, const at::Tensor& saturated, const at::Tensor& saturated_count) {
  if (x.numel() == 0) return;
  bool* sat = saturated.defined() ? saturated.data_ptr<bool>() : nullptr;
  auto* count = saturated_count.defined()
                    ? reinterpret_cast<unsigned long long*>(saturated_count.data_ptr<int64_t>())
                    : nullptr;
  switch (params.rounding) {
    case Rounding::NearestEven:
      return launch_overflow<Rounding::NearestEven>(x, out, params, philox, sat, count);
    case Rounding::Stochastic:
      return launch_overflow<Rounding::Stochastic>(x, out, params, philox, sat, count);
    case Rounding::Floor:
      return launch_overflow<Rounding::Floor>(x, out, params, philox, sat, count);
    case Rounding::NearestAway:
      return launch_overflow<Rounding::NearestAway>(x, out, params, philox, sat, count);
  }
}

}  // namespace fxp::kernels
