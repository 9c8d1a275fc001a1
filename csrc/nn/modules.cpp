#include "nn/modules.h"

#include <torch/nn/functional.h>
#include <torch/torch.h>

#include "ops.h"
#include "quantize_args.h"

namespace fxp::nn {
namespace {

const char* op_rounding(const std::string& act_rounding) {
  TORCH_CHECK(act_rounding == "hte" || act_rounding == "sr",
              "fxp::nn: act_rounding must be hte or sr, but got '", act_rounding, "'");
  return act_rounding == "hte" ? "nearest_even" : "stochastic";
}

void check_config(const QuantConfig& c) {
  check_fxp_format("fxp::nn", c.param_total_bits, c.param_frac_bits);
  check_fxp_format("fxp::nn", c.act_total_bits, c.act_frac_bits);
  op_rounding(c.act_rounding);
}

torch::Tensor weight_on_read(const torch::Tensor& w, const QuantConfig& c) {
  if (c.weight_mode != WeightMode::Ste) return w;  // fp32, or qpu: already on the grid
  return quantize_ste(w, c.param_total_bits, c.param_frac_bits, op_rounding(c.act_rounding));
}

torch::Tensor output(const torch::Tensor& y, const QuantConfig& c, OutputStats& stats) {
  if (c.weight_mode == WeightMode::Fp32) return y;
  if (stats.enabled && !torch::GradMode::is_enabled()) {
    auto [out, saturated] = quantize_stats(y, c.act_total_bits, c.act_frac_bits, op_rounding(c.act_rounding));
    stats.saturated = stats.saturated.defined() ? stats.saturated + saturated : saturated;
    stats.elements += y.numel();
    return out;
  }
  return quantize_ste(y, c.act_total_bits, c.act_frac_bits, op_rounding(c.act_rounding));
}

int64_t init_key(int64_t seed) {
  return static_cast<int64_t>(static_cast<uint64_t>(seed) + kInitKeyDelta);
}

// Quantizes tensors in order; tensor k uses Philox offset k.
void quantize_in_place(const std::vector<torch::Tensor>& tensors, const QuantConfig& c,
                       const std::string& rounding, int64_t seed) {
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (auto t : tensors) {
    quantize_seeded_(t, c.param_total_bits, c.param_frac_bits, rounding, init_key(seed), offset++);
  }
}

}  // namespace

WeightMode weight_mode_for(const std::string& method) {
  if (method == "fp32") return WeightMode::Fp32;
  if (method == "ste") return WeightMode::Ste;
  if (method == "sqpu" || method == "hteqpu") return WeightMode::Qpu;
  TORCH_CHECK(false, "fxp::nn: method must be fp32, ste, sqpu or hteqpu, but got '", method, "'");
}

QLinearImpl::QLinearImpl(int64_t in_features, int64_t out_features, bool bias, QuantConfig config_)
    : config(std::move(config_)) {
  check_config(config);
  linear = register_module("linear", torch::nn::Linear(torch::nn::LinearOptions(in_features, out_features).bias(bias)));
}

torch::Tensor QLinearImpl::forward(const torch::Tensor& x) {
  const torch::Tensor bias = linear->bias.defined() ? weight_on_read(linear->bias, config) : torch::Tensor();
  return output(torch::nn::functional::linear(x, weight_on_read(linear->weight, config), bias), config, output_stats);
}

QConv2dImpl::QConv2dImpl(torch::nn::Conv2dOptions options, QuantConfig config_) : config(std::move(config_)) {
  check_config(config);
  conv = register_module("conv", torch::nn::Conv2d(options));
}

torch::Tensor QConv2dImpl::forward(const torch::Tensor& x) {
  const auto& o = conv->options;
  const torch::Tensor bias = conv->bias.defined() ? weight_on_read(conv->bias, config) : torch::Tensor();
  const auto padding = std::get<torch::ExpandingArray<2>>(o.padding());
  const auto y = torch::conv2d(x, weight_on_read(conv->weight, config), bias, o.stride(), padding,
                               o.dilation(), o.groups());
  return output(y, config, output_stats);
}

PaperCNNImpl::PaperCNNImpl(QuantConfig config) {
  conv1 = register_module("conv1", QConv2d(torch::nn::Conv2dOptions(1, 32, 5).bias(false), config));
  conv2 = register_module("conv2", QConv2d(torch::nn::Conv2dOptions(32, 64, 5).bias(false), config));
  fc1 = register_module("fc1", QLinear(1024, 128, true, config));
  fc2 = register_module("fc2", QLinear(128, 10, true, config));
}

torch::Tensor PaperCNNImpl::forward(torch::Tensor x) {
  x = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
  x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);
  x = torch::relu(fc1->forward(x.flatten(1)));
  return fc2->forward(x);
}

std::vector<LayerRow> PaperCNNImpl::describe() {
  torch::NoGradGuard no_grad;
  std::vector<LayerRow> rows;
  auto shape = [](const torch::Tensor& t) { return t.sizes().slice(1).vec(); };
  auto count_params = [](torch::nn::Module& m) {
    int64_t n = 0;
    for (const auto& p : m.parameters()) n += p.numel();
    return n;
  };
  auto record = [&](const std::string& name, const torch::Tensor& in, const torch::Tensor& out, bool rounds,
                    int64_t params) {
    rows.push_back({name, in[0].numel(), rounds ? out[0].numel() : 0, params, shape(in), shape(out)});
  };
  torch::Tensor x = torch::zeros({1, 1, 28, 28}, conv1->conv->weight.options());
  torch::Tensor y = conv1->forward(x);
  record("Conv2d", x, y, true, count_params(*conv1));
  x = torch::max_pool2d(torch::relu(y), 2);
  record("MaxPool2d", y, x, false, 0);
  y = conv2->forward(x);
  record("Conv2d", x, y, true, count_params(*conv2));
  x = torch::max_pool2d(torch::relu(y), 2).flatten(1);
  record("MaxPool2d", y, x, false, 0);
  y = fc1->forward(x);
  record("Linear", x, y, true, count_params(*fc1));
  x = torch::relu(y);
  y = fc2->forward(x);
  record("Linear", x, y, true, count_params(*fc2));
  record("Softmax", y, torch::softmax(y, 1), false, 0);
  return rows;
}

std::vector<std::pair<std::string, OutputStats*>> PaperCNNImpl::output_stats() {
  return {{"conv1", &conv1->output_stats}, {"conv2", &conv2->output_stats},
          {"fc1", &fc1->output_stats}, {"fc2", &fc2->output_stats}};
}

void PaperCNNImpl::quantize_parameters_(const std::string& rounding, int64_t seed) {
  quantize_in_place(parameters(), conv1->config, rounding, seed);
}

}  // namespace fxp::nn
