// The validation pass, and the per-layer statistics of an epoch.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "train/epoch.h"
#include "train/setup.h"

namespace fxp::train {

struct Validation {
  double loss;      // mean cross-entropy over the validation images
  double accuracy;  // share of them classified correctly
};

// Also collects each layer's output saturation (OutputStats) for layer_statistics.
Validation validate(Training& training, const Split& val, const TrainConfig& config, const torch::Device& device);

struct LayerStatistics {
  nlohmann::json layers;             // per layer: output and parameter saturation (docs/train.md)
  nlohmann::json vanished_fraction;  // QPU: the share of element updates that vanished; null otherwise
};

// From the last validation pass and the epoch's update counts.
LayerStatistics layer_statistics(Training& training, const TrainConfig& config, const EpochResult& epoch);

}  // namespace fxp::train
