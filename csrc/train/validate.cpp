#include "train/validate.h"

#include <string>
#include <vector>

#include "ops/ops.h"

namespace fxp::train {
namespace {

using nlohmann::json;

// The layer a parameter belongs to: "conv1.conv.weight" -> "conv1".
// The quantized layer a parameter belongs to: the longest layer path that
// prefixes its name ("layer1_0.conv1" for "layer1_0.conv1.conv.weight"), else
// its first component.
std::string layer_of(const std::string& parameter_name, const std::vector<std::string>& layer_names) {
  std::string best;
  for (const auto& layer : layer_names) {
    if (parameter_name.rfind(layer + ".", 0) == 0 && layer.size() > best.size()) best = layer;
  }
  return best.empty() ? parameter_name.substr(0, parameter_name.find('.')) : best;
}

}  // namespace

// Note [Sharded validation]
// A distributed run validates each rank's contiguous share of the test split,
// [n*r/W, n*(r+1)/W), and sums across ranks, in one all-reduce each, the loss
// (float64), the correct answers and every layer's saturation counts, so every
// rank gets the same figures (the sum is the same on every rank) and takes
// the same scheduler and early-stopping decisions. All ranks draw from the
// same streams here (Note [Data-parallel steps]), each for its own images.
Validation validate(Training& t, const Split& val, const TrainConfig& c, const torch::Device& device) {
  t.model->eval();
  torch::NoGradGuard no_grad;
  auto stats = t.model->output_stats();
  for (auto& [name, s] : stats) s->reset(), s->enabled = true;
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions(torch::kFloat64).device(device));
  torch::Tensor correct = torch::zeros({}, torch::TensorOptions(torch::kLong).device(device));
  int64_t begin = 0, end = val.size();
  if (t.data_parallel) {
    const int64_t r = t.data_parallel->rank(), w = t.data_parallel->size();
    begin = val.size() * r / w, end = val.size() * (r + 1) / w;
  }
  for (int64_t start = begin; start < end; start += c.eval_batch_size) {
    const int64_t len = std::min(c.eval_batch_size, end - start);
    const torch::Tensor x = val.images.narrow(0, start, len), y = val.labels.narrow(0, start, len);
    const torch::Tensor logits = t.model->forward(x);
    loss_sum.add_(torch::nn::functional::cross_entropy(
                      logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                      .to(torch::kFloat64));
    correct.add_(logits.argmax(1).eq(y).sum());
  }
  for (auto& [name, s] : stats) s->enabled = false;
  if (t.data_parallel) {  // Note [Sharded validation]
    // correct, then per layer: whether it counted saturation, the count, its elements.
    std::vector<torch::Tensor> counts{correct.reshape({1})};
    for (auto& [name, s] : stats) {
      const bool counted = s->saturated.defined();
      torch::Tensor entry =
          torch::tensor({int64_t{counted}, int64_t{0}, s->elements}, torch::TensorOptions(torch::kLong).device(device));
      if (counted) entry[1].add_(s->saturated);  // on the device: no read per layer
      counts.push_back(entry);
    }
    torch::Tensor all = torch::cat(counts);
    t.data_parallel->all_reduce_sum({loss_sum, all});
    correct = all[0];
    const torch::Tensor host = all.cpu();
    for (size_t k = 0; k < stats.size(); ++k) {
      nn::OutputStats* s = stats[k].second;
      const int64_t* entry = host.const_data_ptr<int64_t>() + 1 + 3 * k;
      s->saturated = entry[0] > 0 ? torch::full({}, entry[1], torch::TensorOptions(torch::kLong).device(device))
                                  : torch::Tensor();
      s->elements = entry[2];
    }
  }
  return {loss_sum.item<double>() / static_cast<double>(val.size()),
          static_cast<double>(correct.item<int64_t>()) / static_cast<double>(val.size())};
}

LayerStatistics layer_statistics(Training& t, const TrainConfig& c, const EpochResult& epoch) {
  json layers = json::object();
  for (auto& [name, s] : t.model->output_stats()) {
    json entry = {{"output_saturated", nullptr}, {"output_saturated_fraction", nullptr}, {"param_saturated", nullptr}};
    if (s->saturated.defined()) {
      const int64_t saturated = s->saturated.item<int64_t>();
      entry["output_saturated"] = saturated;
      entry["output_saturated_fraction"] = static_cast<double>(saturated) / static_cast<double>(s->elements);
    }
    layers[name] = entry;
  }
  std::vector<std::string> parameter_layers;
  int64_t n_params = 0;
  std::vector<std::string> layer_names;
  for (const auto& [name, stats] : t.model->output_stats()) layer_names.push_back(name);
  for (const auto& item : t.model->named_parameters()) {
    parameter_layers.push_back(layer_of(item.key(), layer_names));
    n_params += item.value().numel();
  }
  auto add_param_saturated = [&](size_t k, int64_t n) {
    auto& sat = layers[parameter_layers[k]]["param_saturated"];
    sat = (sat.is_null() ? 0 : sat.get<int64_t>()) + n;
  };
  json vanished_fraction = nullptr;
  if (t.qpu) {
    const torch::Tensor counts = epoch.update_counts.cpu();
    int64_t vanished = 0;
    for (size_t k = 0; k < parameter_layers.size(); ++k) {
      add_param_saturated(k, counts[k][0].item<int64_t>());
      vanished += counts[k][1].item<int64_t>();
    }
    vanished_fraction = static_cast<double>(vanished) / (static_cast<double>(n_params) * static_cast<double>(epoch.batches));
  } else if (c.method == "ste") {
    // STE's master weights outside the representable range (saturated when read).
    torch::NoGradGuard no_grad;
    size_t k = 0;
    for (const auto& p : t.model->parameters()) {
      add_param_saturated(k++, std::get<1>(quantize_stats(p, c.param_bits, c.param_frac)).item<int64_t>());
    }
  }
  return {layers, vanished_fraction};
}

}  // namespace fxp::train
