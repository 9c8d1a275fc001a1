#include "msq/width_controller.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "ops/ops.h"

namespace fxp::msq {
namespace {

constexpr const char* kName = "fxp::msq";

// max |w| as a float32 value (so that RoundClamp's products are exact); 1 for
// an all-zero weight, whose codes are 0 at any scale.
double weight_scale(const std::string& name, const torch::Tensor& w) {
  const float m = w.detach().abs().max().item<float>();
  TORCH_CHECK(std::isfinite(m), kName, ": the weights of ", name, " are not finite; MSQ cannot scale them");
  return m > 0 ? m : 1.0;
}

}  // namespace

std::vector<int64_t> bits_after_check(const std::vector<int64_t>& bits, const std::vector<double>& sparsity,
                                      const std::vector<double>& sensitivity, double alpha, int64_t min_bits) {
  TORCH_CHECK(sparsity.size() == bits.size() && (sensitivity.empty() || sensitivity.size() == bits.size()), kName,
              ": one sparsity (and sensitivity) per layer");
  const double mean = sensitivity.empty() ? 0.0
                                          : std::accumulate(sensitivity.begin(), sensitivity.end(), 0.0) /
                                                static_cast<double>(sensitivity.size());
  std::vector<int64_t> out(bits);
  for (size_t l = 0; l < bits.size(); ++l) {
    if (sparsity[l] < alpha) continue;
    const int64_t k = !sensitivity.empty() && sensitivity[l] < mean ? 2 : 1;
    out[l] = std::max(std::min(min_bits, bits[l]), bits[l] - k);  // down to min_bits, never up
  }
  return out;
}

double compression_rate(const std::vector<int64_t>& bits, const std::vector<int64_t>& weights) {
  TORCH_CHECK(bits.size() == weights.size(), kName, ": one width per layer");
  double total = 0, stored = 0;
  for (size_t l = 0; l < bits.size(); ++l) {
    total += static_cast<double>(weights[l]);
    stored += static_cast<double>(bits[l]) * static_cast<double>(weights[l]);
  }
  return stored > 0 ? 32.0 * total / stored : 0.0;
}

WidthController::WidthController(std::vector<std::pair<std::string, torch::Tensor>> weights, MsqOptions options)
    : options_(std::move(options)) {
  TORCH_CHECK(options_.min_bits >= 1 && options_.start_bits >= options_.min_bits && options_.start_bits <= 15, kName,
              ": the widths must satisfy 1 <= min_bits <= start_bits <= 15, but got min_bits ", options_.min_bits,
              " and start_bits ", options_.start_bits);
  TORCH_CHECK(options_.lambda >= 0 && std::isfinite(options_.lambda), kName,
              ": lambda must be a non-negative number, but got ", options_.lambda);
  TORCH_CHECK(options_.alpha >= 0 && options_.alpha <= 1, kName, ": alpha must be in [0, 1], but got ",
              options_.alpha);
  TORCH_CHECK(!options_.hessian || options_.hessian_options.samples >= 1, kName,
              ": the Hessian needs at least one Hutchinson sample, but got ", options_.hessian_options.samples);
  TORCH_CHECK(!weights.empty(), kName, ": no weights to quantize");
  for (auto& [name, weight] : weights) {
    TORCH_CHECK(weight.defined() && weight.numel() > 0, kName, ": the weights of ", name, " are empty");
    TORCH_CHECK(weight.scalar_type() == torch::kFloat || weight.scalar_type() == torch::kDouble, kName,
                ": the weights of ", name, " must be float32 or float64 (RoundClamp's types), but are ",
                weight.scalar_type());
    const double scale = weight_scale(name, weight);
    layers_.push_back(MsqLayer{std::move(name), std::move(weight), options_.start_bits, scale});
  }
}

torch::Tensor WidthController::penalty(const std::vector<torch::Tensor>& lsb_l1) const {
  TORCH_CHECK(lsb_l1.size() == layers_.size(), kName, ": penalty needs one LSB L1 norm per layer (", layers_.size(),
              "), but got ", lsb_l1.size());
  torch::Tensor sum;
  if (!frozen_ && options_.lambda != 0) {
    for (const auto& l1 : lsb_l1) {
      if (l1.defined()) sum = sum.defined() ? sum + l1 : l1;  // undefined: no forward through this layer yet
    }
  }
  return sum.defined() ? options_.lambda * sum : torch::zeros({}, layers_.front().weight.options());
}

std::vector<int64_t> WidthController::check(const torch::Tensor& float_path_loss, uint64_t hessian_seed) {
  TORCH_CHECK(!frozen_, kName, ": the widths are frozen for fine-tuning; no more pruning checks");
  std::vector<int64_t> bits, weights;
  std::vector<double> sensitivity;
  const std::vector<double> sparsity = sparsities();
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i].sparsity = sparsity[i];
    bits.push_back(layers_[i].bits);
    weights.push_back(layers_[i].weight.numel());
  }
  if (options_.hessian) {
    TORCH_CHECK(float_path_loss.defined(), kName, ": a check with the Hessian needs the loss on the float path");
    std::vector<std::vector<torch::Tensor>> groups;
    std::vector<std::string> names;
    for (const auto& l : layers_) {
      groups.push_back({l.weight});
      names.push_back(l.name);
    }
    HessianTraceOptions hessian = options_.hessian_options;
    hessian.seed = hessian_seed;
    const std::vector<double> traces = hessian_traces(float_path_loss, groups, hessian, names);
    for (size_t i = 0; i < layers_.size(); ++i) {
      layers_[i].hessian_trace = traces[i];
      sensitivity.push_back(traces[i] / static_cast<double>(weights[i]));  // the mean Hessian diagonal
    }
  }
  const auto next = bits_after_check(bits, sparsity, sensitivity, options_.alpha, options_.min_bits);
  std::vector<int64_t> dropped;
  for (size_t i = 0; i < layers_.size(); ++i) {
    dropped.push_back(bits[i] - next[i]);
    layers_[i].bits = next[i];
  }
  return dropped;
}

