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

// Note [Fleet compaction]
// A member that stops (its epochs, early stopping, a non-finite loss) stays
// in the stacks, inactive: it takes no step and its rows keep their values,
// but its forward still runs. Once the members still training are at most
// compact_below of the stacks, the stacks are rebuilt from their rows (and
// the momentum buffers with them), and the stopped members' parameters get
// storage of their own. Members never interact, so compaction changes no
// member's bits (tested: test_fleet.cpp, test_fxp_train_fleet.py).
struct FleetOptions {
  double compact_below = 0.75;  // 0: never compact
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
