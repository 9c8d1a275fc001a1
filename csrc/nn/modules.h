// Quantized layers for LibTorch: the C++ twins of fxp.nn (torch_ext/fxp/nn.py),
// thin wrappers over the fxp ops. The networks built from them are in
// nn/models.h.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adapt/performance.h"  // Note [Multiply-adds per sample]

namespace fxp::nn {

// Msq: a float master copy read through MSQ's RoundClamp (Note [MSQ layers]).
enum class WeightMode { Fp32, Ste, Qpu, Msq };

// The method name (fp32, ste, sqpu, hteqpu, msq) -> how a layer treats its weights.
WeightMode weight_mode_for(const std::string& method);

// A layer's quantization, kept as plain runtime state: it may change between
// steps (AdaPT, MSQ) without rebuilding the model or the optimizer.
struct QuantConfig {
  WeightMode weight_mode = WeightMode::Fp32;
  int64_t param_total_bits = 16, param_frac_bits = 10;
  int64_t act_total_bits = 16, act_frac_bits = 8;
  std::string act_rounding = "sr";  // "hte" or "sr": layer outputs, and STE weights on read
  // MSQ: the weight's RoundClamp width and scale (Note [RoundClamp]), set by MSQ's controller.
  int64_t msq_bits = 8;
  double msq_scale = 1.0;
};

// Note [MSQ layers]
// Under WeightMode::Msq a conv or linear layer reads its weight through
// fxp::round_clamp at (msq_bits, msq_scale): one pass gives the quantized
// weight and the L1 norm of its LSBs, which the forward keeps in `lsb_l1`
// (with autograd, for MSQ's penalty) and `lsb_nonzero`. Biases, batch norm and
// activations stay float32, as in MSQ, BSQ and CSQ, which quantize weights.
// With `float_path`, the forward reads Q(w) + (w - w.detach()) instead: the
// same value and first gradient in plain torch ops, which differentiate twice,
// for the Hessian-vector products of MSQ's sensitivity (docs/msq.md).
struct MsqState {
  torch::Tensor lsb_l1, lsb_nonzero;  // of the last forward
  bool float_path = false;
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
//   With pack_counts (int64 [2] on the layer's device) an input that does
//   not (or is NaN) is counted there instead of raising, so the step reads
//   nothing back (Note [Deferred pack checks]); the owner checks the counts.
// Pack after moving the model to its device: Module::to copies the
// stand-ins at full size (the values stay right; the memory is lost).
struct PackedState {
  bool weights = false;
  std::vector<int64_t> format;  // the codes' [total_bits, frac_bits], fixed when the weights are packed
  std::optional<std::vector<int64_t>> saved_input_format;  // [total_bits, frac_bits]
  torch::Tensor pack_counts;  // undefined: the saved input is checked at once
};

// A packed parameter: the float stand-in that receives the gradient, and the
// codes that hold its value, in FxP(total_bits, frac_bits): integer codes of
// the parameter's shape, or a bit stream (Note [Bit-stream storage]).
struct PackedStorage {
  torch::Tensor parameter;
  torch::Tensor codes;
  int64_t total_bits, frac_bits;
};

// What every quantized layer shares. A network finds its quantized layers by
// walking its modules (NetworkImpl::quantized_layers), so a model needs no list.
class QuantizedLayer {
 public:
  explicit QuantizedLayer(QuantConfig config);
  virtual ~QuantizedLayer() = default;
  // Note [Packed layers]. Needs weight_mode Qpu (weights on the grid).
  virtual void pack_weights_() = 0;
  virtual std::vector<PackedStorage> packed_storage() const = 0;
  // Multiply-adds per output element: the fan-in of a convolution or linear
  // layer, 1 for batch norm, 0 for an add (AdaPT's performance model).
  virtual int64_t madds_per_output() const = 0;
  QuantConfig config;
  OutputStats output_stats;
  PackedState packed;
  MsqState msq;
  int64_t outputs_per_sample = 0;  // of the last forward (0: none yet)

 protected:
  // Records outputs_per_sample from the forward's result, and returns it;
  // `batched` false: y is one sample's (an unbatched input).
  torch::Tensor note_output(torch::Tensor y, bool batched = true);
};

class QLinearImpl : public torch::nn::Module, public QuantizedLayer {
 public:
  QLinearImpl(int64_t in_features, int64_t out_features, bool bias, QuantConfig config);
  torch::Tensor forward(const torch::Tensor& x);
  void pack_weights_() override;
  std::vector<PackedStorage> packed_storage() const override;
  int64_t madds_per_output() const override { return adapt::fan_in(linear->weight.sizes()); }
  torch::nn::Linear linear{nullptr};
  torch::Tensor weight_codes, bias_codes;
};
TORCH_MODULE(QLinear);

class QConv2dImpl : public torch::nn::Module, public QuantizedLayer {
 public:
  QConv2dImpl(torch::nn::Conv2dOptions options, QuantConfig config);
  torch::Tensor forward(const torch::Tensor& x);
  void pack_weights_() override;
  std::vector<PackedStorage> packed_storage() const override;
  int64_t madds_per_output() const override { return adapt::fan_in(conv->weight.sizes()); }
  torch::nn::Conv2d conv{nullptr};
  torch::Tensor weight_codes, bias_codes;
};
TORCH_MODULE(QConv2d);

// Note [Quantized batch norm]
// Batch norm's affine weight and bias are parameters like a conv's: STE reads
// them quantized, QPU keeps them on the param grid and updates them with the
// rest. The normalization itself, and the running mean and variance (buffers,
// not trained by SGD), stay float32. The output is quantized to the act format,
// as every quantized layer's is. Packed storage is not supported yet.
class QBatchNorm2dImpl : public torch::nn::Module, public QuantizedLayer {
 public:
  QBatchNorm2dImpl(int64_t channels, QuantConfig config);
  torch::Tensor forward(const torch::Tensor& x);
  void pack_weights_() override;
  std::vector<PackedStorage> packed_storage() const override { return {}; }
  int64_t madds_per_output() const override { return 1; }
  torch::nn::BatchNorm2d bn{nullptr};
};
TORCH_MODULE(QBatchNorm2d);

// A residual add: a + b, quantized to the act format. With one format for
// every layer both terms are outputs on that grid, so only saturation rounds;
// with per-layer formats (AdaPT) the sum is rounded to this layer's. No parameters.
class QAddImpl : public torch::nn::Module, public QuantizedLayer {
 public:
  explicit QAddImpl(QuantConfig config);
  torch::Tensor forward(const torch::Tensor& a, const torch::Tensor& b);
  void pack_weights_() override {}
  std::vector<PackedStorage> packed_storage() const override { return {}; }
  int64_t madds_per_output() const override { return 0; }
};
TORCH_MODULE(QAdd);

}  // namespace fxp::nn
