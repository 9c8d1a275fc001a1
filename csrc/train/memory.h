// Measured training memory (issue 6): bytes of parameters, gradients,
// optimizer state and activations of one training step, taken from the
// allocator. On CUDA: the caching allocator's statistics. On CPU: a tracking
// allocator installed in front of LibTorch's CPU allocator, which counts the
// bytes of every live tensor storage exactly.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <vector>

namespace fxp::train {

// Installs the CPU tracking allocator (once per process; later calls do
// nothing). Storages allocated before it are not counted while they live.
void install_cpu_memory_tracking();

// Bytes of tensor storage allocated now, and the peak since the last reset,
// on the device's allocator (CPU: the tracking allocator, which must be installed).
struct AllocatorBytes {
  int64_t current = 0;
  int64_t peak = 0;
};
AllocatorBytes allocator_bytes(const torch::Device& device);
void reset_allocator_peak(const torch::Device& device);

// The bytes of the distinct storages behind these tensors (views and shared
// storages count once; undefined tensors are skipped).
int64_t storage_bytes(const std::vector<torch::Tensor>& tensors);

// One training step's memory, by category.
struct StepMemory {
  int64_t parameters = 0;       // parameters and their packed codes (module buffers included)
  int64_t gradients = 0;        // .grad of every parameter, after backward
  int64_t optimizer_state = 0;  // momentum buffers
  int64_t activations = 0;      // what the forward left allocated: the batch, saved tensors, the loss
  int64_t step_peak = 0;        // allocator peak during the step, everything included
  int64_t total() const { return parameters + gradients + optimizer_state + activations; }
};
nlohmann::json to_json(const StepMemory& m, const torch::Device& device);

// summary.json's measured_memory: the step (when measured), the process's peak
// RSS, and on CUDA the caching allocator's allocated bytes (peak since the
// measured step reset it, and current) and reserved peak.
nlohmann::json measured_memory(const torch::Device& device, const std::optional<StepMemory>& step);

// Note [Freed CPU memory stays in the process]
// glibc's malloc serves a block above its mmap threshold (at most 32 MiB,
// adjusted as blocks are freed) with its own mmap, and unmaps it when freed,
// so a step that allocates such tensors anew (a fleet's activations: K
// members' in one tensor) faults every page in again, each step: at batch 64
// a fleet of 8 spent more time in page faults than in its max-pools. This
// raises the thresholds once, so freed blocks stay in the heap for the next
// step (the process keeps its peak; a training process reaches it every step
// anyway). No effect without glibc.
void keep_freed_cpu_memory();

}  // namespace fxp::train
