// AdaPT's controller on an fxp::nn network (Kummer et al.; docs/adapt.md): the
// network-agnostic PrecisionController, bound to the network's quantized
// layers, whose formats it sets after every switch. The layers are STE layers
// (a float32 master copy, read quantized with stochastic rounding at the
// layer's format; activations at the same format), or QPU layers with a
// QpuSgd optimizer (use_quantized_updates; no master copy). Call step(loss)
// after backward(), in place of the optimizer's step().
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "adapt/precision_controller.h"
#include "nn/network.h"
#include "optim/qpu_sgd.h"

namespace fxp::adapt {

class Controller {
 public:
  // Takes the network's quantized layers in module order; a layer without
  // parameters (a residual add) follows the format of the layer before it.
  // Sets every layer to options.start.
  Controller(nn::NetworkImpl& network, AdaptOptions options);

  // PrecisionController::after_backward, with each layer's multiply-adds
  // taken from the network's last forward; then the layers get their formats.
  void after_backward(double loss, int64_t batch_size);

  // One training step after backward(): after_backward, then the optimizer's
  // step; or, for the optimizer given to use_fused_sgd or
  // use_quantized_updates, the two fused (PrecisionController::fused_step). A non-finite loss (a diverged step)
  // changes nothing: no update, no accumulation, no count.
  void step(double loss, int64_t batch_size, torch::optim::Optimizer& optimizer);

  // Plain AdaPT's update fused with its gradient work (Note [AdaPT's fused
  // step]): step() with this optimizer normalizes, accumulates and updates in
  // one pass. It must hold exactly the adapted layers' parameters, in one
  // group, without dampening; its momentum buffers stay in its state (its
  // checkpoints are SGD's). The optimizer must outlive the controller.
  void use_fused_sgd(torch::optim::SGD& optimizer);

  // AdaPT without a master copy (Note [AdaPT with QPU]): `optimizer` holds one
  // parameter group per adapted layer, in the order of layers(), and at each
  // switch the controller moves the layer's group to its new format
  // (QpuSgd::change_format, which rounds the parameters and momentum onto it).
  // step() with this optimizer normalizes and accumulates inside its QPU step
  // (Note [AdaPT's fused QPU step]). The optimizer must outlive the controller.
  void use_quantized_updates(optim::QpuSgd& optimizer);
  // Parameter groups for that optimizer: one per adapted layer, at its format,
  // its momentum following it (the defaults' momentum format is not used),
  // its seed unset, so that the optimizer gives group i its seed + i.
  std::vector<torch::optim::OptimizerParamGroup> parameter_groups(const optim::QpuSgdOptions& defaults) const;

  const std::vector<AdaptedLayer>& layers() const { return core_.layers(); }
  // The network layer that layers()[i] adapts.
  nn::QuantizedLayer& quantized_layer(size_t i) const { return *bound_.at(i); }
  Strategy strategy() const { return core_.strategy(); }
  const AdaptOptions& options() const { return core_.options(); }
  double sparsity(const AdaptedLayer& layer) const { return core_.sparsity(layer); }
  static double density_at(const AdaptedLayer& layer, Format format) {
    return PrecisionController::density_at(layer, format);
  }
  std::vector<LayerWork> work() const { return core_.work(); }

  // Everything the controller carries between steps, for checkpoints.
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  void apply_formats();
  void set_madds();

  // Declared before core_: the constructor fills them while it builds core_.
  std::vector<nn::QuantizedLayer*> bound_;                          // layers()[i] -> its network layer
  std::vector<std::pair<nn::QuantizedLayer*, size_t>> followers_;  // layer without parameters -> the layer it follows
  PrecisionController core_;
  torch::optim::SGD* fused_sgd_ = nullptr;
  optim::QpuSgd* quantized_updates_ = nullptr;
};

}  // namespace fxp::adapt
