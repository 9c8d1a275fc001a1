// Picks the quantize_cpu.cpp build for the running CPU, or the one named by
// the environment variable FXP_CPU_CAPABILITY (default, avx2, avx512), which
// lets the tests run every build on one machine.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "quantize.h"

namespace fxp::kernels {

#define FXP_DECLARE_CPU_IMPL(capability)                                                  \
  namespace capability {                                                                   \
  int64_t quantize_cpu_impl(const at::Tensor& x, const at::Tensor& out,                    \
                            const QuantizeParams& params, uint64_t seed, uint64_t offset, \
                            bool* saturated);                                              \
  }
FXP_DECLARE_CPU_IMPL(default_)
#if defined(FXP_HAVE_X86_CAPABILITIES)
FXP_DECLARE_CPU_IMPL(avx2)
FXP_DECLARE_CPU_IMPL(avx512)
#endif
#undef FXP_DECLARE_CPU_IMPL

namespace {
using QuantizeImpl = int64_t (*)(const at::Tensor&, const at::Tensor&, const QuantizeParams&,
                                 uint64_t, uint64_t, bool*);

QuantizeImpl select_cpu_impl() {
  const char* env = std::getenv("FXP_CPU_CAPABILITY");
  const std::string wanted = env != nullptr ? env : "";
  if (wanted == "default") return &default_::quantize_cpu_impl;
#if defined(FXP_HAVE_X86_CAPABILITIES)
  const bool has_avx2 = __builtin_cpu_supports("avx2");
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (wanted == "avx2" || wanted == "avx512") {
    TORCH_CHECK(wanted == "avx2" ? has_avx2 : has_avx512, "FXP_CPU_CAPABILITY=", wanted,
                " but this CPU does not support it");
    return wanted == "avx2" ? &avx2::quantize_cpu_impl : &avx512::quantize_cpu_impl;
  }
  TORCH_CHECK(wanted.empty(), "FXP_CPU_CAPABILITY must be default, avx2 or avx512, not '", wanted, "'");
  if (has_avx512) return &avx512::quantize_cpu_impl;
  if (has_avx2) return &avx2::quantize_cpu_impl;
#else
  TORCH_CHECK(wanted.empty(), "FXP_CPU_CAPABILITY='", wanted, "' but only the default build exists here");
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
