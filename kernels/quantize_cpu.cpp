// CPU quantize kernel. This file is compiled once per CPU capability (see
// CMakeLists.txt: FXP_CPU_CAPABILITY is default_, avx2 or avx512);
// cpu_dispatch.cpp picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>

#include "fxp_math.h"
#include "philox_cpu.h"
#include "quantize.h"

#ifndef FXP_CPU_CAPABILITY
#error "FXP_CPU_CAPABILITY must be defined by the build"
#endif

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

// Note [CPU chunking]
// at::parallel_for hands out chunks of kChunkElems elements (whole Philox
// blocks). Every element's bits depend only on its index, never on the chunk,
// the thread or the vector width, so results do not depend on the thread count
// or the CPU build.
constexpr int64_t kChunkBlocks = 512;
constexpr int64_t kChunkElems = kChunkBlocks * 4;

// What the element loop records besides the output. Without statistics the
// saturation test compiles away.
enum class Stats { kNone, kCount, kMaskAndCount };

// The element loop over n elements; random_bits[i] is element i's draw (SR only).
template <typename scalar_t, Rounding R, Overflow O, Stats S>
int32_t quantize_span(const scalar_t* xs, scalar_t* ys, bool* saturated, int64_t n,
                      const FxpSpec<at::opmath_type<scalar_t>>& spec, const uint32_t* random_bits) {
  using opmath_t = at::opmath_type<scalar_t>;
  int32_t count = 0;  // n <= kChunkElems; int32 keeps the vector loop narrow
  // ys may be xs (in-place); any other overlap is rejected by the op. Element i
  // reads xs[i] before writing ys[i], so there is no loop-carried dependence.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    bool sat;
    const uint32_t bits = R == Rounding::Stochastic ? random_bits[i] : 0u;
    const opmath_t v = quantize_value<R, O>(static_cast<opmath_t>(xs[i]), spec, bits, &sat);
    ys[i] = static_cast<scalar_t>(v);
    if constexpr (S == Stats::kMaskAndCount) saturated[i] = sat;
    if constexpr (S != Stats::kNone) count += sat;
  }
  return count;
}

// Note [Interleaving Philox with the element loop]
// SR generates the draws for a short span (kSpanElems elements, L1-resident)
// and consumes them at once, so Philox's arithmetic overlaps the streaming
// loads and stores instead of leaving the memory system idle in between.
constexpr int64_t kSpanElems = 256;

template <typename scalar_t, Rounding R, Overflow O, Stats S>
int64_t quantize_chunk(const scalar_t* x, scalar_t* y, bool* saturated, int64_t begin,
                       int64_t end, const FxpSpec<at::opmath_type<scalar_t>>& spec, uint64_t seed,
                       uint64_t offset) {
  constexpr bool kWriteMask = S == Stats::kMaskAndCount;
  bool* sat = kWriteMask ? saturated + begin : nullptr;
  if constexpr (R != Rounding::Stochastic) {
    return quantize_span<scalar_t, R, O, S>(x + begin, y + begin, sat, end - begin, spec,
                                                     nullptr);
  } else {
    alignas(64) uint32_t random_bits[kSpanElems];
    int64_t count = 0;
    for (int64_t s = begin; s < end; s += kSpanElems) {  // begin is a multiple of 4
      const int64_t n = std::min(kSpanElems, end - s);
      philox_chunk(seed, offset, static_cast<uint64_t>(s / 4), (n + 3) / 4, random_bits);
      count += quantize_span<scalar_t, R, O, S>(x + s, y + s, kWriteMask ? sat + (s - begin) : nullptr,
                                                         n, spec, random_bits);
    }
    return count;
  }
}

template <typename scalar_t, Rounding R, Overflow O, Stats S>
int64_t quantize_typed(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                       const CpuQuantizeRequest& request) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto spec = make_fxp_spec<opmath_t>(params.total_bits, params.frac_bits);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  const int64_t n = x.numel();
  const int64_t nchunks = (n + kChunkElems - 1) / kChunkElems;
  std::atomic<int64_t> total{0};
  // 16 chunks (32K elements) per task keeps scheduling overhead small.
  at::parallel_for(0, nchunks, 16, [&](int64_t cbegin, int64_t cend) {
    int64_t local = 0;
    for (int64_t c = cbegin; c < cend; ++c) {
      const int64_t b = c * kChunkElems, e = std::min(n, b + kChunkElems);
      local += quantize_chunk<scalar_t, R, O, S>(xp, yp, request.saturated, b, e, spec, request.seed,
                                                 request.offset);
    }
    total.fetch_add(local, std::memory_order_relaxed);
  });
  return total.load();
}

template <Rounding R, Overflow O, Stats S>
int64_t quantize_dispatch_dtype(const at::Tensor& x, const at::Tensor& out,
                                const QuantizeParams& params, const CpuQuantizeRequest& request) {
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_quantize_cpu", [&] {
    count = quantize_typed<scalar_t, R, O, S>(x, out, params, request);
  });
  return count;
}

template <Rounding R, Overflow O>
int64_t quantize_dispatch_stats(const at::Tensor& x, const at::Tensor& out,
                                const QuantizeParams& params, const CpuQuantizeRequest& request) {
  if (request.saturated != nullptr) {
    return quantize_dispatch_dtype<R, O, Stats::kMaskAndCount>(x, out, params, request);
  }
  return request.count ? quantize_dispatch_dtype<R, O, Stats::kCount>(x, out, params, request)
                       : quantize_dispatch_dtype<R, O, Stats::kNone>(x, out, params, request);
}

template <Rounding R>
int64_t quantize_dispatch_overflow(const at::Tensor& x, const at::Tensor& out,
                                   const QuantizeParams& params, const CpuQuantizeRequest& request) {
  return params.overflow == Overflow::Wrap
             ? quantize_dispatch_stats<R, Overflow::Wrap>(x, out, params, request)
             : quantize_dispatch_stats<R, Overflow::Saturate>(x, out, params, request);
}

}  // namespace

void philox_fill(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,
                 uint32_t* out) {
  philox_chunk(seed, offset, first_block, nblocks, out);
}

int64_t quantize_cpu_impl(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                          const CpuQuantizeRequest& request) {
  switch (params.rounding) {
    case Rounding::NearestEven:
      return quantize_dispatch_overflow<Rounding::NearestEven>(x, out, params, request);
    case Rounding::Stochastic:
      return quantize_dispatch_overflow<Rounding::Stochastic>(x, out, params, request);
    case Rounding::Floor:
      return quantize_dispatch_overflow<Rounding::Floor>(x, out, params, request);
    case Rounding::NearestAway:
      return quantize_dispatch_overflow<Rounding::NearestAway>(x, out, params, request);
  }
  return 0;
}

}  // namespace fxp::kernels::FXP_CPU_CAPABILITY
