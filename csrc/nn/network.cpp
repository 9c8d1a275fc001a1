#include "nn/network.h"

#include <c10/util/ScopeExit.h>
#include <torch/torch.h>

#include <mutex>
#include <optional>

#include "ops/ops.h"

namespace fxp::nn {

void LayerTrace::add(const std::string& layer, const torch::Tensor& in, const torch::Tensor& out, bool rounds,
                     int64_t parameters) {
  auto shape = [](const torch::Tensor& t) { return t.sizes().slice(1).vec(); };
  rows.push_back({layer, in[0].numel(), rounds ? out[0].numel() : 0, parameters, shape(in), shape(out)});
}

torch::Tensor relu_max_pool2x2(const torch::Tensor& y) { return fxp::relu_max_pool2d(y, {2, 2}); }

int64_t parameter_count(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

std::vector<at::Generator> default_generators(const torch::Device& device) {
  std::vector<at::Generator> generators{at::globalContext().defaultGenerator(torch::kCPU)};
  if (device.is_cuda()) generators.push_back(at::globalContext().defaultGenerator(device));
  return generators;
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
    if (layer->config.weight_mode == WeightMode::Fp32) continue;  // float values stay, as in fxp.nn
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
              " network yet (only paper_cnn and lenet5); train it without --packed");
}

std::vector<torch::nn::BatchNorm2dImpl*> NetworkImpl::batch_norms() const {
  std::vector<torch::nn::BatchNorm2dImpl*> out;
  for (const auto& m : modules(/*include_self=*/false)) {
    if (auto* bn = dynamic_cast<torch::nn::BatchNorm2dImpl*>(m.get())) out.push_back(bn);
  }
  return out;
}

std::vector<torch::Tensor> NetworkImpl::batch_norm_statistics() const {
  std::vector<torch::Tensor> out;
  for (const auto* bn : batch_norms()) out.insert(out.end(), {bn->running_mean, bn->running_var, bn->num_batches_tracked});
  return out;
}

// Note [Batch norm recalibration]
// Batch norm normalizes with the batch's statistics in training and with
// running averages of them in evaluation. The averages trail the parameters
// (momentum 0.1 averages over about the last ten batches): when the
// parameters move fast, as at a high learning rate early in training, or
// under AdaPT, whose per-layer normalized gradients (Eq. 3.4) give every
// layer a step of norm lr whatever its gradient, they describe weights of
// several steps ago, and evaluation no longer measures the network that
// training has. On ResNet-20 with quantized layers the difference is large
// (docs/adapt.md: STE at FxP(16, 8) validates at 36% with the averages and
// 78% recalibrated, after the same training). Recalibration recomputes the
// averages at the current parameters ("precise BN"). Its forward passes draw
// their stochastic rounding from the default generators, whose states are
// restored after them, so every training step is bit for bit the same with
// or without recalibration; only evaluation changes, and what reads it (the
// plateau schedule and early stopping follow the validation loss).
void NetworkImpl::recalibrate_batch_norm(int64_t batches, const std::function<torch::Tensor(int64_t)>& batch) {
  TORCH_CHECK(batches >= 1, "fxp::nn: batch norm recalibration needs at least one batch, but got ", batches);
  const std::vector<torch::nn::BatchNorm2dImpl*> norms = batch_norms();
  if (norms.empty()) return;
  // The generators the forward may draw from: the CPU one, and the CUDA one of the statistics' device.
  std::vector<std::pair<at::Generator, at::Tensor>> generators;
  for (at::Generator& g : default_generators(norms.front()->running_mean.device())) {
    std::lock_guard<std::mutex> lock(g.mutex());
    generators.emplace_back(g, g.get_state());
  }
  struct Saved {
    std::optional<double> momentum;
    torch::Tensor mean, var, count;
  };
  std::vector<Saved> saved;
  for (auto* bn : norms) {
    saved.push_back({bn->options.momentum(), bn->running_mean.clone(), bn->running_var.clone(),
                     bn->num_batches_tracked.clone()});
  }
  const bool was_training = is_training();
  bool done = false;
  // Restored however the passes end; a pass that throws leaves the old statistics too.
  const auto restore = c10::make_scope_exit([&] {
    train(was_training);
    for (auto& [g, state] : generators) {
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(state);
    }
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < norms.size(); ++i) {
      norms[i]->options.momentum(saved[i].momentum);
      if (!done) {
        norms[i]->running_mean.copy_(saved[i].mean);
        norms[i]->running_var.copy_(saved[i].var);
        norms[i]->num_batches_tracked.copy_(saved[i].count);
      }
    }
  });
  for (auto* bn : norms) {
    bn->options.momentum(std::nullopt);  // a cumulative average over the batches
    bn->reset_running_stats();
  }
  train();
  torch::NoGradGuard no_grad;
  for (int64_t b = 0; b < batches; ++b) forward(batch(b));
  done = true;
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
