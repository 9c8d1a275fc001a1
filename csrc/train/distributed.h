// One run across processes (fxp-train --distributed): data parallel through
// torch.distributed's process groups, Gloo on the CPU and NCCL on CUDA. This
// header keeps c10d (and Gloo's and NCCL's headers) out of the trainer.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fxp::train {

// Where this process stands in a run, from the environment that torchrun sets
// (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM's (SLURM_PROCID, SLURM_NTASKS,
// SLURM_LOCALID), and the rendezvous (MASTER_ADDR, MASTER_PORT), which
// rank 0 serves.
struct ProcessPlace {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;  // the CUDA device index of `--device cuda`
  std::string master_addr;
  int64_t master_port = 0;
  // torchrun's agent already serves the store (TORCHELASTIC_USE_AGENT_STORE=True):
  // every rank joins it as a client. The run's keys go under store_prefix,
  // one per torchrun restart (TORCHELASTIC_RESTART_COUNT).
  bool agent_store = false;
  std::string store_prefix = "fxp";
};

using EnvironmentLookup = std::function<std::optional<std::string>(const std::string& name)>;

// Throws std::invalid_argument naming the variable that is missing or bad.
ProcessPlace process_place_from_environment(const EnvironmentLookup& lookup);
ProcessPlace process_place_from_environment();  // the process's environment

// A process group and its key-value store.
class ProcessGroup {
 public:
  // Joins the group of place.world_size processes: a TCPStore at
  // master_addr:master_port (rank 0 serves it), then Gloo for a CPU device
  // and NCCL for a CUDA one. Throws when this build lacks the backend's
  // headers (Note [Gloo's headers]), or when the others do not come within
  // `timeout`.
  static std::shared_ptr<ProcessGroup> join(const ProcessPlace& place, const torch::Device& device,
                                            std::chrono::milliseconds timeout);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int64_t rank() const;
  int64_t size() const;
  const std::string& backend() const;  // "gloo" or "nccl"

  // Collectives, in place, on tensors of the group's device. A sum is one
  // collective per dtype; a broadcast sends the bytes of all its tensors at once.
  void all_reduce_sum(const std::vector<torch::Tensor>& tensors);
  void broadcast_from_rank0(const std::vector<torch::Tensor>& tensors);

  const torch::Device& device() const;

  // A value under `key` in the run's store, for every rank to read; waiting
  // for it up to the group's timeout, or up to `timeout` (nullopt: not there).
  void publish(const std::string& key, const std::string& value);
  std::string wait_for(const std::string& key);
  std::optional<std::string> wait_for(const std::string& key, std::chrono::milliseconds timeout);

  // After an error on this rank: stops the backend's pending work (NCCL), so
  // that the process can exit. The other ranks' collectives then fail.
  void abort();

  struct Impl;

 private:
  explicit ProcessGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The names of the tensors whose bits differ on some rank from rank 0's (the
// same list on every rank; empty when the replicas are identical). When the
// lists themselves differ (names, dtypes, sizes), says so and compares
// nothing else. Tensors travel one at a time, broadcast in place, so the
// check needs memory for one more copy of the largest.
std::vector<std::string> replica_differences(ProcessGroup& group,
                                             const std::vector<std::pair<std::string, torch::Tensor>>& named);

}  // namespace fxp::train
