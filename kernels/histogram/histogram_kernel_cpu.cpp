// CPU kernel of the fixed-point histogram: the input is split into one slice
// per thread, each slice counts into its own histogram, and the slices' counts
// are summed (integers: the result does not depend on the thread count).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "histogram/histogram_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int64_t kBlock = 256;  // bins computed in a branch-light loop, then counted

template <typename scalar_t>
void count_slice(const scalar_t* x, int64_t n, const HistogramSpec& spec, int64_t* counts) {
  int64_t bins[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    for (int64_t i = 0; i < m; ++i) {
      bins[i] = histogram_bin(static_cast<double>(static_cast<at::opmath_type<scalar_t>>(x[start + i])), spec);
    }
    for (int64_t i = 0; i < m; ++i) {
      if (bins[i] >= 0) ++counts[bins[i]];
    }
  }
}

}  // namespace

void format_histogram_cpu(const at::Tensor& x, const HistogramSpec& spec, const at::Tensor& counts) {
  const int64_t n = x.numel();
  if (n == 0) return;
  constexpr int64_t kMinSlice = 32768;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinSlice));
  std::vector<std::vector<int64_t>> partial(static_cast<size_t>(slices), std::vector<int64_t>(spec.bins, 0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp::format_histogram", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t first = n * s / slices, last = n * (s + 1) / slices;
        count_slice(data + first, last - first, spec, partial[static_cast<size_t>(s)].data());
      }
    });
  });
  int64_t* out = counts.data_ptr<int64_t>();
  for (const auto& p : partial) {
    for (int64_t b = 0; b < spec.bins; ++b) out[b] += p[static_cast<size_t>(b)];
  }
}

}  // namespace fxp::kernels
