// Note [Checkpoints]
// A checkpoint holds the model, the optimizer, the run state, the default
// generators' states and the run's settings, serialized in memory and written
// in one atomic write with a checksum (Note [Checksummed files] in io.h): a
// full disk leaves the previous checkpoint as it was, a damaged file is never
// resumed from, and the settings travel with the numbers.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <string>

#include "adapt/controller.h"
#include "msq/controller.h"
#include "train/run_state.h"

namespace fxp::train {

// `adapt`, `msq`: AdaPT's and MSQ's controllers, whose state travels with the
// model (or null).
void save_checkpoint(const std::string& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                     const adapt::Controller* adapt, const RunState& state, const nlohmann::json& settings,
                     const torch::Device& device, const msq::Controller* msq = nullptr);

// Restores the model, the optimizer, the controllers and the generators;
// returns the run state.
RunState load_checkpoint(const std::string& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                         adapt::Controller* adapt, const torch::Device& device, msq::Controller* msq = nullptr);

// The model weights of the checkpoint at `path` into `model` (--init-from):
// its "model" archive, which must match the model's parameters and buffers.
void load_model_weights(const std::string& path, torch::nn::Module& model);

// What a checkpoint records of its run, after its checksum is verified: the
// settings it was written with and the epochs it has done.
struct CheckpointRecord {
  nlohmann::json settings;
  int64_t epochs_done = 0;
};
CheckpointRecord checkpoint_record(const std::string& path);

}  // namespace fxp::train
