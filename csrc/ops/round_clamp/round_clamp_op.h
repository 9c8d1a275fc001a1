// MSQ's RoundClamp ops (round_clamp, round_clamp_lsb, round_clamp_codes,
// round_clamp_backward), written once over a Backend (launch, backward,
// DeviceGuard, kIsMeta). The kernels are in kernels/round_clamp; Note
// [RoundClamp] gives the arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "round_clamp/round_clamp_kernel.h"

namespace fxp {

namespace round_clamp_detail {

inline RoundClampSpec check_args(const char* op, const at::Tensor& w, double scale, int64_t bits) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op,
              ": w must be float32 or float64, but got ", w.scalar_type());
  TORCH_CHECK(scale > 0 && std::isfinite(scale), op, ": scale must be a positive finite number, but got ", scale);
  TORCH_CHECK(bits >= kRoundClampMinBits && bits <= kRoundClampMaxBits, op, ": bits must be in [",
              kRoundClampMinBits, ", ", kRoundClampMaxBits, "], but got ", bits);
  return make_round_clamp_spec(scale, static_cast<int>(bits));
}

// Codes +-(2^bits - 1) need bits + 1 bits.
inline at::ScalarType codes_dtype(int64_t bits) { return bits <= 7 ? at::kChar : bits <= 15 ? at::kShort : at::kInt; }

}  // namespace round_clamp_detail

template <class Backend>
struct RoundClampOps {
  static at::Tensor totals_like(const at::Tensor& w) { return at::zeros({3}, w.options().dtype(at::kLong)); }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> round_clamp(const at::Tensor& w, double scale, int64_t bits) {
    const RoundClampSpec spec = round_clamp_detail::check_args("fxp::round_clamp", w, scale, bits);
    kernels::RoundClampOutputs out;
    out.quantized = at::empty_like(w, at::MemoryFormat::Contiguous);
    out.lsb_l1 = at::empty({}, w.options());
    out.lsb_nonzero = at::empty({}, w.options().dtype(at::kLong));
    if constexpr (!Backend::kIsMeta) {
      typename Backend::DeviceGuard guard(w.device());
      out.totals = totals_like(w);
      Backend::launch(w.contiguous(), out, spec);
    }
    return {out.quantized, out.lsb_l1, out.lsb_nonzero};
  }

  static at::Tensor lsb(const at::Tensor& w, double scale, int64_t bits) {
    const RoundClampSpec spec = round_clamp_detail::check_args("fxp::round_clamp_lsb", w, scale, bits);
    kernels::RoundClampOutputs out;
    out.lsb = at::empty_like(w, at::MemoryFormat::Contiguous);
    if constexpr (!Backend::kIsMeta) {
      typename Backend::DeviceGuard guard(w.device());
      out.totals = totals_like(w);
      Backend::launch(w.contiguous(), out, spec);
    }
    return out.lsb;
  }

  static at::Tensor codes(const at::Tensor& w, double scale, int64_t bits) {
    constexpr const char* op = "fxp::round_clamp_codes";
    const RoundClampSpec spec = round_clamp_detail::check_args(op, w, scale, bits);
    kernels::RoundClampOutputs out;
    out.codes = at::empty(w.sizes(), w.options().dtype(round_clamp_detail::codes_dtype(bits)));
    if constexpr (!Backend::kIsMeta) {
      typename Backend::DeviceGuard guard(w.device());
      out.totals = totals_like(w);
      Backend::launch(w.contiguous(), out, spec);
      // Codes are for export, not the training step: reading the NaN count back is fine here.
      const int64_t nan = out.totals[1].item<int64_t>();
      TORCH_CHECK(nan == 0, op, ": ", nan, " of the ", w.numel(), " weights are NaN, which has no code");
    }
    return out.codes;
  }

  static at::Tensor backward(const at::Tensor& grad_quantized, const at::Tensor& grad_lsb_l1, const at::Tensor& w,
                             double scale, int64_t bits) {
    constexpr const char* op = "fxp::round_clamp_backward";
    const RoundClampSpec spec = round_clamp_detail::check_args(op, w, scale, bits);
    TORCH_CHECK(grad_quantized.scalar_type() == w.scalar_type() && grad_quantized.sizes() == w.sizes() &&
                    grad_quantized.device() == w.device(),
                op, ": grad_quantized must match w's dtype, shape and device, but got ", grad_quantized.scalar_type(),
                " of shape ", grad_quantized.sizes(), " on ", grad_quantized.device());
    TORCH_CHECK(grad_lsb_l1.scalar_type() == w.scalar_type() && grad_lsb_l1.dim() == 0 &&
                    grad_lsb_l1.device() == w.device(),
                op, ": grad_lsb_l1 must be a 0-dim tensor of w's dtype on its device, but got ",
                grad_lsb_l1.scalar_type(), " of shape ", grad_lsb_l1.sizes(), " on ", grad_lsb_l1.device());
    at::Tensor grad_w = at::empty_like(w, at::MemoryFormat::Contiguous);
    if constexpr (!Backend::kIsMeta) {
      typename Backend::DeviceGuard guard(w.device());
      Backend::backward(grad_quantized.contiguous(), grad_lsb_l1, w.contiguous(), grad_w, spec);
    }
    return grad_w;
  }
};

#define FXP_REGISTER_ROUND_CLAMP_OPS(m, Backend)                                   \
  (m).impl("round_clamp", &::fxp::RoundClampOps<Backend>::round_clamp);           \
  (m).impl("round_clamp_lsb", &::fxp::RoundClampOps<Backend>::lsb);               \
  (m).impl("round_clamp_codes", &::fxp::RoundClampOps<Backend>::codes);           \
  (m).impl("round_clamp_backward", &::fxp::RoundClampOps<Backend>::backward)

}  // namespace fxp
