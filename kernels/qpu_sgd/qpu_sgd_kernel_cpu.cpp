// CPU kernel of the fused QPU SGD step; compiled once per CPU capability like
// quantize_kernel_cpu.cpp, each build registering its entry (Note [CPU kernel tables]).
#include <type_traits>

#include "common/cpu_loops.h"
#include "common/fxp_math.h"
#include "common/philox_cpu.h"
#include "qpu_sgd/qpu_sgd_kernel.h"

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

struct Counts {
  int64_t saturated = 0;
  int64_t vanished = 0;
  int64_t nans = 0;  // NaN results that packed storage could not hold
  Counts& operator+=(const Counts& o) {
    saturated += o.saturated, vanished += o.vanished, nans += o.nans;
    return *this;
  }
};

// The element loop on float64 arrays: n <= kSpanElems.
template <Rounding R, MomentumForm Form, bool kMomentum, bool kNesterov>
Counts update_span_f64(double* w, const double* g, double* v, int64_t n, const QpuHyper hyper,
                       const FxpSpec<double> wspec, const FxpSpec<double> vspec,
                       const uint32_t* wbits, const uint32_t* vbits) {
  // hyper and the specs by value: a double store through w could otherwise
  // alias them, which keeps the compiler from holding them in registers.
  int32_t saturated = 0, vanished = 0;
  // w, g, v and the draws never overlap (the op checks w, g and v), and each
  // element reads only its own index before writing it.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t wb = R == Rounding::Stochastic ? wbits[i] : 0u;
    const uint32_t vb = R == Rounding::Stochastic && (kMomentum || Form == MomentumForm::PaperEq6) ? vbits[i] : 0u;
    double vi = 0.0;
    if constexpr (kMomentum) vi = v[i];
    const QpuElementResult r =
        qpu_update_element<R, Form, kMomentum, kNesterov>(w[i], g[i], vi, hyper, wspec, vspec, wb, vb);
    w[i] = to_float_storage<double>(r.param);
    if constexpr (kMomentum) v[i] = to_float_storage<double>(r.momentum);
    saturated += r.saturated;
    vanished += r.vanished;
  }
  return Counts{saturated, vanished, 0};
}

// Storage <-> float64 scratch, one loop per storage type (a run-time type
// inside the loop would stop it vectorizing).
template <typename T>
void widen_typed(const void* base, int64_t start, int64_t n, double inv_scale, double* out) {
  const T* p = static_cast<const T*>(base) + start;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_floating_point_v<T>) {
      out[i] = static_cast<double>(p[i]);
    } else {
      out[i] = static_cast<double>(p[i]) * inv_scale;  // exact
    }
  }
}

void widen(Storage s, const void* base, int64_t start, int64_t n, double inv_scale, double* out) {
  switch (s) {
    case Storage::Float32: return widen_typed<float>(base, start, n, inv_scale, out);
    case Storage::Float64: return widen_typed<double>(base, start, n, inv_scale, out);
    case Storage::Int8: return widen_typed<int8_t>(base, start, n, inv_scale, out);
    case Storage::Int16: return widen_typed<int16_t>(base, start, n, inv_scale, out);
    case Storage::Int32: return widen_typed<int32_t>(base, start, n, inv_scale, out);
  }
}

// Writes n grid values back. Codes: value * 2^F is exact; a NaN keeps the
// old code and is counted (Note [Packed QPU step]).
template <typename T>
int32_t narrow_typed(void* base, int64_t start, int64_t n, double scale, const double* in) {
  T* p = static_cast<T*>(base) + start;
  int32_t nans = 0;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_floating_point_v<T>) {
      p[i] = to_float_storage<T>(in[i]);
    } else {
      const bool nan = in[i] != in[i];
      nans += nan;
      const T code = static_cast<T>(nan ? 0.0 : in[i] * scale);
      p[i] = nan ? p[i] : code;
    }
  }
  return nans;
}

int32_t narrow(Storage s, void* base, int64_t start, int64_t n, double scale, const double* in) {
  switch (s) {
    case Storage::Float32: return narrow_typed<float>(base, start, n, scale, in);
    case Storage::Float64: return narrow_typed<double>(base, start, n, scale, in);
    case Storage::Int8: return narrow_typed<int8_t>(base, start, n, scale, in);
    case Storage::Int16: return narrow_typed<int16_t>(base, start, n, scale, in);
    case Storage::Int32: return narrow_typed<int32_t>(base, start, n, scale, in);
  }
  return 0;
}

struct TensorIo {
  void* w;
  const void* g;
  void* v;
};

