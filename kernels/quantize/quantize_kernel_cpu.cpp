// CPU quantize, pack and unpack kernels. This file is compiled once per CPU
// capability (see CMakeLists.txt: FXP_CPU_CAPABILITY is default_, avx2 or
// avx512); each build registers its entry points (Note [CPU kernel tables]).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "common/cpu_loops.h"
#include "common/fxp_math.h"
#include "common/philox_cpu.h"
#include "quantize/quantize_kernel.h"

#ifndef FXP_CPU_CAPABILITY
#error "FXP_CPU_CAPABILITY must be defined by the build"
#endif

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

// What one quantize call needs beyond the tensors and the format: the Philox
// key and offset, where to write the per-element saturation flags (or null),
// and whether to count saturated elements.
struct CpuQuantizeRequest {
  uint64_t seed;
  uint64_t offset;
  bool* saturated;
  bool count;
};

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
    const opmath_t x = static_cast<opmath_t>(xs[i]);
    ys[i] = nan_or(xs[i], x, quantize_value<R, O>(x, spec, bits, &sat));  // Note [NaN keeps its bits]
    if constexpr (S == Stats::kMaskAndCount) saturated[i] = sat;
    if constexpr (S != Stats::kNone) count += sat;
  }
  return count;
}

template <typename scalar_t, Rounding R, Overflow O, Stats S>
int64_t quantize_typed(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                       const CpuQuantizeRequest& request) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto spec = make_fxp_spec<opmath_t>(params.total_bits, params.frac_bits);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  constexpr bool kStochastic = R == Rounding::Stochastic;
  // Deterministic roundings need no draws, so a span is a whole chunk.
  return sum_over_spans<int64_t>(x.numel(), kStochastic ? kSpanElems : kChunkElems, [&](int64_t s, int64_t len) {
    alignas(64) uint32_t random_bits[kSpanElems];
    if constexpr (kStochastic) {
      philox_chunk(request.seed, request.offset, static_cast<uint64_t>(s / 4), (len + 3) / 4, random_bits);
    }
    bool* saturated = S == Stats::kMaskAndCount ? request.saturated + s : nullptr;
    return static_cast<int64_t>(quantize_span<scalar_t, R, O, S>(xp + s, yp + s, saturated, len, spec, random_bits));
  });
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

// --- packed storage ------------------------------------------------------

// Packs n elements into integer codes, exactly (Note [Codes in float32]): a
// float64 tensor in float64, the others in float32. A NaN element gets code 0
// and is counted. With kExact, elements that are not on the grid (rounded to
// another value, or saturated) are counted too.
template <typename scalar_t, typename code_t, Rounding R, Overflow O, bool kExact>
PackCounts pack_span(const scalar_t* xs, code_t* codes, int64_t n, const FxpSpec<code_compute_t<scalar_t>>& spec,
                     const uint32_t* random_bits) {
  using T = code_compute_t<scalar_t>;
  int32_t nans = 0, off_grid = 0;
  for (int64_t i = 0; i < n; ++i) {
    bool sat, off;
    const uint32_t bits = R == Rounding::Stochastic ? random_bits[i] : 0u;
    const T x = static_cast<T>(xs[i]);
    const int64_t code = pack_code<R, O>(x, spec, bits, &sat, &off);
    const bool nan = x != x;
    nans += nan;
    if constexpr (kExact) off_grid += (!nan) & (sat | off);  // bitwise: a branch stops the vectorizer
    codes[i] = static_cast<code_t>(code);
  }
  return PackCounts{nans, off_grid};
}

template <typename scalar_t, typename code_t, Rounding R, Overflow O, bool kExact>
PackCounts pack_typed(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, uint64_t seed,
                      uint64_t offset) {
  const auto spec = make_code_spec<code_compute_t<scalar_t>>(params.total_bits, params.frac_bits);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  code_t* cp = codes.data_ptr<code_t>();
  return sum_over_spans<PackCounts>(x.numel(), kSpanElems, [&](int64_t s, int64_t len) {
    alignas(64) uint32_t random_bits[kSpanElems];
    if constexpr (R == Rounding::Stochastic) {
      philox_chunk(seed, offset, static_cast<uint64_t>(s / 4), (len + 3) / 4, random_bits);
    }
    return pack_span<scalar_t, code_t, R, O, kExact>(xp + s, cp + s, len, spec, random_bits);
  });
}

template <Rounding R, Overflow O, bool kExact>
PackCounts pack_dispatch(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, uint64_t seed,
                         uint64_t offset) {
  PackCounts counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_pack_cpu", [&] {
    switch (codes.scalar_type()) {
      case at::kChar: counts = pack_typed<scalar_t, int8_t, R, O, kExact>(x, codes, params, seed, offset); break;
      case at::kShort: counts = pack_typed<scalar_t, int16_t, R, O, kExact>(x, codes, params, seed, offset); break;
      default: counts = pack_typed<scalar_t, int32_t, R, O, kExact>(x, codes, params, seed, offset); break;
    }
  });
  return counts;
}

