// fxp-train --fleet: many runs of the paper's grids trained as one fleet
// (nn/fleet.h, optim/fleet_sgd.h; docs/train.md, "Fleets"). Each member
// writes its own run directory, as fxp-train writes it for the solo run.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "train/config.h"
#include "train/trainer.h"

namespace fxp::train {

struct FleetOptions {
  // Compaction: when the members still training are at most this share of
  // the fleet's stacks, the stacks shrink to them (0: never).
  double compact_below = 0.75;
};

// Why `members` cannot train as one fleet (empty: they can): the settings they
// must share (model, dataset, method, batch size, ...), and what fleets do not
// hold yet (packed storage, AdaPT, MSQ, other models, ...).
std::string fleet_incompatibility(const std::vector<TrainConfig>& members);

// The group a run trains in when a sweep makes fleets: runs of one group can
// share a fleet. A JSON text of the settings members share, or nullopt when
// the run cannot join a fleet (fleet_incompatibility). scripts/sweep groups by
// it (fxp-train --print-configs prints it), so the rule lives here alone.
std::optional<std::string> fleet_group(const TrainConfig& config);

// Trains the members together; returns their summaries in order (a finished
// member's as its directory holds it). options.resume and options.overwrite
// apply to every member.
nlohmann::json run_fleet(const std::vector<TrainConfig>& members, const RunOptions& options,
                         const FleetOptions& fleet_options = {});

}  // namespace fxp::train
