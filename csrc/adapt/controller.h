// AdaPT's controller (Kummer et al.; docs/adapt.md): per-layer fixed-point
// formats that change during training. It drives a network built with STE
// layers (a float32 master copy, read quantized with stochastic rounding at
// the layer's format; activations at the same format) and any SGD optimizer:
// call after_backward(loss) between backward() and the optimizer's step().
#pragma once

#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "adapt/performance.h"
#include "adapt/precision.h"
#include "nn/network.h"
#include "optim/qpu_sgd.h"

namespace fxp::adapt {

struct AdaptOptions {
  Format start{8, 4};                 // every layer's format before the first switch
  Bounds resolution{50, 150};         // r^l bounds (bins of the KL test)
  Bounds lookback{25, 100};           // lb^l bounds, in batches
  double lookback_momentum = 0.33;    // gamma
  int64_t buffer_bits = 4;            // buff
  Strategy strategy = Strategy::Min;  // the push-up strategy to start with
  LogForm log_form = LogForm::Log2;   // the reading of "log²" (Note [AdaPT's push-up])
  double l1 = 0;                      // L1 regularization, added to the gradient before Eq. 3.4
};

// One adapted layer: a quantized layer with parameters (conv, linear, batch
// norm); its parameters (weight and bias) share its format.
struct AdaptedLayer {
  std::string name;
  nn::QuantizedLayer* layer;
  std::vector<torch::Tensor> parameters;
  Format format;
  int64_t lookback, resolution;
  std::vector<torch::Tensor> accumulated;  // the normalized gradients since the last switch (Eq. 3.5)
  int64_t count = 0;                       // how many
  int64_t switches = 0;
  double gradient_diversity = 0;  // at the last switch (0: none yet)
  Format minimum{0, 0};           // PD's result at the last switch
  double density = 1;             // non-zero fraction at the format, measured at the start and at each switch
  LayerWork work;                 // the performance model's account of this layer
};

class Controller {
 public:
  // Takes the network's quantized layers in module order; a layer without
  // parameters (a residual add) follows the format of the layer before it.
  // Sets every layer to options.start.
  Controller(nn::NetworkImpl& network, AdaptOptions options);

  // Between backward() and the optimizer's step() on a batch of batch_size
  // samples: adds L1's gradient, normalizes each layer's gradient (Eq. 3.4),
  // accumulates it, counts the step's work, adapts the strategy from the
  // loss, and switches every layer whose lookback is due (lookback,
  // resolution, PD, PU; Note [AdaPT's schedule]).
  void after_backward(double loss, int64_t batch_size);

  // AdaPT without a master copy (Note [AdaPT with QPU]): `optimizer` holds one
  // parameter group per adapted layer, in the order of layers(), and at each
  // switch the controller moves the layer's group to its new format
  // (QpuSgd::change_format, which rounds the parameters and momentum onto it).
  // The optimizer must outlive the controller.
  void use_quantized_updates(optim::QpuSgd& optimizer);
  // Parameter groups for that optimizer: one per adapted layer, at its format.
  std::vector<torch::optim::OptimizerParamGroup> parameter_groups(const optim::QpuSgdOptions& defaults) const;

  // The performance model's figures so far (adapt/performance.h).
  std::vector<LayerWork> work() const;

  const std::vector<AdaptedLayer>& layers() const { return layers_; }
  Strategy strategy() const { return strategy_; }
  const AdaptOptions& options() const { return options_; }
  // The fraction of zeros in a layer's parameters at its format (rounded half
  // to even: a measurement that draws no random numbers).
  double sparsity(const AdaptedLayer& layer) const { return 1 - layer.density; }
  // The fraction of non-zeros in a layer's parameters at a format (rounded half
  // to even: a measurement that draws no random numbers).
  static double density_at(const AdaptedLayer& layer, Format format);

  // Everything the controller carries between steps, for checkpoints.
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  void switch_layer(size_t index);
  void apply_formats();

  AdaptOptions options_;
  std::vector<AdaptedLayer> layers_;
  std::vector<std::pair<nn::QuantizedLayer*, size_t>> followers_;  // layer without parameters -> the layer it follows
  Strategy strategy_;
  std::deque<double> losses_;  // the last lookback.upper losses
  optim::QpuSgd* quantized_updates_ = nullptr;
};

}  // namespace fxp::adapt
