// What a run carries from epoch to epoch besides tensors: the learning rate,
// the scheduler's and early stopping's counters, the best result and the
// metrics so far. A checkpoint stores it.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <string>

namespace fxp::train {

constexpr double kNoBestYet = std::numeric_limits<double>::max();

struct RunState {
  int64_t epochs_done = 0;
  double lr = 0;
  double plateau_best = kNoBestYet;
  int64_t plateau_bad = 0;
  double stop_best_loss = kNoBestYet;  // early stopping's best loss (its best accuracy is best_accuracy)
  int64_t stop_bad = 0;
  double best_accuracy = -1;
  int64_t best_epoch = 0;
  double wall_time_s = 0;
  std::string stop_reason;  // empty while the run may go on
  nlohmann::json history = nlohmann::json::array();
};
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(RunState, epochs_done, lr, plateau_best, plateau_bad, stop_best_loss, stop_bad,
                                   best_accuracy, best_epoch, wall_time_s, stop_reason, history)

}  // namespace fxp::train
