// summary.json: what a finished run reports (docs/train.md), and its text.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <optional>

#include "train/memory.h"
#include "train/run_state.h"
#include "train/setup.h"

namespace fxp::train {

struct RunRecord {
  const TrainConfig& config;
  const nlohmann::json& settings;  // the resolved config, as config.json holds it
  const RunState& state;
  Training& training;
  int64_t train_images, val_images;
  const torch::Device& device;
  const std::optional<StepMemory>& step_memory;
  double session_time_s;
};

nlohmann::json make_summary(const RunRecord& run);

}  // namespace fxp::train