// One span: float64 storage is updated where it lies; any other storage goes
// through float64 scratch arrays, so the compute loop sees one element type
// (GCC does not vectorize the mixed loop).
template <Rounding R, MomentumForm Form, bool kMomentum>
Counts update_span(const TensorIo& io, int64_t s, int64_t n, const QpuSgdParams& p, const FxpSpec<double>& wspec,
                   const FxpSpec<double>& vspec, const uint32_t* wbits, const uint32_t* vbits) {
  // A loop per nesterov value: a run-time flag inside the loop stops GCC vectorizing it.
  auto compute = [&](double* w64, const double* g64, double* v64) {
    return p.hyper.nesterov
               ? update_span_f64<R, Form, kMomentum, true>(w64, g64, v64, n, p.hyper, wspec, vspec, wbits, vbits)
               : update_span_f64<R, Form, kMomentum, false>(w64, g64, v64, n, p.hyper, wspec, vspec, wbits, vbits);
  };
  const bool all_f64 = p.param_storage == Storage::Float64 && p.grad_storage == Storage::Float64 &&
                       (!kMomentum || p.momentum_storage == Storage::Float64);
  if (all_f64) {
    return compute(static_cast<double*>(io.w) + s, static_cast<const double*>(io.g) + s,
                   kMomentum ? static_cast<double*>(io.v) + s : nullptr);
  }
  alignas(64) double w64[kSpanElems], g64[kSpanElems], v64[kSpanElems];
  widen(p.param_storage, io.w, s, n, wspec.inv_scale, w64);
  widen(p.grad_storage, io.g, s, n, 1.0, g64);
  if constexpr (kMomentum) widen(p.momentum_storage, io.v, s, n, vspec.inv_scale, v64);
  Counts c = compute(w64, g64, v64);
  c.nans += narrow(p.param_storage, io.w, s, n, wspec.scale, w64);
  if constexpr (kMomentum) c.nans += narrow(p.momentum_storage, io.v, s, n, vspec.scale, v64);
  return c;
}

template <Rounding R, MomentumForm Form, bool kMomentum>
Counts update_tensor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum, int64_t stream,
                     const QpuSgdParams& p) {
  const auto wspec = qpu_storage_spec(p.total_bits, p.frac_bits, p.param_storage);
  const auto vspec = qpu_storage_spec(p.momentum_total_bits, p.momentum_frac_bits, p.momentum_storage);
  const uint64_t woff = qpu_param_offset(p.step, stream), voff = qpu_momentum_offset(p.step, stream);
  const TensorIo io{param.data_ptr(), grad.const_data_ptr(), kMomentum ? momentum->data_ptr() : nullptr};
  return sum_over_spans<Counts>(param.numel(), kSpanElems, [&](int64_t s, int64_t len) {
    alignas(64) uint32_t wbits[kSpanElems], vbits[kSpanElems];
    if constexpr (R == Rounding::Stochastic) {
      philox_chunk(p.seed, woff, static_cast<uint64_t>(s / 4), (len + 3) / 4, wbits);
      if (kMomentum || Form == MomentumForm::PaperEq6) {
        philox_chunk(p.seed, voff, static_cast<uint64_t>(s / 4), (len + 3) / 4, vbits);
      }
    }
    return update_span<R, Form, kMomentum>(io, s, len, p, wspec, vspec, wbits, vbits);
  });
}

template <Rounding R>
Counts update_dispatch(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum,
                       int64_t stream, const QpuSgdParams& p) {
  const bool paper = p.form == MomentumForm::PaperEq6;
  if (momentum != nullptr) {
    return paper ? update_tensor<R, MomentumForm::PaperEq6, true>(param, grad, momentum, stream, p)
                 : update_tensor<R, MomentumForm::Standard, true>(param, grad, momentum, stream, p);
  }
  return paper ? update_tensor<R, MomentumForm::PaperEq6, false>(param, grad, nullptr, stream, p)
               : update_tensor<R, MomentumForm::Standard, false>(param, grad, nullptr, stream, p);
}

void step(at::TensorList params, at::TensorList grads, at::TensorList momentum, c10::ArrayRef<int64_t> streams,
          const QpuSgdParams& p, const at::Tensor& counts, const at::Tensor& nan_count) {
  auto* out = counts.data_ptr<int64_t>();
  int64_t nans = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    if (params[k].numel() == 0) continue;
    const at::Tensor* v = momentum.empty() ? nullptr : &momentum[k];
    const Counts c = p.rounding == Rounding::Stochastic
                         ? update_dispatch<Rounding::Stochastic>(params[k], grads[k], v, streams[k], p)
                         : update_dispatch<Rounding::NearestEven>(params[k], grads[k], v, streams[k], p);
    out[2 * k] += c.saturated;
    out[2 * k + 1] += c.vanished;
    nans += c.nans;
  }
  if (nan_count.defined()) *nan_count.data_ptr<int64_t>() += nans;
}

FXP_REGISTER_CPU_KERNEL(qpu_sgd_cpu_kernel, QpuSgdCpu, step);

}  // namespace
}  // namespace fxp::kernels::FXP_CPU_CAPABILITY

namespace fxp::kernels {
FXP_DEFINE_CPU_KERNEL_TABLE(qpu_sgd_cpu_kernel, "qpu_sgd_step");
}  // namespace fxp::kernels
