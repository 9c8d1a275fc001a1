// CPU kernels of MSQ's RoundClamp. Each parallel task counts into its own
// slots and the slots are summed (integers: the counts do not depend on the
// thread count).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>

#include "round_clamp/round_clamp_kernel.h"

namespace fxp::kernels {
namespace {

constexpr int64_t kGrain = 32768;

template <typename T, typename C>
void round_clamp_range(const T* w, T* quantized, T* lsb, C* codes, int64_t begin, int64_t end,
                       const RoundClampSpec& spec, int64_t* nonzero, int64_t* nan) {
  int64_t nonzero_here = 0, nan_here = 0;
  for (int64_t i = begin; i < end; ++i) {
    const RoundClampElement e = round_clamp_element(static_cast<double>(w[i]), spec);
    nonzero_here += e.lsb != 0;
    nan_here += w[i] != w[i];
    if (quantized) quantized[i] = round_clamp_value(w[i], e, spec);
    if (lsb) lsb[i] = round_clamp_lsb_value(w[i], e, spec);
    if (codes) codes[i] = e.code == e.code ? static_cast<C>(e.code) : C(0);
  }
  *nonzero += nonzero_here;
  *nan += nan_here;
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void round_clamp_cpu(const at::Tensor& w, const RoundClampOutputs& out, const RoundClampSpec& spec) {
  const int64_t n = w.numel();
  std::atomic<int64_t> nonzero{0}, nan{0};
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fxp::round_clamp", [&] {
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    scalar_t* quantized = data_or_null<scalar_t>(out.quantized);
    scalar_t* lsb = data_or_null<scalar_t>(out.lsb);
    const auto run = [&](auto* codes) {
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        int64_t nz = 0, nn = 0;
        round_clamp_range(x, quantized, lsb, codes, begin, end, spec, &nz, &nn);
        nonzero += nz;
        nan += nn;
      });
    };
    if (!out.codes.defined()) {
      run(static_cast<int8_t*>(nullptr));
    } else {
      AT_DISPATCH_INTEGRAL_TYPES(out.codes.scalar_type(), "fxp::round_clamp_codes",
                                 [&] { run(out.codes.data_ptr<scalar_t>()); });
    }
  });
  int64_t* totals = out.totals.data_ptr<int64_t>();
  totals[0] += nonzero.load();
  totals[1] += nan.load();
  if (out.lsb_nonzero.defined()) *out.lsb_nonzero.data_ptr<int64_t>() = totals[0];
  if (out.lsb_l1.defined()) {
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fxp::round_clamp", [&] {
      *out.lsb_l1.data_ptr<scalar_t>() = lsb_l1_from_counts<scalar_t>(totals[0], totals[1], spec);
    });
  }
}

void round_clamp_backward_cpu(const at::Tensor& grad_quantized, const at::Tensor& grad_lsb_l1, const at::Tensor& w,
                              const at::Tensor& grad_w, const RoundClampSpec& spec) {
  const int64_t n = w.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fxp::round_clamp_backward", [&] {
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    const scalar_t* gq = grad_quantized.const_data_ptr<scalar_t>();
    const scalar_t g_l1 = grad_lsb_l1.item<scalar_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        gw[i] = round_clamp_gradient(gq[i], g_l1, round_clamp_element(static_cast<double>(x[i]), spec).lsb);
      }
    });
  });
}

}  // namespace fxp::kernels
