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
                            const QuantizeParams& params, const CpuQuantizeRequest& request); \
  void philox_fill(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,      \
                   uint32_t* out);                                                             \
  }
FXP_DECLARE_CPU_IMPL(default_)
#if defined(FXP_HAVE_X86_CAPABILITIES)
FXP_DECLARE_CPU_IMPL(avx2)
FXP_DECLARE_CPU_IMPL(avx512)
#endif
#undef FXP_DECLARE_CPU_IMPL

namespace {
using QuantizeImpl = int64_t (*)(const at::Tensor&, const at::Tensor&, const QuantizeParams&,
                                 const CpuQuantizeRequest&);

bool has_avx2() {
#if defined(FXP_HAVE_X86_CAPABILITIES)
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(FXP_HAVE_X86_CAPABILITIES)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

void check_capability(const std::string& name) {
  TORCH_CHECK(name == "default" || name == "avx2" || name == "avx512",
              "FXP_CPU_CAPABILITY must be default, avx2 or avx512, not '", name, "'");
  TORCH_CHECK(cpu_capability_available(name), "CPU capability ", name,
              " is not available (not built here, or this CPU lacks it)");
}

QuantizeImpl select_cpu_impl() {
  const char* env = std::getenv("FXP_CPU_CAPABILITY");
  std::string name = env != nullptr ? env : "";
  if (name.empty()) name = has_avx512() ? "avx512" : has_avx2() ? "avx2" : "default";
  check_capability(name);
#if defined(FXP_HAVE_X86_CAPABILITIES)
  if (name == "avx512") return &avx512::quantize_cpu_impl;
  if (name == "avx2") return &avx2::quantize_cpu_impl;
#endif
  return &default_::quantize_cpu_impl;
}
}  // namespace

void quantize_cpu(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                  uint64_t seed, uint64_t offset, const at::Tensor& saturated,
                  const at::Tensor& saturated_count) {
  static const QuantizeImpl impl = select_cpu_impl();
  const CpuQuantizeRequest request{seed, offset,
                                   saturated.defined() ? saturated.data_ptr<bool>() : nullptr,
                                   saturated_count.defined()};
  const int64_t count = x.numel() == 0 ? 0 : impl(x, out, params, request);
  if (saturated_count.defined()) *saturated_count.data_ptr<int64_t>() += count;
}

bool cpu_capability_available(const std::string& capability) {
  if (capability == "default") return true;
  if (capability == "avx2") return has_avx2();
  if (capability == "avx512") return has_avx512();
  return false;
}

void philox_fill_cpu(const std::string& capability, uint64_t seed, uint64_t offset,
                     uint64_t first_block, int64_t nblocks, uint32_t* out) {
  check_capability(capability);
#if defined(FXP_HAVE_X86_CAPABILITIES)
  if (capability == "avx512") return avx512::philox_fill(seed, offset, first_block, nblocks, out);
  if (capability == "avx2") return avx2::philox_fill(seed, offset, first_block, nblocks, out);
#endif
  default_::philox_fill(seed, offset, first_block, nblocks, out);
}

}  // namespace fxp::kernels
