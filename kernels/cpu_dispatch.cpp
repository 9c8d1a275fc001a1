// Picks, once per process, the CPU build of the kernels (quantize_cpu.cpp,
// qpu_sgd_cpu.cpp) for the running CPU, or the one named by the environment
// variable FXP_CPU_CAPABILITY (default, avx2, avx512), which lets the tests
// run every build on one machine.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "qpu_sgd.h"
#include "quantize.h"

namespace fxp::kernels {

#define FXP_DECLARE_CPU_KERNELS(capability)                                                      \
  namespace capability {                                                                          \
  int64_t quantize_cpu_impl(const at::Tensor& x, const at::Tensor& out,                           \
                            const QuantizeParams& params, const CpuQuantizeRequest& request);     \
  int64_t qpu_sgd_cpu_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum,  \
                           c10::ArrayRef<int64_t> streams, const QpuSgdParams& p,                 \
                           const at::Tensor& counts);                                             \
  void philox_fill(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t nblocks,         \
                   uint32_t* out);                                                                \
  PackCounts pack_cpu_impl(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, \
                           uint64_t seed, uint64_t offset, bool exact);                            \
  int64_t unpack_cpu_impl(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits); \
  }
FXP_DECLARE_CPU_KERNELS(default_)
#if defined(FXP_HAVE_X86_CAPABILITIES)
FXP_DECLARE_CPU_KERNELS(avx2)
FXP_DECLARE_CPU_KERNELS(avx512)
#endif
#undef FXP_DECLARE_CPU_KERNELS

namespace {

enum class Capability { Default, Avx2, Avx512 };

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

Capability parse_capability(const std::string& name) {
  TORCH_CHECK(name == "default" || name == "avx2" || name == "avx512",
              "FXP_CPU_CAPABILITY must be default, avx2 or avx512, not '", name, "'");
  TORCH_CHECK(cpu_capability_available(name), "CPU capability ", name,
              " is not available (not built here, or this CPU lacks it)");
  return name == "avx512" ? Capability::Avx512 : name == "avx2" ? Capability::Avx2 : Capability::Default;
}

Capability selected_capability() {
  static const Capability selected = [] {
    const char* env = std::getenv("FXP_CPU_CAPABILITY");
    std::string name = env != nullptr ? env : "";
    if (name.empty()) name = has_avx512() ? "avx512" : has_avx2() ? "avx2" : "default";
    return parse_capability(name);
  }();
  return selected;
}

}  // namespace

// Calls capability::fn(args...) for the selected (or given) build.
#if defined(FXP_HAVE_X86_CAPABILITIES)
#define FXP_CPU_DISPATCH(cap, fn, ...)                                   \
  switch (cap) {                                                         \
    case Capability::Avx512: return avx512::fn(__VA_ARGS__);             \
    case Capability::Avx2: return avx2::fn(__VA_ARGS__);                 \
    case Capability::Default: break;                                     \
  }                                                                      \
  return default_::fn(__VA_ARGS__)
#else
#define FXP_CPU_DISPATCH(cap, fn, ...) return default_::fn(__VA_ARGS__)
#endif

bool cpu_capability_available(const std::string& capability) {
  if (capability == "default") return true;
  if (capability == "avx2") return has_avx2();
  if (capability == "avx512") return has_avx512();
  return false;
}

void quantize_cpu(const at::Tensor& x, const at::Tensor& out, const QuantizeParams& params,
                  uint64_t seed, uint64_t offset, const at::Tensor& saturated,
                  const at::Tensor& saturated_count) {
  const CpuQuantizeRequest request{seed, offset,
                                   saturated.defined() ? saturated.data_ptr<bool>() : nullptr,
                                   saturated_count.defined()};
  if (x.numel() == 0) return;
  const int64_t count = [&]() -> int64_t {
    FXP_CPU_DISPATCH(selected_capability(), quantize_cpu_impl, x, out, params, request);
  }();
  if (saturated_count.defined()) *saturated_count.data_ptr<int64_t>() += count;
}

PackCounts pack_cpu(const at::Tensor& x, const at::Tensor& codes, const QuantizeParams& params, uint64_t seed,
                    uint64_t offset, bool exact) {
  if (x.numel() == 0) return {};
  FXP_CPU_DISPATCH(selected_capability(), pack_cpu_impl, x, codes, params, seed, offset, exact);
}

int64_t unpack_cpu(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits) {
  if (codes.numel() == 0) return 0;
  FXP_CPU_DISPATCH(selected_capability(), unpack_cpu_impl, codes, out, total_bits, frac_bits);
}

void qpu_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                 c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                 const at::Tensor& nan_count) {
  const int64_t nans = [&]() -> int64_t {
    FXP_CPU_DISPATCH(selected_capability(), qpu_sgd_cpu_impl, params, grads, momentum, streams, p, counts);
  }();
  if (nan_count.defined()) *nan_count.data_ptr<int64_t>() += nans;
}

void philox_fill_cpu(const std::string& capability, uint64_t seed, uint64_t offset,
                     uint64_t first_block, int64_t nblocks, uint32_t* out) {
  FXP_CPU_DISPATCH(parse_capability(capability), philox_fill, seed, offset, first_block, nblocks, out);
}

#undef FXP_CPU_DISPATCH

}  // namespace fxp::kernels
