// What every fxp network shares: its quantized layers found by walking its
// modules, the QPU initialization over all of them, packed storage, validation
// statistics, and the per-layer table (--describe-model), derived by running
// the network's own forward on one input.
#pragma once

#include <torch/nn/module.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "nn/modules.h"

namespace fxp::nn {

// One row of a network's per-layer table (the QPU paper's Table 1), measured
// on the model: values per sample.
struct LayerRow {
  std::string layer;    // Conv2d, MaxPool2d, Linear, BatchNorm2d, Add, Softmax, ...
  int64_t inputs;       // elements entering the layer (saved for the backward pass)
  int64_t rounded;      // elements the layer's output quantization rounds (0: none)
  int64_t parameters;   // learnable elements
  std::vector<int64_t> in_shape, out_shape;  // [C, H, W] or [F]
};

// Collects the rows while a network runs its forward for describe(); a null
// trace (every ordinary forward) records nothing.
class LayerTrace {
 public:
  void add(const std::string& layer, const torch::Tensor& in, const torch::Tensor& out, bool rounds,
           int64_t parameters);
  std::vector<LayerRow> rows;
};
inline void trace_layer(LayerTrace* trace, const std::string& layer, const torch::Tensor& in,
                        const torch::Tensor& out, bool rounds, int64_t parameters) {
  if (trace) trace->add(layer, in, out, rounds, parameters);
}
int64_t parameter_count(const torch::nn::Module& module);

// max_pool2d(relu(y), 2) as fxp::relu_max_pool2d, with ATen's values and
// gradients (Note [Fused ReLU and max-pool]): its autograd keeps one byte per
// output instead of 12 per input, and on the CPU it runs several times as
// fast as ATen's pair from batch 16 up (Note [Four 2x2 windows at once],
// scripts/bench_pool.py). Every network that pools after a ReLU, and every
// fleet, pools with it.
torch::Tensor relu_max_pool2x2(const torch::Tensor& y);

// The default generators whose states a run's random draws depend on: the CPU
// one (initialization; stochastic rounding on CPU) and, when `device` is a
// CUDA device, that device's (stochastic rounding on CUDA), in this order.
// Checkpoints save their states; batch norm recalibration restores them.
std::vector<at::Generator> default_generators(const torch::Device& device);

class NetworkImpl : public torch::nn::Module {
 public:
  NetworkImpl(std::string name, std::vector<int64_t> input_shape);
  torch::Tensor forward(torch::Tensor x) { return run(std::move(x), nullptr); }  // logits
  // The network's name (paper_cnn, lenet5, ...) and the [C, H, W] input it takes.
  const std::string& name() const { return name_; }
  const std::vector<int64_t>& input_shape() const { return input_shape_; }
  // The per-layer table, from running forward on one zero input in eval mode
  // (the training mode is restored), with the loss's softmax as the last row.
  std::vector<LayerRow> describe();
  // The quantized layers, by their module path (conv1, layer1.0.bn2, ...), in
  // registration order.
  std::vector<std::pair<std::string, QuantizedLayer*>> quantized_layers() const;
  // QPU's initialization for every layer; tensor k of the model gets its own
  // offset k (per-layer offsets would repeat, and layers would share draws).
  void quantize_parameters_(const std::string& rounding, int64_t seed);
  // Packed storage (Note [Packed layers]); networks that support it override.
  virtual void pack_(bool weights, bool saved_inputs);
  std::vector<PackedStorage> packed_storage() const;
  // Note [Batch norm recalibration]: recomputes every batch norm layer's
  // running mean and variance at the current parameters, as the average of
  // their values over the batches batch(0) .. batch(batches - 1), each run
  // forward in training mode without gradients (num_batches_tracked ends at
  // `batches`). The parameters, the momentum, the module's mode and the
  // default generators' states are as before; if a pass throws, the
  // statistics are too. A network without batch norm is left as it is.
  void recalibrate_batch_norm(int64_t batches, const std::function<torch::Tensor(int64_t)>& batch);
  bool has_batch_norm() const { return !batch_norms().empty(); }
  // Every batch norm layer's running mean, running variance and
  // num_batches_tracked, in registration order (empty without batch norm).
  std::vector<torch::Tensor> batch_norm_statistics() const;
  // Each quantized layer's validation statistics, by name.
  std::vector<std::pair<std::string, OutputStats*>> output_stats();

 protected:
  std::vector<torch::nn::BatchNorm2dImpl*> batch_norms() const;
  // The forward pass; rows go to `trace` when it is not null.
  virtual torch::Tensor run(torch::Tensor x, LayerTrace* trace) = 0;

 private:
  std::string name_;
  std::vector<int64_t> input_shape_;
};

}  // namespace fxp::nn
