#include "train/memory.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <c10/core/CPUAllocator.h>

#include <sys/resource.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <algorithm>

#if defined(FXP_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace fxp::train {
namespace {

// Wraps LibTorch's CPU allocator and counts live bytes. Its DataPtrs are
// "simple" (context == data), as raw_allocate callers require; a side table
// keeps each wrapped DataPtr, so freeing goes through the original deleter.
class TrackingCpuAllocator final : public c10::Allocator {
 public:
  explicit TrackingCpuAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    const auto bytes = static_cast<int64_t>(n);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (data != nullptr) live_.emplace(data, Entry{std::move(inner), bytes});
      current_ += bytes;
      peak_ = std::max(peak_, current_);
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

  int64_t current() {
    std::lock_guard<std::mutex> lock(mutex_);
    return current_;
  }
  int64_t peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_ = current_;
  }

 private:
  struct Entry {
    c10::DataPtr inner;
    int64_t bytes;
  };
  static void release(void* data);

  c10::Allocator* base_;
  std::mutex mutex_;
  std::unordered_map<void*, Entry> live_;
  int64_t current_ = 0, peak_ = 0;
};

TrackingCpuAllocator* cpu_tracker = nullptr;

void TrackingCpuAllocator::release(void* data) {
  if (data == nullptr) return;
  c10::DataPtr inner;  // destroyed outside the lock: it frees the memory
  {
    std::lock_guard<std::mutex> lock(cpu_tracker->mutex_);
    auto it = cpu_tracker->live_.find(data);
    if (it == cpu_tracker->live_.end()) return;
    cpu_tracker->current_ -= it->second.bytes;
    inner = std::move(it->second.inner);
    cpu_tracker->live_.erase(it);
  }
}

#if defined(FXP_WITH_CUDA)
c10::DeviceIndex cuda_index(const torch::Device& device) {
  return device.has_index() ? device.index() : c10::cuda::current_device();
}
#endif

}  // namespace

void keep_freed_cpu_memory() {
#if defined(__GLIBC__)
  static std::once_flag once;
  std::call_once(once, [] {
    constexpr int kOneGiB = 1 << 30;
    mallopt(M_MMAP_THRESHOLD, kOneGiB);  // blocks up to 1 GiB come from the heap
    mallopt(M_TRIM_THRESHOLD, kOneGiB);  // and the heap's free top is kept up to 1 GiB
  });
#endif
}

void install_cpu_memory_tracking() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Never destroyed: storages may outlive every other static.
    cpu_tracker = new TrackingCpuAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(cpu_tracker, /*priority=*/100);
  });
}

#if defined(FXP_WITH_CUDA)
namespace {
const c10::CachingAllocator::Stat& aggregate(const c10::CachingAllocator::StatArray& stats) {
  return stats[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
}
}  // namespace
#endif

AllocatorBytes allocator_bytes(const torch::Device& device) {
#if defined(FXP_WITH_CUDA)
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(cuda_index(device));
    return {aggregate(stats.allocated_bytes).current, aggregate(stats.allocated_bytes).peak};
  }
#endif
  TORCH_CHECK(device.is_cpu(), "fxp-train: no memory statistics for device ", device);
  TORCH_CHECK(cpu_tracker != nullptr, "fxp-train: CPU memory tracking is not installed");
  return {cpu_tracker->current(), cpu_tracker->peak()};
}

void reset_allocator_peak(const torch::Device& device) {
#if defined(FXP_WITH_CUDA)
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(cuda_index(device));
    return;
  }
#endif
  if (cpu_tracker != nullptr) cpu_tracker->reset_peak();
}

int64_t storage_bytes(const std::vector<torch::Tensor>& tensors) {
  std::unordered_set<const void*> seen;
  int64_t bytes = 0;
  for (const auto& t : tensors) {
    if (!t.defined()) continue;
    const c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
    if (seen.insert(storage).second) bytes += static_cast<int64_t>(storage->nbytes());
  }
  return bytes;
}

nlohmann::json to_json(const StepMemory& m, const torch::Device& device) {
  return {{"source", device.is_cuda() ? "cuda caching allocator" : "cpu tracking allocator"},
          {"parameters_bytes", m.parameters},
          {"gradients_bytes", m.gradients},
          {"optimizer_state_bytes", m.optimizer_state},
          {"activations_bytes", m.activations},
          {"total_bytes", m.total()},
          {"step_peak_bytes", m.step_peak}};
}

nlohmann::json measured_memory(const torch::Device& device, const std::optional<StepMemory>& step) {
  nlohmann::json m = nlohmann::json::object();
  if (step) m["step"] = to_json(*step, device);
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) == 0) m["process_peak_rss_bytes"] = static_cast<int64_t>(usage.ru_maxrss) * 1024;
  if (device.is_cuda()) {
    const AllocatorBytes allocated = allocator_bytes(device);
    m["cuda_peak_allocated_bytes"] = allocated.peak;
    m["cuda_current_allocated_bytes"] = allocated.current;
#if defined(FXP_WITH_CUDA)
    m["cuda_peak_reserved_bytes"] =
        aggregate(c10::cuda::CUDACachingAllocator::getDeviceStats(cuda_index(device)).reserved_bytes).peak;
#endif
  }
  return m;
}

}  // namespace fxp::train
