// AdaPT's controller over plain parameter lists (Kummer et al.; docs/adapt.md):
// per-layer fixed-point formats that change during training, for any model.
// It knows nothing of modules: each layer is a name and its parameters; the
// caller reads formats() after each step and gives them to its layers (the
// C++ network binding is adapt::Controller, the Python one fxp.adapt).
// Call after_backward(loss, batch_size) between backward() and the optimizer's
// step(), or sgd_step in place of both (an SGD step fused with AdaPT's work),
// or fused_step with any update that takes the norms (the QPU step's).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "adapt/performance.h"
#include "adapt/precision.h"

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

// A layer to adapt: its parameters (weight and bias) share its format.
struct LayerSpec {
  std::string name;
  std::vector<at::Tensor> parameters;
};

// One adapted layer's state.
struct AdaptedLayer {
  std::string name;
  std::vector<at::Tensor> parameters;
  Format format;
  int64_t lookback, resolution;
  std::vector<at::Tensor> accumulated;  // the normalized gradients since the last switch (Eq. 3.5)
  int64_t count = 0;                    // how many
  int64_t switches = 0;
  double gradient_diversity = 0;  // at the last switch (0: none yet)
  Format minimum{0, 0};           // PD's result at the last switch
  double density = 1;  // non-zero fraction at the format: at construction, the first step (Note [Density at the first step]) and each switch
  LayerWork work;                 // the performance model's account of this layer
};

class PrecisionController {
 public:
  PrecisionController(std::vector<LayerSpec> layers, AdaptOptions options);

  // Between backward() and the optimizer's step() on a batch of batch_size
  // samples: adds L1's gradient, normalizes each layer's gradient (Eq. 3.4),
  // accumulates it, counts the step's work, adapts the strategy from the
  // loss, and switches every layer whose lookback is due (lookback,
  // resolution, PD, PU; Note [AdaPT's schedule]). Returns whether any layer
  // switched (formats() changed).
  bool after_backward(double loss, int64_t batch_size);

  // SGD's settings for sgd_step (torch::optim::SGD's, dampening 0).
  struct SgdSettings {
    double lr, momentum = 0, weight_decay = 0;
    bool nesterov = false;
  };
  // In place of after_backward and an SGD step over the layers' parameters:
  // the same normalization and accumulation, fused into the update (Note
  // [AdaPT's fused step]), then the bookkeeping and the switches. .grad keeps
  // the raw gradients. momentum_buffer(p) gives parameter p's momentum buffer
  // (zeros the first time), when sgd.momentum > 0. Returns whether any layer
  // switched. A non-finite loss changes nothing, as in after_backward: no update either.
  bool sgd_step(double loss, int64_t batch_size, const SgdSettings& sgd,
                const std::function<at::Tensor(const at::Tensor& param)>& momentum_buffer);

  // The parameters with gradients this step (gradients made contiguous), with
  // their gradients, accumulators, layer indices and the layers' norms
  // (layer_gradient_norms; undefined when there are no parameters). A strided
  // parameter (channels_last) is in params as a contiguous copy, listed in
  // strided with the parameter: an update of params must copy it back.
  struct StepGradients {
    std::vector<at::Tensor> params, grads, accumulated;
    std::vector<int64_t> layers;
    at::Tensor norms;
    std::vector<std::pair<at::Tensor, at::Tensor>> strided;  // (parameter, its copy in params)
  };
  // In place of after_backward and an optimizer's step, for an update that
  // normalizes and accumulates as it applies (Note [AdaPT's fused step]):
  // computes the norms, calls update (also when no parameter has a gradient,
  // so an optimizer can record an empty step), then the bookkeeping and the
  // switches. A non-finite loss changes nothing and calls nothing.
  bool fused_step(double loss, int64_t batch_size, const std::function<void(const StepGradients&)>& update);

  // fused_step in two calls, for a caller whose update cannot be a callback
  // (fxp.adapt, in Python): step_gradients() (after checking the loss is
  // finite: a non-finite loss calls neither), the update, then
  // finish_step(loss, batch_size, that StepGradients' layers), which counts
  // the step and switches the layers that are due (returns whether any did).
  StepGradients step_gradients();
  bool finish_step(double loss, int64_t batch_size, const std::vector<int64_t>& stepped_layers);
  // Measures layer i's density at its format again: after a caller outside
  // on_format_change rounded its parameters onto a changed format.
  void measure_density(size_t layer);

  // The forward multiply-adds per sample of layer i (outputs x fan-in), for the
  // performance model; the steps after this call count with it.
  void set_madds(size_t layer, int64_t madds_per_sample);

  // Called at a switch that changes layer i's format, after the format is set
  // and before the layer's density is measured at it (AdaPT without a master
  // copy rounds the parameters onto the new grid here).
  void on_format_change(std::function<void(size_t layer, Format format)> callback) {
    on_format_change_ = std::move(callback);
  }

  const std::vector<AdaptedLayer>& layers() const { return layers_; }
  std::vector<Format> formats() const;
  Strategy strategy() const { return strategy_; }
  const AdaptOptions& options() const { return options_; }
  // The fraction of zeros in a layer's parameters at its format (rounded half
  // to even: a measurement that draws no random numbers).
  double sparsity(const AdaptedLayer& layer) const { return 1 - layer.density; }
  // The fraction of non-zeros in a layer's parameters at a format (rounded half to even).
  static double density_at(const AdaptedLayer& layer, Format format);

  // The performance model's figures so far (adapt/performance.h).
  std::vector<LayerWork> work() const;

  // Everything the controller carries between steps, as named tensors (for
  // checkpoints and state dicts); load_state reads the same names back
  // (`read` returns an undefined tensor for a name it lacks).
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::function<at::Tensor(const std::string& name)>& read);

 private:
  StepGradients step_tensors();  // without the norms
  void switch_layer(size_t index);

  AdaptOptions options_;
  std::vector<AdaptedLayer> layers_;
  Strategy strategy_;
  std::deque<double> losses_;  // the last lookback.upper losses
  std::function<void(size_t, Format)> on_format_change_;
};

}  // namespace fxp::adapt
