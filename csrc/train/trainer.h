// The fxp-train loop: one run of the paper's experiments (data, model, method,
// optimizer, scheduler, early stopping, metrics, checkpoints and resume).
#pragma once

#include <nlohmann/json.hpp>

#include <ostream>
#include <string>

#include "train/config.h"

namespace fxp::train {

struct RunOptions {
  bool resume = false;     // continue from <output_dir>/checkpoint.pt when there is one
  bool overwrite = false;  // discard whatever <output_dir> holds
  bool progress = false;   // draw a progress bar on stderr
  std::ostream* log = nullptr;  // one readable line per epoch (null: silent)
};

// Files of a run, under its output directory.
struct RunFiles {
  explicit RunFiles(const std::string& dir);
  std::string dir, config, metrics, summary, checkpoint;
  std::string msq_export;  // MSQ's bit-packed model, at the end of an msq run
};

// The output directory of a config: output_dir, or results/<run name>.
std::string output_dir_for(const TrainConfig& config);

// Trains and returns the summary (also written to <output_dir>/summary.json).
// Writes config.json at the start, metrics.jsonl and checkpoint.pt after every
// epoch; every write is atomic. Throws std::exception with a readable message
// for bad settings, missing data or an output directory that holds another run.
nlohmann::json run_training(const TrainConfig& config, const RunOptions& options);

// A readable multi-line rendering of a summary.
std::string summary_text(const nlohmann::json& summary);

}  // namespace fxp::train
