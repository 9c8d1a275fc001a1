// Note [Resume]
// Whether a run starts fresh, continues from its checkpoint, or is already
// done: --overwrite clears the directory; without --resume, a directory that
// holds this finished run returns its summary (so a command can be repeated),
// and one that holds anything else is an error; with --resume, the checkpoint
// must have been written with the same settings (it records them), except the
// keys that may change on resume (config.h).
#pragma once

#include <nlohmann/json.hpp>

#include <optional>

#include "train/trainer.h"

namespace fxp::train {

struct RunStart {
  bool resume = false;                    // continue from files.checkpoint
  std::optional<nlohmann::json> finished;  // the summary of the finished run the directory already holds
};

// `settings`: the run's resolved config (to_json, with output_dir).
RunStart decide_start(const RunFiles& files, const nlohmann::json& settings, const RunOptions& options);

}  // namespace fxp::train
