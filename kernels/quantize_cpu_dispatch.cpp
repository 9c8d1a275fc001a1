// Picks the quantize_cpu.cpp build for the running CPU.
#include <c10/util/Exception.h>

#include "quantize.h"

namespace fxp::kernels {

#define FXP_DECLARE_CPU_IMPL(capability)                                                      \
  namespace capability {                                                                       \
  int64_t quantize_cpu_impl(const at::Tensor& x, const at::Tensor& out,                        \
                            const QuantizeParams& params, uint64_t seed, uint64_t offset,     \
                            bool* saturated);                                                  \
  }
FXP_DECLARE_CPU_IMPL(default_)
#if defined(FXP_HAVE_AVX2)
FXP_DECLARE_CPU_IMPL(avx2)
#endif
#undef FXP_DECLARE_CPU_IMPL

namespace {
using QuantizeImpl = int64_t (*)(const at::Tensor&, const at::Tensor&, const QuantizeParams&,
                                 uint64_t, uint64_t, bool*);

QuantizeImpl select_cpu_impl() {
#if defined(FXP_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2")) return &avx2::quantize_cpu_impl;
#endif
  return &default_::quantize_cpu_impl;
}
}  // namespace

void quantize_cpu(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                  uint64_t seed, uint64_t offset, const at::Tensor& saturated,
                  const at::Tensor& saturated_count) {
  static const QuantizeImpl impl = select_cpu_impl();
  bool* saturated_ptr = saturated.defined() ? saturated.data_ptr<bool>() : nullptr;
  const int64_t count = x.numel() == 0 ? 0 : impl(x, out, params, seed, offset, saturated_ptr);
  if (saturated_count.defined()) *saturated_count.data_ptr<int64_t>() += count;
}

}  // namespace fxp::kernels
