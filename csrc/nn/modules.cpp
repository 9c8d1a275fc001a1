#include "nn/modules.h"

#include <torch/nn/functional.h>
#include <torch/torch.h>

#include "ops/bit_pack/code_storage.h"
#include "ops/ops.h"
#include "ops/format_args.h"

namespace fxp::nn {
namespace {

const char* op_rounding(const std::string& act_rounding) {
  TORCH_CHECK(act_rounding == "hte" || act_rounding == "sr",
              "fxp::nn: act_rounding must be hte or sr, but got '", act_rounding, "'");
  return act_rounding == "hte" ? "nearest_even" : "stochastic";
}

void check_config(const QuantConfig& c) {
  // Named by the format they belong to ("frac_bits ... got 20" did not say which).
  check_fxp_format("fxp::nn: the parameter format (param_total_bits, param_frac_bits)", c.param_total_bits,
                   c.param_frac_bits);
  check_fxp_format("fxp::nn: the output format (act_total_bits, act_frac_bits)", c.act_total_bits, c.act_frac_bits);
  op_rounding(c.act_rounding);
}

torch::Tensor weight_on_read(const torch::Tensor& w, const QuantConfig& c) {
  if (c.weight_mode != WeightMode::Ste) return w;  // fp32, or qpu: already on the grid
  return quantize_ste(w, c.param_total_bits, c.param_frac_bits, op_rounding(c.act_rounding));
}

// Note [MSQ layers]: the weight through RoundClamp, its LSB terms kept for the penalty.
torch::Tensor msq_weight(const torch::Tensor& w, const QuantConfig& c, MsqState& state) {
  if (state.float_path) {
    const torch::Tensor q = std::get<0>(round_clamp(w.detach(), c.msq_scale, c.msq_bits));
    return q + (w - w.detach());
  }
  auto [q, l1, nonzero] = round_clamp(w, c.msq_scale, c.msq_bits);
  state.lsb_l1 = l1;
  state.lsb_nonzero = nonzero;
  return q;
}

// The weight of a conv or linear layer as its forward reads it.
torch::Tensor layer_weight(const torch::Tensor& w, const QuantConfig& c, MsqState& state) {
  return c.weight_mode == WeightMode::Msq ? msq_weight(w, c, state) : weight_on_read(w, c);
}

// Layers whose outputs are not quantized: float32 ones, and MSQ's (weights only).
bool float_outputs(const QuantConfig& c) { return c.weight_mode == WeightMode::Fp32 || c.weight_mode == WeightMode::Msq; }

torch::Tensor output(const torch::Tensor& y, const QuantConfig& c, OutputStats& stats) {
  if (float_outputs(c)) return y;
  if (stats.enabled && !torch::GradMode::is_enabled()) {
    auto [out, saturated] = quantize_stats(y, c.act_total_bits, c.act_frac_bits, op_rounding(c.act_rounding));
    stats.saturated = stats.saturated.defined() ? stats.saturated + saturated : saturated;
    stats.elements += y.numel();
    return out;
  }
  return quantize_ste(y, c.act_total_bits, c.act_frac_bits, op_rounding(c.act_rounding));
}

std::optional<torch::Tensor> optional(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

at::OptionalIntArrayRef format_ref(const std::optional<std::vector<int64_t>>& format) {
  return format ? at::OptionalIntArrayRef(*format) : std::nullopt;
}

// Packed layers quantize their output inside the layer op (no float copy),
// except while validation statistics are collected (quantize_stats).
std::optional<std::vector<int64_t>> fused_output_format(const QuantConfig& c, const OutputStats& stats) {
  if (float_outputs(c) || (stats.enabled && !torch::GradMode::is_enabled())) return std::nullopt;
  return std::vector<int64_t>{c.act_total_bits, c.act_frac_bits};
}

// The weight arguments of fxp::linear / fxp::conv2d: the codes when the layer's
// weights are packed, else the weights as the layer reads them.
struct LayerWeights {
  torch::Tensor weight;
  std::optional<torch::Tensor> bias, weight_codes, bias_codes;
  std::optional<std::vector<int64_t>> param_format;
};

LayerWeights layer_weights(const torch::Tensor& weight, const torch::Tensor& bias, const QuantConfig& c,
                           const PackedState& packed, const torch::Tensor& weight_codes,
                           const torch::Tensor& bias_codes) {
  if (packed.weights) {
    // A config changed after packing (by hand, or by a controller) would reread the codes in its format.
    TORCH_CHECK(c.param_total_bits == packed.format[0] && c.param_frac_bits == packed.format[1],
                "fxp::nn: the layer's param format is FxP(", c.param_total_bits, ",", c.param_frac_bits,
                "), but its packed weights are codes of FxP(", packed.format[0], ",", packed.format[1],
                "); a packed layer's format is fixed");
    return {weight, optional(bias), weight_codes, optional(bias_codes), packed.format};
  }
  // The bias first, as the unpacked path reads them: with SR, STE's reads draw
  // from the generator, and the order of the draws decides the bits.
  std::optional<torch::Tensor> b;
  if (bias.defined()) b = weight_on_read(bias, c);
  return {weight_on_read(weight, c), b, std::nullopt, std::nullopt, std::nullopt};
}

// A parameter's codes (which it must lie on the grid for: QPU's parameters do),
// in the form Note [Bit-stream storage] says.
torch::Tensor parameter_codes(const torch::Tensor& parameter, const char* name, const QuantConfig& c) {
  torch::NoGradGuard no_grad;
  try {
    return store_codes(pack(parameter, c.param_total_bits, c.param_frac_bits, "exact"), c.param_total_bits,
                       /*check_range=*/false);
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "fxp::nn: packing the ", name, " needs it on the parameter grid, FxP(",
                      c.param_total_bits, ",", c.param_frac_bits, "), as QPU's initialization puts it; ",
                      e.what_without_backtrace());
  }
}

// Note [Packed layers]: moves the weight's and bias's values into codes
// registered as buffers weight_codes and bias_codes, and leaves each a
// one-element stand-in of the same shape. Both are packed before either is
// replaced, so a refusal changes nothing.
void pack_layer_weights(torch::nn::Module& layer, torch::Tensor& weight, torch::Tensor& bias, const QuantConfig& c,
                        PackedState& packed, torch::Tensor& weight_codes, torch::Tensor& bias_codes) {
  TORCH_CHECK(c.weight_mode == WeightMode::Qpu, "fxp::nn: only QPU layers (sqpu, hteqpu) can pack their weights; ",
              "STE keeps a float master copy");
  if (packed.weights) return;
  torch::Tensor w = parameter_codes(weight, "weight", c), b;
  if (bias.defined()) b = parameter_codes(bias, "bias", c);
  torch::NoGradGuard no_grad;
  weight_codes = layer.register_buffer("weight_codes", w);
  weight.set_data(torch::zeros({}, weight.options()).expand(weight.sizes()));
  if (bias.defined()) {
    bias_codes = layer.register_buffer("bias_codes", b);
    bias.set_data(torch::zeros({}, bias.options()).expand(bias.sizes()));
  }
  packed.weights = true;
  packed.format = {c.param_total_bits, c.param_frac_bits};
}

std::vector<PackedStorage> layer_packed_storage(const PackedState& packed, const QuantConfig& c,
                                                     const torch::Tensor& weight, const torch::Tensor& bias,
                                                     const torch::Tensor& weight_codes,
                                                     const torch::Tensor& bias_codes) {
  if (!packed.weights) return {};
  // The codes' own format (a config changed since is refused where the layer reads them).
  std::vector<PackedStorage> out{{weight, weight_codes, packed.format[0], packed.format[1]}};
  if (bias.defined()) out.push_back({bias, bias_codes, packed.format[0], packed.format[1]});
  return out;
}

// Note [Convolution padding]
// Unpacked, a QConv2d pads as PyTorch's nn.Conv2d does: a numeric or string
// ("same", "valid") padding of zeros, or, with another padding_mode
// (reflect, replicate, circular), the input padded in that mode first (for
// "same", the extra row or column of an even total after, as Python's
// _reversed_padding_repeated_twice has it; LibTorch 2.11's Conv2dImpl swaps
// the two dimensions' amounts there) and the convolution then unpadded. Not
// through Conv2dImpl::_conv_forward, which reads the module's own bias, not
// the bias as the layer reads it. The layer op of packed storage takes
// numeric zero padding only, as Python's QConv2d says; both refuse the rest
// when the weights are packed.
torch::Tensor float_conv2d(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                           const torch::nn::detail::ConvNdOptions<2>& o) {
  namespace F = torch::nn::functional;
  if (std::get_if<torch::enumtype::kZeros>(&o.padding_mode())) {
    return F::detail::conv2d(x, weight, bias, o.stride(), o.padding(), o.dilation(), o.groups());
  }
  std::vector<int64_t> pad(4, 0);  // F::pad's order: the last dimension first, each side's amount
  for (size_t d = 0; d < 2; ++d) {
    int64_t before = 0, after = 0;
    if (const auto* numbers = std::get_if<torch::ExpandingArray<2>>(&o.padding())) {
      before = after = (**numbers)[d];
    } else if (std::get_if<torch::enumtype::kSame>(&o.padding())) {
      const int64_t total = (*o.dilation())[d] * ((*o.kernel_size())[d] - 1);
      before = total / 2;
      after = total - before;
    }
    pad[2 * (1 - d)] = before;
    pad[2 * (1 - d) + 1] = after;
  }
  F::PadFuncOptions::mode_t mode = torch::kReflect;
  if (std::get_if<torch::enumtype::kReplicate>(&o.padding_mode())) mode = torch::kReplicate;
  if (std::get_if<torch::enumtype::kCircular>(&o.padding_mode())) mode = torch::kCircular;
  return torch::conv2d(F::pad(x, F::PadFuncOptions(pad).mode(mode)), weight, bias, o.stride(),
                       torch::ExpandingArray<2>(0), o.dilation(), o.groups());
}

void check_packed_padding(const torch::nn::detail::ConvNdOptions<2>& o) {
  TORCH_CHECK(std::get_if<torch::enumtype::kZeros>(&o.padding_mode()) &&
                  std::get_if<torch::ExpandingArray<2>>(&o.padding()),
              "fxp::nn::QConv2d: packed storage supports numeric zero padding only (Note [Convolution padding])");
}

}  // namespace

WeightMode weight_mode_for(const std::string& method) {
  if (method == "fp32") return WeightMode::Fp32;
  if (method == "ste") return WeightMode::Ste;
  if (method == "sqpu" || method == "hteqpu") return WeightMode::Qpu;
  if (method == "msq") return WeightMode::Msq;
  TORCH_CHECK(false, "fxp::nn: method must be fp32, ste, sqpu, hteqpu or msq, but got '", method, "'");
}

QuantizedLayer::QuantizedLayer(QuantConfig config_) : config(std::move(config_)) { check_config(config); }

torch::Tensor QuantizedLayer::note_output(torch::Tensor y, bool batched) {
  outputs_per_sample = adapt::outputs_per_sample(y.sizes(), batched);  // Note [Multiply-adds per sample]
  return y;
}

QLinearImpl::QLinearImpl(int64_t in_features, int64_t out_features, bool bias, QuantConfig config_)
    : QuantizedLayer(std::move(config_)) {
  linear = register_module("linear", torch::nn::Linear(torch::nn::LinearOptions(in_features, out_features).bias(bias)));
}

torch::Tensor QLinearImpl::forward(const torch::Tensor& x) {
  if (!packed.weights && !packed.saved_input_format) {
    const torch::Tensor bias = linear->bias.defined() ? weight_on_read(linear->bias, config) : torch::Tensor();
    return note_output(output(torch::nn::functional::linear(x, layer_weight(linear->weight, config, msq), bias),
                              config, output_stats),
                       adapt::is_batched_input(x.dim(), linear->weight.dim()));
  }
  const LayerWeights w = layer_weights(linear->weight, linear->bias, config, packed, weight_codes, bias_codes);
  const auto out_format = fused_output_format(config, output_stats);
  const torch::Tensor y = fxp::linear(x, w.weight, w.bias, format_ref(packed.saved_input_format), w.weight_codes,
                                      w.bias_codes, format_ref(w.param_format), format_ref(out_format),
                                      op_rounding(config.act_rounding), std::nullopt, optional(packed.pack_counts));
  return note_output(out_format ? y : output(y, config, output_stats),
                     adapt::is_batched_input(x.dim(), linear->weight.dim()));
}

void QLinearImpl::pack_weights_() {
  pack_layer_weights(*this, linear->weight, linear->bias, config, packed, weight_codes, bias_codes);
}

std::vector<PackedStorage> QLinearImpl::packed_storage() const {
  return layer_packed_storage(packed, config, linear->weight, linear->bias, weight_codes, bias_codes);
}

QConv2dImpl::QConv2dImpl(torch::nn::Conv2dOptions options, QuantConfig config_)
    : QuantizedLayer(std::move(config_)) {
  conv = register_module("conv", torch::nn::Conv2d(options));
}

torch::Tensor QConv2dImpl::forward(const torch::Tensor& x) {
  const auto& o = conv->options;
  if (!packed.weights && !packed.saved_input_format) {
    const torch::Tensor bias = conv->bias.defined() ? weight_on_read(conv->bias, config) : torch::Tensor();
    return note_output(output(float_conv2d(x, layer_weight(conv->weight, config, msq), bias, o), config,
                              output_stats),
                       adapt::is_batched_input(x.dim(), conv->weight.dim()));
  }
  check_packed_padding(o);
  // fxp::conv2d takes 4-D input; an unbatched (C, H, W) one runs as a batch of one, as nn::Conv2d runs it.
  if (x.dim() == 3) return forward(x.unsqueeze(0)).squeeze(0);  // that forward notes the outputs per sample
  const auto padding = std::get<torch::ExpandingArray<2>>(o.padding());
  const LayerWeights w = layer_weights(conv->weight, conv->bias, config, packed, weight_codes, bias_codes);
  const auto out_format = fused_output_format(config, output_stats);
  const torch::Tensor y = fxp::conv2d(x, w.weight, w.bias, o.stride(), padding, o.dilation(), o.groups(),
                                      format_ref(packed.saved_input_format), w.weight_codes, w.bias_codes,
                                      format_ref(w.param_format), format_ref(out_format),
                                      op_rounding(config.act_rounding), std::nullopt, optional(packed.pack_counts));
  return note_output(out_format ? y : output(y, config, output_stats));
}

void QConv2dImpl::pack_weights_() {
  check_packed_padding(conv->options);
  pack_layer_weights(*this, conv->weight, conv->bias, config, packed, weight_codes, bias_codes);
}

std::vector<PackedStorage> QConv2dImpl::packed_storage() const {
  return layer_packed_storage(packed, config, conv->weight, conv->bias, weight_codes, bias_codes);
}

QBatchNorm2dImpl::QBatchNorm2dImpl(int64_t channels, QuantConfig config_) : QuantizedLayer(std::move(config_)) {
  bn = register_module("bn", torch::nn::BatchNorm2d(channels));
}

torch::Tensor QBatchNorm2dImpl::forward(const torch::Tensor& x) {
  if (float_outputs(config)) return note_output(bn->forward(x));
  // torch::nn::BatchNorm2d's own checks, which torch::batch_norm does not make (a 2-D input was accepted,
  // and one value per channel in training normalized to zeros).
  TORCH_CHECK(x.dim() == 4, "fxp::nn::QBatchNorm2d: expected 4D input (got ", x.dim(), "D input)");
  TORCH_CHECK(!is_training() || x.size(0) * x.size(2) * x.size(3) != 1,  // an empty batch passes, as in torch
              "fxp::nn::QBatchNorm2d: expected more than 1 value per channel when training, got input size ",
              x.sizes());
  // Note [Quantized batch norm]. The bias first, as the linear layers read them.
  const torch::Tensor bias = weight_on_read(bn->bias, config);
  const torch::Tensor weight = weight_on_read(bn->weight, config);
  const auto& o = bn->options;
  // As torch::nn::BatchNorm2d: no momentum means a cumulative average of the batches' statistics.
  double factor = 0.0;
  if (is_training()) {
    bn->num_batches_tracked += 1;
    factor = o.momentum() ? *o.momentum() : 1.0 / bn->num_batches_tracked.item<double>();
  }
  const torch::Tensor y = torch::batch_norm(x, weight, bias, bn->running_mean, bn->running_var, is_training(), factor,
                                            o.eps(), at::globalContext().userEnabledCuDNN());
  return note_output(output(y, config, output_stats));
}

void QBatchNorm2dImpl::pack_weights_() {
  TORCH_CHECK(false, "fxp::nn: batch norm layers cannot pack their parameters yet (Note [Quantized batch norm])");
}

QAddImpl::QAddImpl(QuantConfig config_) : QuantizedLayer(std::move(config_)) {}

torch::Tensor QAddImpl::forward(const torch::Tensor& a, const torch::Tensor& b) {
  return note_output(output(a + b, config, output_stats));
}

}  // namespace fxp::nn
