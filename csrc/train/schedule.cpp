#include "train/schedule.h"

#include <cmath>

namespace fxp::train {

void end_epoch(RunState& state, const TrainConfig& c, int64_t epoch, double train_loss, double val_loss,
               double val_accuracy) {
  if (c.scheduler == "plateau") {
    if (val_loss < state.plateau_best * (1.0 - 1e-4)) {
      state.plateau_best = val_loss;
      state.plateau_bad = 0;
    } else if (++state.plateau_bad > c.plateau_patience) {
      state.lr *= c.plateau_factor;
      state.plateau_bad = 0;
    }
  }
  const bool improved = val_loss < state.stop_best_loss || val_accuracy > state.best_accuracy;
  if (val_loss < state.stop_best_loss) state.stop_best_loss = val_loss;
  state.stop_bad = improved ? 0 : state.stop_bad + 1;
  if (val_accuracy > state.best_accuracy) {
    state.best_accuracy = val_accuracy;
    state.best_epoch = epoch;
  }
  state.epochs_done = epoch;
  if (!std::isfinite(train_loss)) {
    state.stop_reason = "non_finite_loss";
  } else if (c.early_stopping && state.stop_bad >= c.early_stopping_patience && epoch >= c.early_stopping_min_epochs) {
    state.stop_reason = "early_stopping";
  }
}

}  // namespace fxp::train
