// What a run trains with: the data on its device, and the model and optimizer
// of its method (Note [Identical initialization]).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>

#include "nn/modules.h"
#include "optim/qpu_sgd.h"
#include "train/config.h"

namespace fxp::train {

struct Split {
  torch::Tensor images;  // float32 [n, 1, 28, 28], normalized, on the training device
  torch::Tensor labels;  // int64 [n]
  int64_t size() const { return labels.size(0); }
};

// split "train" or "t10k" of config.data_dir, its first `limit` images (0: all).
Split load_split(const TrainConfig& config, const std::string& split, int64_t limit, const torch::Device& device);

struct Training {
  nn::PaperCNN model{nullptr};
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  optim::QpuSgd* qpu = nullptr;  // the optimizer, for QPU methods
  bool packed = false;           // packed storage (docs/memory.md)
};

// The model on `device`, initialized from config.seed, and its optimizer.
Training set_up_training(const TrainConfig& config, const torch::Device& device);

void set_lr(torch::optim::Optimizer& optimizer, double lr);

}  // namespace fxp::train
