// What happens between epochs: the plateau scheduler, early stopping and the
// best result, as the paper's runs use them (docs/train.md).
#pragma once

#include "train/config.h"
#include "train/run_state.h"

namespace fxp::train {

// Records a finished epoch in the state: the plateau scheduler (torch's
// ReduceLROnPlateau: mode min, relative threshold 1e-4) may lower state.lr,
// early stopping counts epochs without a better validation loss or accuracy,
// and the run stops (state.stop_reason) on a non-finite training loss or when
// early stopping's patience runs out after its minimum number of epochs.
void end_epoch(RunState& state, const TrainConfig& config, int64_t epoch, double train_loss, double val_loss,
               double val_accuracy);

}  // namespace fxp::train
