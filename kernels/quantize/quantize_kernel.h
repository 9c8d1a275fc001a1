// Quantize kernels (quantize, pack, unpack): compute only. Callers (csrc/ops/quantize)
// validate arguments, make the input contiguous and allocate outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "common/cpu_capability.h"
#include "common/fxp_math.h"

namespace fxp::kernels {

struct QuantizeParams {
  int total_bits;
  int frac_bits;
  Rounding rounding;
  Overflow overflow;
};

// What pack found that it cannot store faithfully: NaN elements (their codes
// are 0), and with `exact` the elements that are not on the grid (rounded to
// another value, or saturated). The caller reports the errors.
struct PackCounts {
  int64_t nan = 0;
  int64_t off_grid = 0;
  PackCounts& operator+=(const PackCounts& o) {
    nan += o.nan, off_grid += o.off_grid;
    return *this;
  }
};

// --- CPU, one build per capability (quantize_kernel_cpu.cpp) -----------------
// Quantizes the contiguous x into the contiguous out (same shape and dtype;
// out may be x). Element i, in row-major order, takes lane i % 4 of the
// Philox block (seed, offset, i / 4) when rounding is stochastic.
// If saturated is defined (bool, contiguous, same numel) it receives the
// per-element saturation flag. If saturated_count is defined (int64, 0-dim)
// the number of saturated elements is added to it.
using QuantizeCpu = void(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params, uint64_t seed,
                         uint64_t offset, const at::Tensor& saturated, const at::Tensor& saturated_count);

// Packs the contiguous x into the contiguous integer tensor codes (same numel;
// int8, int16 or int32, see packed_storage_bits), rounding like quantize
// but in float64, so the bounds are the format's exact ones. With exact, it
// rounds half to even and saturates (params.rounding and overflow are ignored),
// and counts the elements that this changes.
using PackCpu = PackCounts(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, uint64_t seed,
                           uint64_t offset, bool exact);

// out = codes * 2^-frac_bits (both contiguous, same numel; out floating point),
// computed exactly in float64 and rounded once to out's dtype. Returns the
// number of codes outside FxP(total_bits, .)'s range (converted all the same).
using UnpackCpu = int64_t(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits);

// The Philox words of blocks first_block .. first_block + nblocks - 1, in
// element order (for tests: every build must give the same words).
using PhiloxFillCpu = void(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks, uint32_t* out);

extern CpuKernelTable quantize_cpu_kernel;
extern CpuKernelTable pack_cpu_kernel;
extern CpuKernelTable unpack_cpu_kernel;
extern CpuKernelTable philox_fill_cpu_kernel;

// The selected build's kernels (Note [CPU kernel tables]); call them only from
// code compiled once, never from a per-capability source.
inline void quantize_cpu(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params, uint64_t seed,
                         uint64_t offset, const at::Tensor& saturated, const at::Tensor& saturated_count) {
  cpu_kernel<QuantizeCpu>(quantize_cpu_kernel)(x, out, params, seed, offset, saturated, saturated_count);
}
inline PackCounts pack_cpu(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, uint64_t seed,
                           uint64_t offset, bool exact) {
  return cpu_kernel<PackCpu>(pack_cpu_kernel)(x, codes, params, seed, offset, exact);
}
inline int64_t unpack_cpu(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits) {
  return cpu_kernel<UnpackCpu>(unpack_cpu_kernel)(codes, out, total_bits, frac_bits);
}
// The words as the named build ("default", "avx2", "avx512") computes them.
inline void philox_fill_cpu(const std::string& capability, uint64_t seed, uint64_t offset, uint64_t first_block,
                            int64_t nblocks, uint32_t* out) {
  cpu_kernel<PhiloxFillCpu>(philox_fill_cpu_kernel, parse_cpu_capability(capability))(seed, offset, first_block,
                                                                                      nblocks, out);
}

}  // namespace fxp::kernels
