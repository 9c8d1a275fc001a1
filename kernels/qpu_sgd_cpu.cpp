// CPU kernel of the fused QPU SGD step; compiled once per CPU capability like
// quantize_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "fxp_math.h"
#include "philox_cpu.h"
#include "qpu_sgd.h"

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

constexpr int64_t kChunkElems = 2048;
constexpr int64_t kSpanElems = 256;  // Note [Interleaving Philox with the element loop]

struct Counts {
  int64_t saturated = 0;
  int64_t vanished = 0;
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
    w[i] = r.param;
    if constexpr (kMomentum) v[i] = r.momentum;
    saturated += r.saturated;
    vanished += r.vanished;
  }
  return Counts{saturated, vanished};
}

// float32 storage: widen the span to float64 scratch arrays first, so the
// compute loop sees one element type (GCC does not vectorize the mixed loop).
template <typename scalar_t, Rounding R, MomentumForm Form, bool kMomentum>
Counts update_span(scalar_t* w, const scalar_t* g, scalar_t* v, int64_t n, const QpuHyper& hyper,
                   const FxpSpec<double>& wspec, const FxpSpec<double>& vspec,
                   const uint32_t* wbits, const uint32_t* vbits) {
  // A loop per nesterov value: a run-time flag inside the loop stops GCC vectorizing it.
  auto compute = [&](double* w64, const double* g64, double* v64) {
    return hyper.nesterov
               ? update_span_f64<R, Form, kMomentum, true>(w64, g64, v64, n, hyper, wspec, vspec, wbits, vbits)
               : update_span_f64<R, Form, kMomentum, false>(w64, g64, v64, n, hyper, wspec, vspec, wbits, vbits);
  };
  if constexpr (std::is_same_v<scalar_t, double>) {
    return compute(w, g, v);
  } else {
    alignas(64) double w64[kSpanElems], g64[kSpanElems], v64[kSpanElems];
    for (int64_t i = 0; i < n; ++i) {
      w64[i] = w[i];
      g64[i] = g[i];
      if constexpr (kMomentum) v64[i] = v[i];
    }
    const Counts c = compute(w64, g64, v64);
    for (int64_t i = 0; i < n; ++i) {
      w[i] = static_cast<scalar_t>(w64[i]);
      if constexpr (kMomentum) v[i] = static_cast<scalar_t>(v64[i]);
    }
    return c;
  }
}

template <typename scalar_t, Rounding R, MomentumForm Form, bool kMomentum>
Counts update_tensor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum,
                     int64_t index, const QpuSgdParams& p) {
  constexpr bool kFloat32 = std::is_same_v<scalar_t, float>;
  const auto wspec = qpu_storage_spec(p.total_bits, p.frac_bits, kFloat32);
  const auto vspec = qpu_storage_spec(p.momentum_total_bits, p.momentum_frac_bits, kFloat32);
  const uint64_t woff = qpu_param_offset(p.step, index), voff = qpu_momentum_offset(p.step, index);
  scalar_t* w = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* v = kMomentum ? momentum->data_ptr<scalar_t>() : nullptr;
  const int64_t n = param.numel();
  std::atomic<int64_t> saturated{0}, vanished{0};
  at::parallel_for(0, (n + kChunkElems - 1) / kChunkElems, 16, [&](int64_t cb, int64_t ce) {
    alignas(64) uint32_t wbits[kSpanElems], vbits[kSpanElems];
    Counts local;
    for (int64_t s = cb * kChunkElems, end = std::min(n, ce * kChunkElems); s < end; s += kSpanElems) {
      const int64_t len = std::min(kSpanElems, end - s);
      if constexpr (R == Rounding::Stochastic) {
        philox_chunk(p.seed, woff, static_cast<uint64_t>(s / 4), (len + 3) / 4, wbits);
        if (kMomentum || Form == MomentumForm::PaperEq6) {
          philox_chunk(p.seed, voff, static_cast<uint64_t>(s / 4), (len + 3) / 4, vbits);
        }
      }
      const Counts c = update_span<scalar_t, R, Form, kMomentum>(
          w + s, g + s, kMomentum ? v + s : nullptr, len, p.hyper, wspec, vspec, wbits, vbits);
      local.saturated += c.saturated;
      local.vanished += c.vanished;
    }
    saturated.fetch_add(local.saturated, std::memory_order_relaxed);
    vanished.fetch_add(local.vanished, std::memory_order_relaxed);
  });
  return Counts{saturated.load(), vanished.load()};
}

template <Rounding R, MomentumForm Form, bool kMomentum>
Counts update_dispatch_dtype(const at::Tensor& param, const at::Tensor& grad,
                             const at::Tensor* momentum, int64_t index, const QpuSgdParams& p) {
  Counts c;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fxp_qpu_sgd_cpu", [&] {
    c = update_tensor<scalar_t, R, Form, kMomentum>(param, grad, momentum, index, p);
  });
  return c;
}

template <Rounding R>
Counts update_dispatch(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum,
                       int64_t index, const QpuSgdParams& p) {
  const bool paper = p.form == MomentumForm::PaperEq6;
  if (momentum != nullptr) {
    return paper ? update_dispatch_dtype<R, MomentumForm::PaperEq6, true>(param, grad, momentum, index, p)
                 : update_dispatch_dtype<R, MomentumForm::Standard, true>(param, grad, momentum, index, p);
  }
  return paper ? update_dispatch_dtype<R, MomentumForm::PaperEq6, false>(param, grad, nullptr, index, p)
               : update_dispatch_dtype<R, MomentumForm::Standard, false>(param, grad, nullptr, index, p);
}

}  // namespace

void qpu_sgd_cpu_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                      const QpuSgdParams& p, const at::Tensor& counts) {
  auto* out = counts.data_ptr<int64_t>();
  for (size_t k = 0; k < params.size(); ++k) {
    if (params[k].numel() == 0) continue;
    const at::Tensor* v = momentum.empty() ? nullptr : &momentum[k];
    const Counts c = p.rounding == Rounding::Stochastic
                         ? update_dispatch<Rounding::Stochastic>(params[k], grads[k], v, k, p)
                         : update_dispatch<Rounding::NearestEven>(params[k], grads[k], v, k, p);
    out[2 * k] += c.saturated;
    out[2 * k + 1] += c.vanished;
  }
}

}  // namespace fxp::kernels::FXP_CPU_CAPABILITY