std::vector<double> WidthController::sparsities() const {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> nonzero;
  for (const auto& l : layers_) nonzero.push_back(std::get<2>(fxp::round_clamp(l.weight.detach(), l.scale, l.bits)));
  // One device-to-host copy for all layers, not one sync per layer.
  const torch::Tensor counts = torch::stack(nonzero).cpu();
  std::vector<double> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    out.push_back(1.0 - static_cast<double>(counts[static_cast<int64_t>(i)].item<int64_t>()) /
                            static_cast<double>(layers_[i].weight.numel()));
  }
  return out;
}

std::vector<MsqLayerRecord> WidthController::records() const {
  const std::vector<double> sparsity = sparsities();
  std::vector<MsqLayerRecord> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const MsqLayer& l = layers_[i];
    out.push_back({l.name, l.bits, l.weight.numel(), sparsity[i], l.sparsity, l.hessian_trace, l.scale});
  }
  return out;
}

bool WidthController::weights_finite() const {
  torch::NoGradGuard no_grad;
  for (const auto& l : layers_) {
    if (!torch::isfinite(l.weight).all().item<bool>()) return false;
  }
  return true;
}

double WidthController::compression_rate() const {
  std::vector<int64_t> bits, weights;
  for (const auto& l : layers_) {
    bits.push_back(l.bits);
    weights.push_back(l.weight.numel());
  }
  return msq::compression_rate(bits, weights);
}

std::vector<std::pair<std::string, torch::Tensor>> WidthController::state() const {
  std::vector<int64_t> bits, weights;
  std::vector<double> scale, sparsity, trace;
  for (const auto& l : layers_) {
    bits.push_back(l.bits);
    weights.push_back(l.weight.numel());
    scale.push_back(l.scale);
    sparsity.push_back(l.sparsity);
    trace.push_back(l.hessian_trace);
  }
  const auto f64 = torch::TensorOptions(torch::kDouble);
  return {{"msq.bits", torch::tensor(bits, torch::kLong)},
          {"msq.weights", torch::tensor(weights, torch::kLong)},
          {"msq.scale", torch::tensor(scale, f64)},
          {"msq.sparsity", torch::tensor(sparsity, f64)},
          {"msq.hessian_trace", torch::tensor(trace, f64)},
          {"msq.frozen", torch::tensor(static_cast<int64_t>(frozen_))}};
}

void WidthController::load_state(const std::function<torch::Tensor(const std::string& name)>& read) {
  const auto n = static_cast<int64_t>(layers_.size());
  const auto get = [&](const std::string& name) {
    torch::Tensor t = read(name);
    TORCH_CHECK(t.defined(), kName, ": the state has no '", name, "'");
    return t.cpu();
  };
  const torch::Tensor bits = get("msq.bits"), scale = get("msq.scale").to(torch::kDouble),
                      sparsity = get("msq.sparsity").to(torch::kDouble),
                      trace = get("msq.hessian_trace").to(torch::kDouble), frozen = get("msq.frozen");
  for (const auto& t : {bits, scale, sparsity, trace}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kName, ": the state is for ", t.numel(), " layers, but there are ", n);
  }
  TORCH_CHECK(frozen.numel() == 1, kName, ": the state's 'msq.frozen' must have one element");
  TORCH_CHECK(bits.scalar_type() == torch::kLong, kName, ": the state's 'msq.bits' must be int64, but is ",
              bits.scalar_type());
  // Each layer's weight count, so that a state of another model with as many layers does not load
  // (absent from states written before it was added).
  const torch::Tensor weights = read("msq.weights");
  if (weights.defined()) {
    const torch::Tensor counts = weights.cpu();
    TORCH_CHECK(counts.dim() == 1 && counts.size(0) == n, kName, ": the state's 'msq.weights' is for ", counts.numel(),
                " layers, but there are ", n);
    for (int64_t i = 0; i < n; ++i) {
      const auto& l = layers_[static_cast<size_t>(i)];
      TORCH_CHECK(counts[i].item<int64_t>() == l.weight.numel(), kName, ": the state's layer ", i, " has ",
                  counts[i].item<int64_t>(), " weights, but ", l.name, " has ", l.weight.numel());
    }
  }
  std::vector<MsqLayer> next = layers_;  // all or nothing
  for (int64_t i = 0; i < n; ++i) {
    MsqLayer& l = next[static_cast<size_t>(i)];
    l.bits = bits[i].item<int64_t>();
    l.scale = scale[i].item<double>();
    l.sparsity = sparsity[i].item<double>();
    l.hessian_trace = trace[i].item<double>();
    TORCH_CHECK(l.bits >= 1 && l.bits <= 15, kName, ": the state's layer ", l.name, " has bits ", l.bits,
                "; 'msq.bits' must be in [1, 15] (a width, the sign not counted)");
    TORCH_CHECK(l.scale > 0 && std::isfinite(l.scale), kName, ": the state's layer ", l.name, " has scale ",
                l.scale, "; 'msq.scale' must be a positive finite number");
  }
  layers_ = std::move(next);
  frozen_ = frozen.item().toLong() != 0;
}

}  // namespace fxp::msq
