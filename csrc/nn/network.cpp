#include "nn/network.h"

#include <torch/torch.h>

#include "ops/ops.h"

namespace fxp::nn {

void LayerTrace::add(const std::string& layer, const torch::Tensor& in, const torch::Tensor& out, bool rounds,
                     int64_t parameters) {
  auto shape = [](const torch::Tensor& t) { return t.sizes().slice(1).vec(); };
  rows.push_back({layer, in[0].numel(), rounds ? out[0].numel() : 0, parameters, shape(in), shape(out)});
}

int64_t parameter_count(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

NetworkImpl::NetworkImpl(std::string name, std::vector<int64_t> input_shape)
    : name_(std::move(name)), input_shape_(std::move(input_shape)) {}

std::vector<LayerRow> NetworkImpl::describe() {
  torch::NoGradGuard no_grad;
  const bool was_training = is_training();
  eval();  // batch norm must not learn running statistics from the probe
  std::vector<int64_t> shape{1};
  shape.insert(shape.end(), input_shape_.begin(), input_shape_.end());
  const torch::Tensor x = torch::zeros(shape, parameters().front().options());
  LayerTrace trace;
  const torch::Tensor logits = run(x, &trace);
  trace.add("Softmax", logits, torch::softmax(logits, 1), false, 0);
  train(was_training);
  return trace.rows;
}

std::vector<std::pair<std::string, QuantizedLayer*>> NetworkImpl::quantized_layers() const {
  std::vector<std::pair<std::string, QuantizedLayer*>> out;
  for (const auto& item : named_modules("", /*include_self=*/false)) {
    if (auto* layer = dynamic_cast<QuantizedLayer*>(item.value().get())) out.emplace_back(item.key(), layer);
  }
  return out;
}

void NetworkImpl::quantize_parameters_(const std::string& rounding, int64_t seed) {
  // One call for the whole model (Note [QPU initialization]): tensor k of the model gets offset k.
  std::vector<torch::Tensor> tensors;
  std::vector<int64_t> total_bits, frac_bits;
  for (const auto& [name, layer] : quantized_layers()) {
    TORCH_CHECK(!layer->packed.weights, "fxp::nn: quantize_parameters_ must come before pack_ (packed weights are codes)");
    for (const auto& p : dynamic_cast<torch::nn::Module&>(*layer).parameters()) {
      tensors.push_back(p);
      total_bits.push_back(layer->config.param_total_bits);
      frac_bits.push_back(layer->config.param_frac_bits);
    }
  }
  torch::NoGradGuard no_grad;
  fxp::quantize_parameters_(tensors, total_bits, frac_bits, rounding, seed);
}

void NetworkImpl::pack_(bool /*weights*/, bool /*saved_inputs*/) {
  TORCH_CHECK(false, "fxp::nn: packed storage is not supported for the ", name_,
              " network yet (only paper_cnn); train it without --packed");
}

std::vector<PackedStorage> NetworkImpl::packed_storage() const {
  std::vector<PackedStorage> out;
  for (const auto& [name, layer] : quantized_layers()) {
    for (auto& p : layer->packed_storage()) out.push_back(std::move(p));
  }
  return out;
}

std::vector<std::pair<std::string, OutputStats*>> NetworkImpl::output_stats() {
  std::vector<std::pair<std::string, OutputStats*>> out;
  for (const auto& [name, layer] : quantized_layers()) out.emplace_back(name, &layer->output_stats);
  return out;
}

}  // namespace fxp::nn
