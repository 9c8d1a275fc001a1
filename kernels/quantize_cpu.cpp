// CPU quantize kernel. This file is compiled once per CPU capability (see
// CMakeLists.txt: FXP_CPU_CAPABILITY is `default` or `avx2`); quantize_cpu.h's
// entry point picks the best one at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>

#include "fxp_math.h"
#include "quantize.h"

#ifndef FXP_CPU_CAPABILITY
#error "FXP_CPU_CAPABILITY must be defined by the build"
#endif

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

// Note [CPU chunking]
// Work is split into chunks of whole Philox blocks. A chunk first generates
// its random words with the blocks laid out structure-of-arrays, so that the
// Philox rounds vectorize across blocks, then runs a branch-free element loop.
// Every element's bits depend only on its index, never on the chunk or thread.
constexpr int64_t kChunkBlocks = 512;
constexpr int64_t kChunkElems = kChunkBlocks * 4;

void philox_chunk(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,
                  uint32_t* out) {
  uint32_t c0[kChunkBlocks], c1[kChunkBlocks], c2[kChunkBlocks], c3[kChunkBlocks];
  for (int64_t j = 0; j < nblocks; ++j) {
    const uint64_t block = first_block + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(offset);
    c1[j] = static_cast<uint32_t>(offset >> 32);
    c2[j] = static_cast<uint32_t>(block);
    c3[j] = static_cast<uint32_t>(block >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int64_t j = 0; j < nblocks; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t j = 0; j < nblocks; ++j) {
    out[4 * j + 0] = c0[j];
    out[4 * j + 1] = c1[j];
    out[4 * j + 2] = c2[j];
    out[4 * j + 3] = c3[j];
  }
}

template <typename scalar_t, Rounding R, Overflow O, bool kWriteMask>
int64_t quantize_chunk(const scalar_t* x, scalar_t* y, bool* saturated, int64_t begin,
                       int64_t end, const FxpSpec<at::opmath_type<scalar_t>>& spec, uint64_t seed,
                       uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  alignas(64) uint32_t random_bits[kChunkElems];
  if constexpr (R == Rounding::Stochastic) {
    philox_chunk(seed, offset, static_cast<uint64_t>(begin / 4), (end - begin + 3) / 4,
                 random_bits);
  }
  const int64_t n = end - begin;
  const scalar_t* xs = x + begin;
  scalar_t* ys = y + begin;
  int32_t count = 0;  // a chunk has at most kChunkElems elements; int32 keeps the loop narrow
  for (int64_t i = 0; i < n; ++i) {
    bool sat;
    const uint32_t bits = R == Rounding::Stochastic ? random_bits[i] : 0u;
    const opmath_t v = quantize_value<R, O>(static_cast<opmath_t>(xs[i]), spec, bits, &sat);
    ys[i] = static_cast<scalar_t>(v);
    if constexpr (kWriteMask) saturated[begin + i] = sat;
    count += sat;
  }
  return count;
}

template <typename scalar_t, Rounding R, Overflow O>
int64_t quantize_typed(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                       uint64_t seed, uint64_t offset, bool* saturated) {
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
      local += saturated != nullptr
                   ? quantize_chunk<scalar_t, R, O, true>(xp, yp, saturated, b, e, spec, seed, offset)
                   : quantize_chunk<scalar_t, R, O, false>(xp, yp, nullptr, b, e, spec, seed, offset);
    }
    total.fetch_add(local, std::memory_order_relaxed);
  });
  return total.load();
}

template <Rounding R, Overflow O>
int64_t quantize_dispatch_dtype(const at::Tensor& x, const at::Tensor& out,
                                const QuantizeParams& params, uint64_t seed, uint64_t offset,
                                bool* saturated) {
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_quantize_cpu", [&] {
    count = quantize_typed<scalar_t, R, O>(x, out, params, seed, offset, saturated);
  });
  return count;
}

template <Rounding R>
int64_t quantize_dispatch_overflow(const at::Tensor& x, const at::Tensor& out,
                                   const QuantizeParams& params, uint64_t seed, uint64_t offset,
                                   bool* saturated) {
  return params.overflow == Overflow::Wrap
             ? quantize_dispatch_dtype<R, Overflow::Wrap>(x, out, params, seed, offset, saturated)
             : quantize_dispatch_dtype<R, Overflow::Saturate>(x, out, params, seed, offset, saturated);
}

}  // namespace

int64_t quantize_cpu_impl(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                          uint64_t seed, uint64_t offset, bool* saturated) {
  switch (params.rounding) {
    case Rounding::NearestEven:
      return quantize_dispatch_overflow<Rounding::NearestEven>(x, out, params, seed, offset, saturated);
    case Rounding::Stochastic:
      return quantize_dispatch_overflow<Rounding::Stochastic>(x, out, params, seed, offset, saturated);
    case Rounding::Floor:
      return quantize_dispatch_overflow<Rounding::Floor>(x, out, params, seed, offset, saturated);
    case Rounding::NearestAway:
      return quantize_dispatch_overflow<Rounding::NearestAway>(x, out, params, seed, offset, saturated);
  }
  return 0;
}

}  // namespace fxp::kernels::FXP_CPU_CAPABILITY
