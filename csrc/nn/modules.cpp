#include "nn/modules.h"

#include <torch/nn/functional.h>
#include <torch/torch.h>

#include "ops/ops.h"
#include "ops/format_args.h"

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

std::optional<torch::Tensor> optional(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

at::OptionalIntArrayRef format_ref(const std::optional<std::vector<int64_t>>& format) {
  return format ? at::OptionalIntArrayRef(*format) : std::nullopt;
}

// Packed layers quantize their output inside the layer op (no float copy),
// except while validation statistics are collected (quantize_stats).
std::optional<std::vector<int64_t>> fused_output_format(const QuantConfig& c, const OutputStats& stats) {
  if (c.weight_mode == WeightMode::Fp32 || (stats.enabled && !torch::GradMode::is_enabled())) return std::nullopt;
  return std::vector<int64_t>{c.act_total_bits, c.act_frac_bits};
}

// The weight arguments of fxp::linear / fxp::conv2d: the codes when the layer's
// weights are packed, else the weights as the layer reads them.
struct LayerWeights {
  torch::Tensor weight;
  std::optional<torch::Tensor> bias, weight_codes, bias_codes;
  std::optional<std::vector<int64_t>> param_format;
};

LayerWeights layer_weights(const torch::Tensor& weight, const torch::Tensor& bias, const QuantConfig& c,
                           const PackedState& packed, const torch::Tensor& weight_codes,
                           const torch::Tensor& bias_codes) {
  if (packed.weights) {
    return {weight, optional(bias), weight_codes, optional(bias_codes),
            std::vector<int64_t>{c.param_total_bits, c.param_frac_bits}};
  }
  // The bias first, as the unpacked path reads them: with SR, STE's reads draw
  // from the generator, and the order of the draws decides the bits.
  std::optional<torch::Tensor> b;
  if (bias.defined()) b = weight_on_read(bias, c);
  return {weight_on_read(weight, c), b, std::nullopt, std::nullopt, std::nullopt};
}

// Note [Packed layers]: moves a parameter's value into codes (round half to
// even: exact, the value is on the grid) registered as buffer `name`, and
// leaves the parameter a one-element stand-in of the same shape.
torch::Tensor pack_parameter(torch::nn::Module& layer, torch::Tensor& parameter, const std::string& name,
                             const QuantConfig& c) {
  torch::NoGradGuard no_grad;
  torch::Tensor codes = layer.register_buffer(name, pack(parameter, c.param_total_bits, c.param_frac_bits));
  parameter.set_data(torch::zeros({}, parameter.options()).expand(parameter.sizes()));
  return codes;
}

void pack_layer_weights(torch::nn::Module& layer, torch::Tensor& weight, torch::Tensor& bias, const QuantConfig& c,
                        PackedState& packed, torch::Tensor& weight_codes, torch::Tensor& bias_codes) {
  TORCH_CHECK(c.weight_mode == WeightMode::Qpu, "fxp::nn: only QPU layers (sqpu, hteqpu) can pack their weights; ",
              "STE keeps a float master copy");
  if (packed.weights) return;
  weight_codes = pack_parameter(layer, weight, "weight_codes", c);
  if (bias.defined()) bias_codes = pack_parameter(layer, bias, "bias_codes", c);
  packed.weights = true;
}

std::vector<PackedStorage> layer_packed_storage(const PackedState& packed, const QuantConfig& c,
                                                     const torch::Tensor& weight, const torch::Tensor& bias,
                                                     const torch::Tensor& weight_codes,
                                                     const torch::Tensor& bias_codes) {
  if (!packed.weights) return {};
  std::vector<PackedStorage> out{{weight, weight_codes, c.param_total_bits, c.param_frac_bits}};
  if (bias.defined()) out.push_back({bias, bias_codes, c.param_total_bits, c.param_frac_bits});
  return out;
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
  if (!packed.weights && !packed.saved_input_format) {
    const torch::Tensor bias = linear->bias.defined() ? weight_on_read(linear->bias, config) : torch::Tensor();
    return output(torch::nn::functional::linear(x, weight_on_read(linear->weight, config), bias), config,
                  output_stats);
  }
  const LayerWeights w = layer_weights(linear->weight, linear->bias, config, packed, weight_codes, bias_codes);
  const auto out_format = fused_output_format(config, output_stats);
  const torch::Tensor y = fxp::linear(x, w.weight, w.bias, format_ref(packed.saved_input_format), w.weight_codes,
                                      w.bias_codes, format_ref(w.param_format), format_ref(out_format),
                                      op_rounding(config.act_rounding));
  return out_format ? y : output(y, config, output_stats);
}

void QLinearImpl::pack_weights_() {
  pack_layer_weights(*this, linear->weight, linear->bias, config, packed, weight_codes, bias_codes);
}

std::vector<PackedStorage> QLinearImpl::packed_storage() const {
  return layer_packed_storage(packed, config, linear->weight, linear->bias, weight_codes, bias_codes);
}

QConv2dImpl::QConv2dImpl(torch::nn::Conv2dOptions options, QuantConfig config_) : config(std::move(config_)) {
  check_config(config);
  conv = register_module("conv", torch::nn::Conv2d(options));
}

torch::Tensor QConv2dImpl::forward(const torch::Tensor& x) {
  const auto& o = conv->options;
  const auto padding = std::get<torch::ExpandingArray<2>>(o.padding());
  if (!packed.weights && !packed.saved_input_format) {
    const torch::Tensor bias = conv->bias.defined() ? weight_on_read(conv->bias, config) : torch::Tensor();
    return output(torch::conv2d(x, weight_on_read(conv->weight, config), bias, o.stride(), padding, o.dilation(),
                                o.groups()),
                  config, output_stats);
  }
  const LayerWeights w = layer_weights(conv->weight, conv->bias, config, packed, weight_codes, bias_codes);
  const auto out_format = fused_output_format(config, output_stats);
  const torch::Tensor y = fxp::conv2d(x, w.weight, w.bias, o.stride(), padding, o.dilation(), o.groups(),
                                      format_ref(packed.saved_input_format), w.weight_codes, w.bias_codes,
                                      format_ref(w.param_format), format_ref(out_format),
                                      op_rounding(config.act_rounding));
  return out_format ? y : output(y, config, output_stats);
}

void QConv2dImpl::pack_weights_() {
  pack_layer_weights(*this, conv->weight, conv->bias, config, packed, weight_codes, bias_codes);
}

std::vector<PackedStorage> QConv2dImpl::packed_storage() const {
  return layer_packed_storage(packed, config, conv->weight, conv->bias, weight_codes, bias_codes);
}

PaperCNNImpl::PaperCNNImpl(QuantConfig config) {
  conv1 = register_module("conv1", QConv2d(torch::nn::Conv2dOptions(1, 32, 5).bias(false), config));
  conv2 = register_module("conv2", QConv2d(torch::nn::Conv2dOptions(32, 64, 5).bias(false), config));
  fc1 = register_module("fc1", QLinear(1024, 128, true, config));
  fc2 = register_module("fc2", QLinear(128, 10, true, config));
}

torch::Tensor PaperCNNImpl::relu_pool(const torch::Tensor& y) const {
  // Same values and gradients; the fused op saves one byte per output.
  return fused_relu_pool ? fxp::relu_max_pool2d(y, {2, 2}) : torch::max_pool2d(torch::relu(y), 2);
}

torch::Tensor PaperCNNImpl::forward(torch::Tensor x) {
  x = relu_pool(conv1->forward(x));
  x = relu_pool(conv2->forward(x));
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

void PaperCNNImpl::pack_(bool weights, bool saved_inputs) {
  if (weights) {
    conv1->pack_weights_();
    conv2->pack_weights_();
    fc1->pack_weights_();
    fc2->pack_weights_();
  }
  if (saved_inputs) {
    // Each input is the previous layer's quantized output after ReLU (and max-pool): on its act grid.
    TORCH_CHECK(conv1->config.weight_mode != WeightMode::Fp32, "fxp::nn: fp32 layers have no grid to save inputs on");
    conv2->packed.saved_input_format = std::vector<int64_t>{conv1->config.act_total_bits, conv1->config.act_frac_bits};
    fc1->packed.saved_input_format = std::vector<int64_t>{conv2->config.act_total_bits, conv2->config.act_frac_bits};
    fc2->packed.saved_input_format = std::vector<int64_t>{fc1->config.act_total_bits, fc1->config.act_frac_bits};
    fused_relu_pool = true;
  }
}

std::vector<PackedStorage> PaperCNNImpl::packed_storage() const {
  std::vector<PackedStorage> out;
  for (auto layer : {conv1->packed_storage(), conv2->packed_storage(), fc1->packed_storage(),
                     fc2->packed_storage()}) {
    out.insert(out.end(), layer.begin(), layer.end());
  }
  return out;
}

void PaperCNNImpl::quantize_parameters_(const std::string& rounding, int64_t seed) {
  TORCH_CHECK(!conv1->packed.weights, "fxp::nn: quantize_parameters_ must come before pack_ (packed weights are codes)");
  // One call for the whole model (Note [QPU initialization]): tensor k of the model gets offset k.
  std::vector<torch::Tensor> tensors;
  std::vector<int64_t> total_bits, frac_bits;
  auto add = [&](const std::vector<torch::Tensor>& layer_params, const QuantConfig& c) {
    for (const auto& p : layer_params) {
      tensors.push_back(p);
      total_bits.push_back(c.param_total_bits);
      frac_bits.push_back(c.param_frac_bits);
    }
  };
  add(conv1->parameters(), conv1->config);
  add(conv2->parameters(), conv2->config);
  add(fc1->parameters(), fc1->config);
  add(fc2->parameters(), fc2->config);
  torch::NoGradGuard no_grad;
  fxp::quantize_parameters_(tensors, total_bits, frac_bits, rounding, seed);
}

}  // namespace fxp::nn
