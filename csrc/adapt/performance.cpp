#include "adapt/performance.h"

namespace fxp::adapt {

int64_t fan_in(c10::IntArrayRef weight_sizes) {
  int64_t n = 1;
  for (size_t d = 1; d < weight_sizes.size(); ++d) n *= weight_sizes[d];
  return weight_sizes.empty() ? 0 : n;
}

bool is_batched_input(int64_t input_dim, int64_t weight_dim) { return input_dim >= weight_dim; }

int64_t outputs_per_sample(c10::IntArrayRef output_sizes, bool batched) {
  int64_t numel = 1;
  for (const int64_t n : output_sizes) numel *= n;
  if (!batched) return numel;
  return !output_sizes.empty() && output_sizes[0] > 0 ? numel / output_sizes[0] : 0;
}

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
