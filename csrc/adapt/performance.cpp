#include "adapt/performance.h"

namespace fxp::adapt {

TrainingCost training_cost(const std::vector<LayerWork>& layers, bool l1) {
  TrainingCost cost;
  for (const auto& l : layers) {
    const auto m = static_cast<double>(l.madds), p = static_cast<double>(l.parameters);
    const auto t = static_cast<double>(l.iterations);
    cost.adapt += m * (2 * l.sparse_units + l.dense_units) + t * p * (1 + 3 + (l1 ? 1 : 0)) +
                  static_cast<double>(l.pd_evaluations + l.switches) * 2 * p;
    cost.float32 += 3 * m * static_cast<double>(l.samples) + t * p;
  }
  return cost;
}

double model_size_ratio(const std::vector<LayerWork>& layers) {
  double size = 0, float_size = 0;
  for (const auto& l : layers) {
    size += static_cast<double>(l.parameters) * static_cast<double>(l.bits) * l.density;
    float_size += static_cast<double>(l.parameters) * 32;
  }
  return float_size > 0 ? size / float_size : 0;
}

double inference_speedup(const std::vector<LayerWork>& layers) {
  double cost = 0, float_cost = 0;
  for (const auto& l : layers) {
    cost += static_cast<double>(l.madds) * static_cast<double>(l.bits) * l.density;
    float_cost += static_cast<double>(l.madds) * 32;
  }
  return cost > 0 ? float_cost / cost : 0;
}

}  // namespace fxp::adapt
