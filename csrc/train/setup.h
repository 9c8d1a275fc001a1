// What a run trains with: the data on its device, and the model and optimizer
// of its method (Note [Identical initialization]).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>

#include "adapt/controller.h"
#include "msq/controller.h"
#include "nn/models.h"
#include "optim/qpu_sgd.h"
#include "train/config.h"
#include "train/distributed.h"

namespace fxp::train {

struct Split {
  torch::Tensor images;  // float32 [n, C, S, S], normalized, on the training device (S: the model's input size)
  torch::Tensor labels;  // int64 [n]
  int64_t size() const { return labels.size(0); }
};

// The training (or test) split of config.dataset, its first `limit` images (0:
// all), fitted to config.model's input size (data::fit_images) and normalized.
Split load_split(const TrainConfig& config, bool train, int64_t limit, const torch::Device& device);

struct Training {
  std::shared_ptr<nn::NetworkImpl> model;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  optim::QpuSgd* qpu = nullptr;  // the optimizer, for QPU methods
  bool packed = false;           // packed storage (docs/memory.md)
  // packed: int64 [3] on the device, what the steps since the last check
  // could not store: NaN and off-grid saved layer inputs (the layers'
  // pack_counts are its first two), NaN updates (the QPU optimizer's counter
  // is the third). Note [Deferred pack checks in training], epoch.cpp.
  torch::Tensor packed_counts;
  std::unique_ptr<adapt::Controller> adapt;  // AdaPT's controller, for method adapt
  std::unique_ptr<msq::Controller> msq;      // MSQ's controller, for method msq
  // cuda_graphs: the side stream every epoch's steps run on (Note [CUDA-graph
  // training steps]); one per run, so its cuBLAS workspace and cached blocks are reused.
  std::optional<c10::Stream> graph_stream;
  // distributed: the run's process group (Note [Data-parallel steps], epoch.cpp); null otherwise.
  std::shared_ptr<ProcessGroup> data_parallel;
};

// MSQ's controller options from the msq_* keys.
msq::MsqOptions msq_options(const TrainConfig& config);

// AdaPT's controller options from the adapt_* keys and l1_decay.
adapt::AdaptOptions adapt_options(const TrainConfig& config);

// config.model's layers quantized as config.method and the formats say, for
// config.dataset's channels and classes (not on a device yet).
std::shared_ptr<nn::NetworkImpl> build_network(const TrainConfig& config);

// A 64-bit key derived from (seed, salt) by splitmix64. Salt 0: the forward's
// key on a GPU (Note [The forward's key on a GPU]); the epoch e (from 1): its
// shuffle (Note [Shuffling]), and data-parallel draws, whose ranks salt it
// again with rank + 1 (Note [Data-parallel steps]); MSQ's Hessian probes take
// (seed ^ 0x4D5351, e).
uint64_t mix_seed(uint64_t seed, uint64_t salt);

// The model on `device`, initialized from config.seed, and its optimizer.
// resuming: the run continues from its checkpoint, so init_from is not read.
Training set_up_training(const TrainConfig& config, const torch::Device& device, bool resuming = false);

// The CPUs this process may run on (its affinity mask: a SLURM allocation's, not the node's).
int64_t usable_cpus();

// Writes a "note:" line, after `prefix`, for each setting the run does not
// read (Note [Settings without effect]), for more threads than usable_cpus(),
// and for batch norm's: recalibration on a model without it, or none on a
// quantized model with it.
void log_settings_notes(std::ostream& log, const TrainConfig& config, const nn::NetworkImpl& model,
                        const std::string& prefix = "");

void set_lr(torch::optim::Optimizer& optimizer, double lr);

// The optimizer's state (momentum buffers), and AdaPT's accumulated
// gradients, which belong to the update as the momentum does; in the
// model's parameter order, named.
std::vector<std::pair<std::string, torch::Tensor>> named_optimizer_state(const Training& training);
std::vector<torch::Tensor> optimizer_state(const Training& training);

}  // namespace fxp::train
