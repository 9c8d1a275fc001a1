// One training epoch: every batch of the epoch's order, forward, backward and
// the optimizer's step, with the memory of one step measured once per session.
#pragma once

#include <torch/torch.h>

#include <optional>

#include "train/memory.h"
#include "train/setup.h"
#include "train/trainer.h"

namespace fxp::train {

struct EpochResult {
  double loss;                  // mean training loss; NaN when the run diverged
  torch::Tensor update_counts;  // QPU: int64 [n_params, 2], (saturated, vanished) summed over the steps
  int64_t batches;              // the epoch's batches (all of them, even after a divergence)
  bool diverged;                // packed storage met a NaN or an off-grid input (the epoch ended at the next check)
  int64_t graph_steps = 0;      // cuda_graphs: the steps that replayed the captured graph
};

// Note [Shuffling]: the order of epoch `epoch` (from 1) of a run with seed
// `seed` over n training images, on `device`.
torch::Tensor epoch_order(int64_t seed, int64_t epoch, int64_t n, const torch::Device& device);

// Note [Batch norm recalibration] (nn/network.cpp), over the first
// config.bn_recalibration_batches batches of epoch `epoch`'s order (or all of
// its batches, if fewer); nothing when that setting is 0.
void recalibrate_batch_norm(Training& training, const Split& train, const TrainConfig& config, int64_t epoch);

// MSQ's end of an epoch (docs/msq.md): a pruning check every
// msq_check_every epochs up to epochs - msq_finetune_epochs, its Hessian from
// the first batch of the epoch's order with the model in eval mode (batch
// norm's running statistics, left unchanged) and Hutchinson vectors seeded
// from (seed, epoch); with msq_finetune_epochs, the widths freeze after the
// last pruning epoch. Nothing without an MSQ controller.
void msq_end_epoch(Training& training, const Split& train, const TrainConfig& config, int64_t epoch);

// step_memory: measured on the session's first epoch (and kept).
EpochResult train_epoch(Training& training, const Split& train, const TrainConfig& config, int64_t epoch,
                        const torch::Device& device, std::optional<StepMemory>& step_memory,
                        const RunOptions& options);

}  // namespace fxp::train
