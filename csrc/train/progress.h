// A one-line progress bar for a terminal: epoch, batches, running loss, rate and ETA.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace fxp::train {

class ProgressBar {
 public:
  // Draws only when `enabled` (fxp-train: stderr is a terminal and not --quiet).
  ProgressBar(bool enabled, std::string label, int64_t total);
  // Redraws at most every 0.1 s; `loss` is only evaluated when drawing.
  template <typename LossFn>
  void update(int64_t done, LossFn&& loss) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    draw(done, loss());
  }
  void finish();  // clears the line

 private:
  void draw(int64_t done, double loss);
  bool enabled_;
  std::string label_;
  int64_t total_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace fxp::train