template <Rounding R>
PackCounts pack_dispatch_overflow(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params,
                                  uint64_t seed, uint64_t offset) {
  return params.overflow == Overflow::Wrap ? pack_dispatch<R, Overflow::Wrap, false>(x, codes, params, seed, offset)
                                           : pack_dispatch<R, Overflow::Saturate, false>(x, codes, params, seed, offset);
}

// code * 2^-F rounded once to the output type (Note [Codes in float32]);
// codes outside the format are counted.
template <typename code_t, typename scalar_t>
int64_t unpack_typed(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits) {
  const auto inv_scale = exp2_int<code_compute_t<scalar_t>>(-frac_bits);
  // The format's bounds fit code_t (pack picks the type), so the loop stays
  // in the codes' width and vectorizes.
  const auto code_min = static_cast<code_t>(-(int64_t{1} << (total_bits - 1)));
  const auto code_max = static_cast<code_t>((int64_t{1} << (total_bits - 1)) - 1);
  const code_t* cp = codes.const_data_ptr<code_t>();
  scalar_t* yp = out.data_ptr<scalar_t>();
  return sum_over_spans<int64_t>(codes.numel(), kChunkElems, [&](int64_t s, int64_t len) {
    int32_t outside = 0;  // a span has kChunkElems elements
    for (int64_t i = s; i < s + len; ++i) {
      const code_t c = cp[i];
      yp[i] = unpack_code<scalar_t>(c, inv_scale);
      outside += (c < code_min) | (c > code_max);
    }
    return int64_t{outside};
  });
}

PackCounts pack(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, uint64_t seed,
                uint64_t offset, bool exact) {
  if (x.numel() == 0) return {};
  if (exact) {  // round half to even, saturating, counting what it changes
    return pack_dispatch<Rounding::NearestEven, Overflow::Saturate, true>(x, codes, params, seed, offset);
  }
  switch (params.rounding) {
    case Rounding::NearestEven: return pack_dispatch_overflow<Rounding::NearestEven>(x, codes, params, seed, offset);
    case Rounding::Stochastic: return pack_dispatch_overflow<Rounding::Stochastic>(x, codes, params, seed, offset);
    case Rounding::Floor: return pack_dispatch_overflow<Rounding::Floor>(x, codes, params, seed, offset);
    case Rounding::NearestAway: return pack_dispatch_overflow<Rounding::NearestAway>(x, codes, params, seed, offset);
  }
  return {};
}

int64_t unpack(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits) {
  if (codes.numel() == 0) return 0;
  int64_t outside = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fxp_unpack_cpu", [&] {
    switch (codes.scalar_type()) {
      case at::kChar: outside = unpack_typed<int8_t, scalar_t>(codes, out, total_bits, frac_bits); break;
      case at::kShort: outside = unpack_typed<int16_t, scalar_t>(codes, out, total_bits, frac_bits); break;
      default: outside = unpack_typed<int32_t, scalar_t>(codes, out, total_bits, frac_bits); break;
    }
  });
  return outside;
}

void philox_fill(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks, uint32_t* out) {
  philox_chunk(seed, offset, first_block, nblocks, out);
}

int64_t quantize_rounding(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
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

void quantize(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params, uint64_t seed,
              uint64_t offset, const at::Tensor& saturated, const at::Tensor& saturated_count) {
  if (x.numel() == 0) return;
  const CpuQuantizeRequest request{seed, offset, saturated.defined() ? saturated.data_ptr<bool>() : nullptr,
                                   saturated_count.defined()};
  const int64_t count = quantize_rounding(x, out, params, request);
  if (saturated_count.defined()) *saturated_count.data_ptr<int64_t>() += count;
}

FXP_REGISTER_CPU_KERNEL(quantize_cpu_kernel, QuantizeCpu, quantize);
FXP_REGISTER_CPU_KERNEL(pack_cpu_kernel, PackCpu, pack);
FXP_REGISTER_CPU_KERNEL(unpack_cpu_kernel, UnpackCpu, unpack);
FXP_REGISTER_CPU_KERNEL(philox_fill_cpu_kernel, PhiloxFillCpu, philox_fill);

}  // namespace
}  // namespace fxp::kernels::FXP_CPU_CAPABILITY

namespace fxp::kernels {
FXP_DEFINE_CPU_KERNEL_TABLE(quantize_cpu_kernel, "quantize");
FXP_DEFINE_CPU_KERNEL_TABLE(pack_cpu_kernel, "pack");
FXP_DEFINE_CPU_KERNEL_TABLE(unpack_cpu_kernel, "unpack");
FXP_DEFINE_CPU_KERNEL_TABLE(philox_fill_cpu_kernel, "philox_fill");
}  // namespace fxp::kernels
