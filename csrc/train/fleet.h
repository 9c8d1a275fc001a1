// fxp-train --fleet: many runs of the paper's grids trained as one fleet
// (nn/fleet.h, optim/fleet_sgd.h; docs/train.md, "Many runs as one"). Each member
// writes its own run directory, as fxp-train writes it for the solo run.
#pragma once

#include <c10/core/Device.h>
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
  int64_t chunk = 0;            // members per forward and backward (Note [Fleet chunks]); 0: fleet_chunk's choice
};

// Note [Fleet chunk size]
// On the CPU a fleet's activations are K times a solo run's. Past the caches
// every elementwise op streams from memory: a fleet of 80 at batch 64 (2.5 GB
// of activations) ran at 0.69x the solo speed, and at 1.0x in chunks of 8
// members (images/s measured on the 2-vCPU machine of docs/benchmarks.md,
// 2026-12-05). Chunks of kFleetChunkImages images per forward and backward
// keep each chunk's working set small; below batch 16 the whole fleet is one
// chunk up to K = 32 at least, where one call per op is what fleets save. On
// CUDA the whole fleet is one chunk: launches are the cost there, not caches.
constexpr int64_t kFleetChunkImages = 512;

// Members per forward and backward: `requested` when set (> 0), else the
// choice of Note [Fleet chunk size] (0: all members at once).
int64_t fleet_chunk(int64_t requested, const c10::Device& device, int64_t batch_size);

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
