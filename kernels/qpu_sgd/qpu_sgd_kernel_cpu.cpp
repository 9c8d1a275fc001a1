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

// Element i of a list stored as S, as its value in T.
template <typename T, typename S>
FXP_FORCE_INLINE T load_value(const S* p, int64_t i, T inv_scale) {
  if constexpr (std::is_floating_point_v<S>) {
    return p[i];
  } else {
    return static_cast<T>(p[i]) * inv_scale;  // exact below 2^24 (float) or always (double)
  }
}

// The parameter's code: packed, the code itself; float, split(w 2^F).
// Returned whole, not assigned into a local, so GCC keeps it in registers
// (a partly assigned struct stays in memory and stops the loop vectorizing).
template <typename I, typename T, typename S>
FXP_FORCE_INLINE ExactSplit<T, I> param_code(const S* p, int64_t i, T value, const QpuConstants<T>& c) {
  if constexpr (std::is_floating_point_v<S>) {
    return split_exact<I>(value * c.scale, c.param_limit);
  } else {
    return ExactSplit<T, I>{static_cast<I>(p[i]), T(0)};
  }
}

// Writes a result code as S: a NaN result as the quiet NaN (float storage)
// or, as a code cannot hold it, the old code (packed; Note [Packed QPU
// step]). The caller counts the NaNs.
template <typename T, typename S, typename I>
FXP_FORCE_INLINE void store_code(S* p, int64_t i, I code, I old_code, bool nan, T inv_scale) {
  if constexpr (std::is_floating_point_v<S>) {
    p[i] = nan ? quiet_nan<S>() : code_to_float<S>(code) * inv_scale;
  } else if constexpr (std::is_floating_point_v<I>) {
    // A float code is NaN exactly when its result is (split_exact), and is
    // never converted then. A select on the code itself vectorizes in every
    // form; one on the flag does not (paper_eq6), and a bit mask over a
    // reload costs more instructions.
    p[i] = static_cast<S>(static_cast<int32_t>(code == code ? code : old_code));
  } else {
    // An int64 code (0 for a NaN result): a bit mask, which GCC vectorizes.
    const int32_t keep = -static_cast<int32_t>(nan);
    p[i] = static_cast<S>((static_cast<int32_t>(p[i]) & keep) | (static_cast<int32_t>(code) & ~keep));
  }
}

// AdaPT's prologue for one tensor (Note [AdaPT's fused QPU step]): its
// accumulator and the divisor of its layer.
template <typename T>
struct SpanPrologue {
  T* accumulated;
  double divisor;
  T l1;
};

// The element loop, one pass: load, update, store. W and V are the parameter
// and momentum storage (T itself, or integer codes), I the code type (Note
// [QPU code arithmetic]); n <= kSpanElems. kPrologue: AdaPT's gradient work
// first (float storage only).
template <typename T, typename I, typename W, typename V, Rounding R, MomentumForm Form, bool kMomentum,
          bool kNesterov, bool kPrologue = false>
Counts update_span(W* w, const T* g, V* v, int64_t n, const QpuConstants<T> c, const uint32_t* wbits,
                   const uint32_t* vbits, const SpanPrologue<T> pro = {}) {
  // c by value: a store through w could otherwise alias it, which keeps the
  // compiler from holding it in registers.
  constexpr bool kFloatParam = std::is_floating_point_v<W>;
  constexpr bool kMomentumDraws = kMomentum || Form == MomentumForm::PaperEq6;
  int32_t saturated = 0, vanished = 0, nans = 0;
  // w, g, v, the accumulator and the draws never overlap (the op checks all
  // but the draws, its own), and each element reads only its own index before writing it.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t wb = R == Rounding::Stochastic ? wbits[i] : 0u;
    const uint32_t vb = R == Rounding::Stochastic && kMomentumDraws ? vbits[i] : 0u;
    const T wi = load_value<T>(w, i, c.inv_scale);
    const ExactSplit<T, I> w_code = param_code<I>(w, i, wi, c);
    const T vi = kMomentum ? load_value<T>(v, i, c.momentum_inv_scale) : T(0);
    const I v_code = kMomentum && !std::is_floating_point_v<V> ? static_cast<I>(v[i]) : I(0);
    T gi = g[i];
    if constexpr (kPrologue) {
      gi = normalized_gradient(gradient_with_l1(gi, wi, pro.l1), pro.divisor);
      pro.accumulated[i] += gi;
    }
    const QpuElementResult<I> r =
        qpu_update_element<R, Form, kMomentum, kNesterov, kFloatParam>(wi, w_code, gi, vi, c, wb, vb);
    store_code<T>(w, i, r.param, w_code.whole, r.param_nan, c.inv_scale);
    if constexpr (kMomentum) store_code<T>(v, i, r.momentum, v_code, r.momentum_nan, c.momentum_inv_scale);
    if constexpr (!kFloatParam) nans += r.param_nan;
    if constexpr (kMomentum && !std::is_floating_point_v<V>) nans += r.momentum_nan;
    saturated += r.saturated;
    vanished += r.vanished;
  }
  return Counts{saturated, vanished, nans};
}

// Tensor k's prologue: its accumulator (null without a prologue) and its layer's divisor.
struct TensorPrologue {
  const at::Tensor* accumulated = nullptr;
  double divisor = 1;
  double l1 = 0;
};

