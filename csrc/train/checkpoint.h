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
#include "train/run_state.h"

namespace fxp::train {

// `adapt`: AdaPT's controller, whose state travels with the model (or null).
void save_checkpoint(const std::string& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                     const adapt::Controller* adapt, const RunState& state, const nlohmann::json& settings,
                     const torch::Device& device);

// Restores the model, the optimizer, the controller and the generators;
// returns the run state.
RunState load_checkpoint(const std::string& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                         adapt::Controller* adapt, const torch::Device& device);

// The settings a checkpoint was written with, after its checksum is verified.
nlohmann::json checkpoint_settings(const std::string& path);

}  // namespace fxp::train
