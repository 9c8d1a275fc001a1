// The CPU builds of the kernels, and how a call reaches the right one.
//
// Note [CPU kernel tables]
// A family's CPU kernel source is compiled once per capability (baseline
// x86-64, AVX2, AVX-512; see CMakeLists.txt). Each build registers its entry
// points, at load time, into the family's CpuKernelTable (FXP_REGISTER_CPU_KERNEL),
// and callers take the entry of the selected build (cpu_kernel). This shared
// layer knows no op: a new family declares its own tables. (ATen's
// DispatchStub works the same way.) Only code compiled once (baseline flags)
// may call cpu_kernel: see Note [One copy of the math per instruction set].
#pragma once

#include <string>
#include <type_traits>

namespace fxp::kernels {

// The builds, best last; the value indexes a CpuKernelTable.
enum class CpuCapability : int { Default = 0, Avx2 = 1, Avx512 = 2 };
constexpr int kCpuCapabilities = 3;

// The build this process uses: the best the CPU supports, or the one the
// environment variable FXP_CPU_CAPABILITY names (default, avx2, avx512), which
// lets the tests run every build on one machine.
CpuCapability selected_cpu_capability();
// Whether this build of fxp and this CPU have the named capability.
bool cpu_capability_available(const std::string& name);
// The capability of a name; an error for an unknown or unavailable one.
CpuCapability parse_cpu_capability(const std::string& name);

// One entry point of an op family, per build.
struct CpuKernelTable {
  const char* name;
  void* entries[kCpuCapabilities];
};

void register_cpu_kernel(CpuKernelTable& table, CpuCapability capability, void* entry);
// The entry of the given build; an error if that build did not register one.
void* cpu_kernel_entry(const CpuKernelTable& table, CpuCapability capability);

template <typename Fn>
Fn* cpu_kernel(const CpuKernelTable& table, CpuCapability capability = selected_cpu_capability()) {
  return reinterpret_cast<Fn*>(cpu_kernel_entry(table, capability));
}

}  // namespace fxp::kernels

// In a family's per-capability source, in namespace fxp::kernels: defines a
// table its header declares `extern`, in the baseline build only, so that the
// builds share no symbol (tests/python/test_cpu_builds.py). Constant
// initialization: the table is ready before any registration runs.
#if defined(FXP_CPU_CAPABILITY_ID) && FXP_CPU_CAPABILITY_ID == 0
#define FXP_DEFINE_CPU_KERNEL_TABLE(table, name) ::fxp::kernels::CpuKernelTable table{name, {}}
#else
#define FXP_DEFINE_CPU_KERNEL_TABLE(table, name) static_assert(true, "defined by the baseline build")
#endif

// In a per-capability source (FXP_CPU_CAPABILITY_ID is set by the build):
// registers `entry`, a function of type `Fn` (checked: the table erases it),
// as this build's entry of `table` when the library loads.
#define FXP_CPU_KERNEL_PASTE(a, b) a##b
#define FXP_CPU_KERNEL_NAME(a, b) FXP_CPU_KERNEL_PASTE(a, b)
#define FXP_REGISTER_CPU_KERNEL(table, Fn, entry)                                                                 \
  static_assert(std::is_same_v<decltype(entry), Fn>, #entry " must have the type of " #Fn);                     \
  static const bool FXP_CPU_KERNEL_NAME(fxp_registered_, __LINE__) =                                             \
      (::fxp::kernels::register_cpu_kernel(table, static_cast<::fxp::kernels::CpuCapability>(FXP_CPU_CAPABILITY_ID), \
                                           reinterpret_cast<void*>(&(entry))),                                    \
       true)
