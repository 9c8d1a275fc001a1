// fxp::format_histogram, written once over a Backend (launch, DeviceGuard,
// kIsMeta), like pool_op.h. The kernels are in kernels/histogram.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "histogram/histogram_kernel.h"

namespace fxp {

template <class Backend>
struct HistogramOps {
  static at::Tensor format_histogram(const at::Tensor& x, int64_t bins, double min, double max,
                                     at::OptionalIntArrayRef format) {
    constexpr const char* op = "fxp::format_histogram";
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, but got ", x.scalar_type());
    TORCH_CHECK(bins >= 1 && bins <= (int64_t{1} << 24), op, ": bins must be in [1, 2^24], but got ", bins);
    TORCH_CHECK(std::isfinite(min) && std::isfinite(max) && min < max, op,
                ": the range must be finite with min < max, but got [", min, ", ", max, "]");
    // The bin arithmetic (v - min) * bins must stay finite (Note [Fused quantize and histogram]).
    TORCH_CHECK(std::isfinite((max - min) * static_cast<double>(bins)), op, ": the range [", min, ", ", max,
                "] times ", bins, " bins overflows float64");
    int total_bits = 0, frac_bits = -1;
    if (format.has_value()) {
      TORCH_CHECK(format->size() == 2, op, ": format must be [total_bits, frac_bits], but got ", *format);
      const int64_t b = (*format)[0], f = (*format)[1];
      TORCH_CHECK(f >= 0 && f <= 62, op, ": frac_bits must be in [0, 62], but got ", f);
      TORCH_CHECK(b == 0 || (b >= 2 && b <= 32 && f < b), op, ": FxP(", b, ", ", f,
                  ") is not a format (total_bits 0 for no saturation, or 2 <= total_bits <= 32 with frac_bits < "
                  "total_bits)");
      total_bits = static_cast<int>(b);
      frac_bits = static_cast<int>(f);
    }
    typename Backend::DeviceGuard guard(x.device());
    at::Tensor counts = at::zeros({bins}, x.options().dtype(at::kLong));
    if constexpr (!Backend::kIsMeta) {
      Backend::launch(x.contiguous(), kernels::make_histogram_spec(bins, min, max, total_bits, frac_bits), counts);
    }
    return counts;
  }
};

#define FXP_REGISTER_HISTOGRAM_OPS(m, Backend) \
  (m).impl("format_histogram", &::fxp::HistogramOps<Backend>::format_histogram)

}  // namespace fxp
