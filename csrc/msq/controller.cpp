#include "msq/controller.h"

#include <torch/torch.h>

namespace fxp::msq {
namespace {

// The conv and linear layers with their weights, in module order (nothing is
// changed until the WidthController has accepted them).
std::vector<std::pair<std::string, torch::Tensor>> bind_layers(nn::NetworkImpl& network,
                                                               std::vector<nn::QuantizedLayer*>& bound) {
  std::vector<std::pair<std::string, torch::Tensor>> weights;
  for (const auto& [name, layer] : network.quantized_layers()) {
    // A packed layer reads its codes, never RoundClamp: MSQ would do nothing, silently.
    TORCH_CHECK(!layer->packed.weights, "fxp::msq: layer ", name, " has packed weights, which MSQ cannot read "
                "through RoundClamp: build the controller over an unpacked network");
    torch::Tensor weight;
    if (auto* conv = dynamic_cast<nn::QConv2dImpl*>(layer)) weight = conv->conv->weight;
    if (auto* linear = dynamic_cast<nn::QLinearImpl*>(layer)) weight = linear->linear->weight;
    if (!weight.defined()) continue;
    bound.push_back(layer);
    weights.emplace_back(name, weight);
  }
  TORCH_CHECK(!weights.empty(), "fxp::msq: the network has no conv or linear layer to quantize");
  return weights;
}

}  // namespace

// network_layers_ is declared before widths_, so bind_layers fills it first.
Controller::Controller(nn::NetworkImpl& network, MsqOptions options)
    : widths_(bind_layers(network, network_layers_), std::move(options)) {
  // Every quantized layer reads MSQ's way: conv and linear through RoundClamp; batch norm and adds float.
  for (const auto& [name, layer] : network.quantized_layers()) layer->config.weight_mode = nn::WeightMode::Msq;
  apply_widths();
}

void Controller::apply_widths() const {
  for (size_t i = 0; i < network_layers_.size(); ++i) {
    network_layers_[i]->config.msq_bits = layers()[i].bits;
    network_layers_[i]->config.msq_scale = layers()[i].scale;
  }
}

torch::Tensor Controller::penalty() const {
  std::vector<torch::Tensor> lsb_l1;
  for (const auto* layer : network_layers_) lsb_l1.push_back(layer->msq.lsb_l1);
  return widths_.penalty(lsb_l1);
}

std::vector<int64_t> Controller::check(const std::function<torch::Tensor()>& float_path_loss, uint64_t hessian_seed) {
  TORCH_CHECK(!frozen(), "fxp::msq: the widths are frozen for fine-tuning; no more pruning checks");
  torch::Tensor loss;
  if (options().hessian) {
    struct FloatPath {  // on for the callback's forward only, also when it throws
      const std::vector<nn::QuantizedLayer*>& layers;
      explicit FloatPath(const std::vector<nn::QuantizedLayer*>& l) : layers(l) {
        for (auto* layer : layers) layer->msq.float_path = true;
      }
      ~FloatPath() {
        for (auto* layer : layers) layer->msq.float_path = false;
      }
    } float_path(network_layers_);
    loss = float_path_loss();
  }
  auto dropped = widths_.check(loss, hessian_seed);
  apply_widths();
  return dropped;
}

void Controller::load_state(const std::function<torch::Tensor(const std::string& name)>& read) {
  widths_.load_state(read);
  apply_widths();
}

}  // namespace fxp::msq
