// summary.json: what a finished run reports (docs/train.md), and its text.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <optional>
#include <string>

#include "train/memory.h"
#include "train/run_state.h"
#include "train/setup.h"
#include "train/validate.h"

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

// The epoch's line of metrics.jsonl (docs/train.md).
nlohmann::json epoch_record(int64_t epoch, const EpochResult& trained, const Validation& v,
                            const LayerStatistics& stats, double lr, double epoch_time, double train_time,
                            int64_t train_images);

// The readable line fxp-train prints after an epoch of the run `config`, and
// under it the layers whose outputs saturated in validation (saturation_note).
void log_epoch(std::ostream& log, const nlohmann::json& record, const TrainConfig& config);

// What sets the range of a run's layer outputs, in words, for saturation_note.
std::string output_range_flags(const TrainConfig& config);

// Note [Saturation in the epoch line]: a line naming the layers of an epoch
// record's `layers` that saturated more than 1% of their outputs, worst first
// (three by name, then a count), and `range_flags`; empty when none did.
std::string saturation_note(const nlohmann::json& layers, const std::string& range_flags);

}  // namespace fxp::train
