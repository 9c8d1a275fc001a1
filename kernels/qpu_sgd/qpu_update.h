// The quantized parameter update (QPU) of one element, and how the step's
// tensors store their values: shared by the CPU and CUDA kernels of the fused
// QPU step. See docs/design.md, "Methods".
#pragma once

#include <cstdint>

#include "common/fxp_math.h"

namespace fxp {

// How a tensor of the QPU step stores its values: floating point, or packed codes.
enum class Storage : int8_t { Float32, Float64, Int8, Int16, Int32 };

// ---------------------------------------------------------------------------
// Quantized parameter update (QPU), one element. See docs/design.md, "Methods".
// ---------------------------------------------------------------------------
enum class MomentumForm : int8_t { Standard, PaperEq6 };

struct QpuHyper {
  double lr;
  double momentum;      // mu; 0 means no momentum buffer
  double weight_decay;  // lambda (L2: g + lambda * w)
  bool nesterov;  // kernels pass it as the template argument kNesterov
};

struct QpuElementResult {
  double param;     // new parameter, on the parameter grid
  double momentum;  // new momentum buffer value, on the momentum grid (if any)
  bool saturated;   // the parameter's rounded code was clamped
  bool vanished;    // a nonzero update left the parameter unchanged
};

inline namespace FXP_ISA {

FXP_HOST_DEVICE bool is_packed(Storage s) { return s != Storage::Float32 && s != Storage::Float64; }

// Element i of a tensor with storage s, as a float64 value (codes times inv_scale: exact).
FXP_HOST_DEVICE double load_value(const void* p, Storage s, int64_t i, double inv_scale) {
  switch (s) {
    case Storage::Float32: return static_cast<const float*>(p)[i];
    case Storage::Float64: return static_cast<const double*>(p)[i];
    case Storage::Int8: return static_cast<const int8_t*>(p)[i] * inv_scale;
    case Storage::Int16: return static_cast<const int16_t*>(p)[i] * inv_scale;
    case Storage::Int32: return static_cast<const int32_t*>(p)[i] * inv_scale;
  }
  return 0.0;
}

// Stores v, a value on the grid whose code fits the storage (or, for float
// storage, NaN), as element i.
FXP_HOST_DEVICE void store_value(void* p, Storage s, int64_t i, double v, double scale) {
  switch (s) {
    case Storage::Float32: static_cast<float*>(p)[i] = to_float_storage<float>(v); return;
    case Storage::Float64: static_cast<double*>(p)[i] = to_float_storage<double>(v); return;
    case Storage::Int8: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v * scale); return;
    case Storage::Int16: static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v * scale); return;
    case Storage::Int32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v * scale); return;
  }
}


// Note [QPU update in float64]
// The update is computed in float64 and rounded once: standard form
//   v = mu v + (g + lambda w);  d = nesterov ? (g + lambda w) + mu v : v
//   w' = Q_r(w - lr d);  v is stored as Q_r(v) in the momentum format,
// and paper_eq6 form
//   delta = Q_r((mu delta + g + lambda w) lr) in the momentum format;  w' = Q_r(w - delta).
// Rounding fl32(w - lr d) instead would drop the low bits of a small update
// before stochastic rounding sees them, biasing it. Every operation is a
// separate IEEE double operation (no contraction), so CPU and CUDA agree.
template <Rounding R, MomentumForm Form, bool kHasMomentum, bool kNesterov>
FXP_HOST_DEVICE QpuElementResult qpu_update_element(double w, double g, double v,
                                                    const QpuHyper& h,
                                                    const FxpSpec<double>& param_spec,
                                                    const FxpSpec<double>& momentum_spec,
                                                    uint32_t param_bits, uint32_t momentum_bits) {
  QpuElementResult r;
  const double grad = g + h.weight_decay * w;
  bool unused;
  double step;  // what is subtracted from w before rounding
  if constexpr (Form == MomentumForm::PaperEq6) {
    const double delta = kHasMomentum ? (h.momentum * v + grad) * h.lr : grad * h.lr;
    step = quantize_value<R, Overflow::Saturate>(delta, momentum_spec, momentum_bits, &unused);
    r.momentum = step;
    r.param = quantize_value<R, Overflow::Saturate>(w - step, param_spec, param_bits, &r.saturated);
    r.vanished = delta != 0.0 && r.param == w;
  } else {
    double d = grad;
    r.momentum = 0.0;
    if constexpr (kHasMomentum) {
      const double v_new = h.momentum * v + grad;
      d = kNesterov ? grad + h.momentum * v_new : v_new;
      r.momentum = quantize_value<R, Overflow::Saturate>(v_new, momentum_spec, momentum_bits, &unused);
    }
    step = h.lr * d;
    r.param = quantize_value<R, Overflow::Saturate>(w - step, param_spec, param_bits, &r.saturated);
    r.vanished = step != 0.0 && r.param == w;
  }
  return r;
}

}  // namespace FXP_ISA
}  // namespace fxp