template <typename T, typename I, typename W, typename V, Rounding R, MomentumForm Form, bool kMomentum>
Counts update_tensor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum, int64_t stream,
                     const QpuSgdParams& p, const TensorPrologue& pro) {
  const QpuConstants<T> c = qpu_constants<T>(p);
  const uint64_t woff = qpu_param_offset(p.step, stream), voff = qpu_momentum_offset(p.step, stream);
  W* w = static_cast<W*>(param.data_ptr());
  const T* g = static_cast<const T*>(grad.const_data_ptr());
  V* v = kMomentum ? static_cast<V*>(momentum->data_ptr()) : nullptr;
  // A loop per nesterov value: a select on a run-time flag stops GCC vectorizing it.
  constexpr bool kMayNesterov = kMomentum && Form == MomentumForm::Standard;
  const bool nesterov = kMayNesterov && p.hyper.nesterov;
  constexpr bool kStochastic = R == Rounding::Stochastic;
  // Deterministic rounding needs no draws, so a span is a whole chunk.
  return sum_over_spans<Counts>(param.numel(), kStochastic ? kSpanElems : kChunkElems, [&](int64_t s, int64_t len) {
    alignas(64) uint32_t wbits[kSpanElems], vbits[kSpanElems];
    if constexpr (kStochastic) {
      philox_chunk(p.seed, woff, static_cast<uint64_t>(s / 4), (len + 3) / 4, wbits);
      if (kMomentum || Form == MomentumForm::PaperEq6) {
        philox_chunk(p.seed, voff, static_cast<uint64_t>(s / 4), (len + 3) / 4, vbits);
      }
    }
    V* vs = kMomentum ? v + s : nullptr;
    // The prologue's loops exist for float storage alone, the only storage it takes.
    if constexpr (std::is_floating_point_v<W> && std::is_floating_point_v<V>) {
      if (pro.accumulated != nullptr) {
        const SpanPrologue<T> sp{static_cast<T*>(pro.accumulated->data_ptr()) + s, pro.divisor,
                                 static_cast<T>(pro.l1)};
        return nesterov ? update_span<T, I, W, V, R, Form, kMomentum, kMayNesterov, true>(w + s, g + s, vs, len, c,
                                                                                          wbits, vbits, sp)
                        : update_span<T, I, W, V, R, Form, kMomentum, false, true>(w + s, g + s, vs, len, c, wbits,
                                                                                   vbits, sp);
      }
    }
    return nesterov ? update_span<T, I, W, V, R, Form, kMomentum, kMayNesterov>(w + s, g + s, vs, len, c, wbits, vbits)
                    : update_span<T, I, W, V, R, Form, kMomentum, false>(w + s, g + s, vs, len, c, wbits, vbits);
  });
}

// Calls fn(S{}) with S the C++ type of storage s in compute type T.
template <typename T, typename Fn>
Counts with_storage(Storage s, const Fn& fn) {
  switch (s) {
    case Storage::Int8: return fn(int8_t{});
    case Storage::Int16: return fn(int16_t{});
    case Storage::Int32: return fn(int32_t{});
    default: return fn(T{});  // float storage: the grads' dtype (the op checks it)
  }
}

template <typename T, typename I, Rounding R>
Counts update_dispatch(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum, int64_t stream,
                       const QpuSgdParams& p, const TensorPrologue& pro) {
  const bool paper = p.form == MomentumForm::PaperEq6;
  return with_storage<T>(p.param_storage, [&](auto w_type) {
    using W = decltype(w_type);
    if (momentum == nullptr) {
      return paper ? update_tensor<T, I, W, T, R, MomentumForm::PaperEq6, false>(param, grad, nullptr, stream, p, pro)
                   : update_tensor<T, I, W, T, R, MomentumForm::Standard, false>(param, grad, nullptr, stream, p, pro);
    }
    return with_storage<T>(p.momentum_storage, [&](auto v_type) {
      using V = decltype(v_type);
      return paper ? update_tensor<T, I, W, V, R, MomentumForm::PaperEq6, true>(param, grad, momentum, stream, p, pro)
                   : update_tensor<T, I, W, V, R, MomentumForm::Standard, true>(param, grad, momentum, stream, p, pro);
    });
  });
}

template <typename T, typename I>
Counts update_rounding(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum, int64_t stream,
                       const QpuSgdParams& p, const TensorPrologue& pro) {
  return p.rounding == Rounding::Stochastic
             ? update_dispatch<T, I, Rounding::Stochastic>(param, grad, momentum, stream, p, pro)
             : update_dispatch<T, I, Rounding::NearestEven>(param, grad, momentum, stream, p, pro);
}

// Note [QPU code arithmetic]: float64 compute takes float64 codes; float32
// compute float32 codes where both formats allow, else int64.
Counts update_one(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* momentum, int64_t stream,
                  const QpuSgdParams& p, const TensorPrologue& pro) {
  if (p.grad_storage == Storage::Float64) return update_rounding<double, double>(param, grad, momentum, stream, p, pro);
  return qpu_float_codes(p) ? update_rounding<float, float>(param, grad, momentum, stream, p, pro)
                            : update_rounding<float, int64_t>(param, grad, momentum, stream, p, pro);
}

void step(at::TensorList params, at::TensorList grads, at::TensorList momentum, c10::ArrayRef<int64_t> streams,
          const QpuSgdParams& p, const at::Tensor& counts, const at::Tensor& nan_count,
          const GradientPrologue& prologue) {
  auto* out = counts.data_ptr<int64_t>();
  int64_t nans = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    if (params[k].numel() == 0) continue;
    const at::Tensor* v = momentum.empty() ? nullptr : &momentum[k];
    TensorPrologue pro;
    if (prologue.active()) {
      pro = TensorPrologue{&prologue.accumulated[k], norm_divisor(prologue.norms[prologue.layers[k]]), prologue.l1};
    }
    const Counts c = update_one(params[k], grads[k], v, streams[k], p, pro);
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
