// Picks, once per process, the CPU build of the kernels (Note [CPU kernel tables]).
#include "common/cpu_capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace fxp::kernels {
namespace {

constexpr const char* kNames[kCpuCapabilities] = {"default", "avx2", "avx512"};

#if !defined(FXP_CPU_BUILT_MASK)
#define FXP_CPU_BUILT_MASK 1  // default_ alone
#endif

// Whether this library has the capability's build (CMake's FXP_CPU_CAPABILITIES) and the CPU runs it.
bool cpu_has(CpuCapability capability) {
  if (((FXP_CPU_BUILT_MASK >> static_cast<int>(capability)) & 1) == 0) return false;
#if defined(FXP_HAVE_X86_CAPABILITIES)
  switch (capability) {
    case CpuCapability::Default: return true;
    case CpuCapability::Avx2: return __builtin_cpu_supports("avx2");
    case CpuCapability::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return capability == CpuCapability::Default;
#endif
}

}  // namespace

bool cpu_capability_available(const std::string& name) {
  for (int c = 0; c < kCpuCapabilities; ++c) {
    if (name == kNames[c]) return cpu_has(static_cast<CpuCapability>(c));
  }
  return false;
}

CpuCapability parse_cpu_capability(const std::string& name) {
  TORCH_CHECK(name == "default" || name == "avx2" || name == "avx512",
              "FXP_CPU_CAPABILITY must be default, avx2 or avx512, not '", name, "'");
  TORCH_CHECK(cpu_capability_available(name), "CPU capability ", name,
              " is not available (not built here, or this CPU lacks it)");
  return name == "avx512" ? CpuCapability::Avx512 : name == "avx2" ? CpuCapability::Avx2 : CpuCapability::Default;
}

CpuCapability selected_cpu_capability() {
  static const CpuCapability selected = [] {
    const char* env = std::getenv("FXP_CPU_CAPABILITY");
    if (env != nullptr && *env != '\0') return parse_cpu_capability(env);
    return cpu_has(CpuCapability::Avx512) ? CpuCapability::Avx512
           : cpu_has(CpuCapability::Avx2) ? CpuCapability::Avx2
                                           : CpuCapability::Default;
  }();
  return selected;
}

void register_cpu_kernel(CpuKernelTable& table, CpuCapability capability, void* entry) {
  table.entries[static_cast<int>(capability)] = entry;
}

void* cpu_kernel_entry(const CpuKernelTable& table, CpuCapability capability) {
  void* entry = table.entries[static_cast<int>(capability)];
  TORCH_CHECK(entry != nullptr, "fxp: the ", kNames[static_cast<int>(capability)], " CPU build of ", table.name,
              " is missing from this library");
  return entry;
}

}  // namespace fxp::kernels
