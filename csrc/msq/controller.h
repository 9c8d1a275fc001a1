// MSQ's controller on an fxp::nn network (Han et al.; docs/msq.md): the
// network's conv and linear layers read their weights through RoundClamp
// (Note [MSQ layers]) at the per-layer bit widths of a WidthController
// (msq/width_controller.h), which pruning checks lower. Add penalty() to the
// task loss of each step; call check() at each pruning check (fxp-train:
// every --msq-check-every epochs), then freeze() for the final fine-tuning at
// fixed widths.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "msq/width_controller.h"
#include "nn/network.h"

namespace fxp::msq {

class Controller {
 public:
  // Binds the network's conv and linear layers in module order and sets them
  // to WeightMode::Msq at options.start_bits; batch norm and adds stay float.
  Controller(nn::NetworkImpl& network, MsqOptions options);

  // lambda x sum |LSB| over the layers, from their last forward (with
  // autograd); 0 once frozen.
  torch::Tensor penalty() const;

  // A pruning check (WidthController::check), with the layers switched to
  // their float path while `float_path_loss` computes the Hessian's loss.
  // Returns each layer's bits dropped.
  std::vector<int64_t> check(const std::function<torch::Tensor()>& float_path_loss, uint64_t hessian_seed);

  void freeze() { widths_.freeze(); }
  bool frozen() const { return widths_.frozen(); }

  const std::vector<MsqLayer>& layers() const { return widths_.layers(); }
  // The network layer that reads layers()[i] through RoundClamp.
  nn::QuantizedLayer& network_layer(size_t i) const { return *network_layers_.at(i); }
  const MsqOptions& options() const { return widths_.options(); }
  double compression_rate() const { return widths_.compression_rate(); }
  std::vector<double> sparsities() const { return widths_.sparsities(); }
  std::vector<MsqLayerRecord> records() const { return widths_.records(); }
  bool weights_finite() const { return widths_.weights_finite(); }

  std::vector<std::pair<std::string, torch::Tensor>> state() const { return widths_.state(); }
  void load_state(const std::function<torch::Tensor(const std::string& name)>& read);

 private:
  void apply_widths() const;

  std::vector<nn::QuantizedLayer*> network_layers_;  // before widths_: the constructor fills it first
  WidthController widths_;
};

}  // namespace fxp::msq
