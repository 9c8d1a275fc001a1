// Quantized layers and the paper's network for LibTorch: the C++ twins of
// fxp.nn (torch_ext/fxp/nn.py), thin wrappers over the fxp ops.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fxp::nn {

enum class WeightMode { Fp32, Ste, Qpu };

// The paper's method name (fp32, ste, sqpu, hteqpu) -> how a layer treats its weights.
WeightMode weight_mode_for(const std::string& method);

// A layer's quantization, kept as plain runtime state: it may change between
// steps (AdaPT, MSQ) without rebuilding the model or the optimizer.
struct QuantConfig {
  WeightMode weight_mode = WeightMode::Fp32;
  int64_t param_total_bits = 16, param_frac_bits = 10;
  int64_t act_total_bits = 16, act_frac_bits = 8;
  std::string act_rounding = "sr";  // "hte" or "sr": layer outputs, and STE weights on read
};

// Validation statistics of a layer's output quantization. While `enabled` and
// autograd is off, the forward counts saturated output elements (from the same
// pass, via quantize_stats) into `saturated`, an int64 0-dim tensor on the
// layer's device; `elements` counts the outputs seen.
struct OutputStats {
  bool enabled = false;
  torch::Tensor saturated;
  int64_t elements = 0;
  void reset() { saturated = torch::Tensor(), elements = 0; }
};

// Note [Packed layers]
// A layer's packed storage (docs/design.md, "Packed storage"):
// - pack_weights_() (QPU layers) moves the weight and bias into int codes,
//   buffers "weight_codes" and "bias_codes". The float parameters stay
//   registered, as shape-only stand-ins (one element, expanded): autograd
//   accumulates their gradients, and the optimizer updates the codes
//   (PackedStorage). The forward unpacks the codes transiently.
// - saved_input_format (any quantized layer) makes the autograd save the
//   layer's input as codes of that format; the input must lie on its grid.
// Pack after moving the model to its device: Module::to copies the
// stand-ins at full size (the values stay right; the memory is lost).
struct PackedState {
  bool weights = false;
  std::optional<std::vector<int64_t>> saved_input_format;  // [total_bits, frac_bits]
};

// A packed parameter: the float stand-in that receives the gradient, and the
// codes that hold its value, in FxP(total_bits, frac_bits).
struct PackedStorage {
  torch::Tensor parameter;
  torch::Tensor codes;
  int64_t total_bits, frac_bits;
};

class QLinearImpl : public torch::nn::Module {
 public:
  QLinearImpl(int64_t in_features, int64_t out_features, bool bias, QuantConfig config);
  torch::Tensor forward(const torch::Tensor& x);
  // Note [Packed layers]. Needs weight_mode Qpu (weights on the grid).
  void pack_weights_();
  std::vector<PackedStorage> packed_storage() const;
  QuantConfig config;
  OutputStats output_stats;
  PackedState packed;
  torch::nn::Linear linear{nullptr};
  torch::Tensor weight_codes, bias_codes;
};
TORCH_MODULE(QLinear);

class QConv2dImpl : public torch::nn::Module {
 public:
  QConv2dImpl(torch::nn::Conv2dOptions options, QuantConfig config);
  torch::Tensor forward(const torch::Tensor& x);
  // Note [Packed layers]. Needs weight_mode Qpu (weights on the grid).
  void pack_weights_();
  std::vector<PackedStorage> packed_storage() const;
  QuantConfig config;
  OutputStats output_stats;
  PackedState packed;
  torch::nn::Conv2d conv{nullptr};
  torch::Tensor weight_codes, bias_codes;
};
TORCH_MODULE(QConv2d);

// One row of the paper's Table 1, measured on the model: values per sample.
struct LayerRow {
  std::string layer;    // Conv2d, MaxPool2d, Linear, Softmax
  int64_t inputs;       // elements entering the layer (saved for the backward pass)
  int64_t rounded;      // elements the layer's output quantization rounds (0: none)
  int64_t parameters;   // learnable elements
  std::vector<int64_t> in_shape, out_shape;  // [C, H, W] or [F]
};

// The paper's Table 1 network (Gupta et al. 2015), 184,490 parameters.
class PaperCNNImpl : public torch::nn::Module {
 public:
  explicit PaperCNNImpl(QuantConfig config);
  torch::Tensor forward(torch::Tensor x);  // logits
  // Table 1, derived by running the layers on one 28x28 input (the same
  // sequence as forward, with the softmax of the loss as the last row).
  std::vector<LayerRow> describe();
  // QPU's initialization for every layer; tensor k of the model gets its own
  // offset k (per-layer offsets would repeat, and layers would share draws).
  void quantize_parameters_(const std::string& rounding, int64_t seed);
  // Packed storage for the whole network: every layer's weights (QPU methods)
  // and the saved inputs of conv2, fc1 and fc2, which are layer outputs on the
  // act grid (conv1's input is the float network input).
  // saved_inputs also fuses each ReLU + max-pool (fxp::relu_max_pool2d).
  void pack_(bool weights, bool saved_inputs);
  std::vector<PackedStorage> packed_storage() const;
  // The quantized layers by name (conv1, conv2, fc1, fc2), for per-layer statistics.
  std::vector<std::pair<std::string, OutputStats*>> output_stats();
  QConv2d conv1{nullptr}, conv2{nullptr};
  QLinear fc1{nullptr}, fc2{nullptr};
  bool fused_relu_pool = false;

 private:
  torch::Tensor relu_pool(const torch::Tensor& y) const;
};
TORCH_MODULE(PaperCNN);

}  // namespace fxp::nn
