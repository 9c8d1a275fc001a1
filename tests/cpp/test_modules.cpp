// fxp::nn: the paper's network and the quantized layers in C++.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "adapt/controller.h"
#include "msq/controller.h"
#include "nn/models.h"
#include "ops/ops.h"
#include "test_util.h"

namespace {

using fxp::nn::QuantConfig;
using fxp::nn::WeightMode;

bool on_grid(const torch::Tensor& t, int64_t frac_bits) {
  const auto c = t.detach().to(torch::kDouble) * std::ldexp(1.0, static_cast<int>(frac_bits));
  return torch::equal(c, torch::round(c));
}

QuantConfig config(const std::string& method) {
  QuantConfig c;
  c.weight_mode = fxp::nn::weight_mode_for(method);
  return c;  // params FxP(16,10), outputs FxP(16,8), SR
}

TEST(Modules, PaperCnnHasTable1ParameterCount) {
  for (const std::string method : {"fp32", "ste", "sqpu", "hteqpu"}) {
    fxp::nn::PaperCNN model(config(method));
    int64_t count = 0;
    for (const auto& p : model->parameters()) count += p.numel();
    EXPECT_EQ(count, 184490) << method;
    EXPECT_EQ(model->forward(torch::randn({2, 1, 28, 28})).sizes(), (std::vector<int64_t>{2, 10}));
  }
}

// The paper's Table 1, computed from the model: per-layer inputs, rounded
// outputs and parameters, with the paper's totals.
TEST(Modules, Table1FromTheModel) {
  fxp::nn::PaperCNN model(config("sqpu"));
  const auto rows = model->describe();
  ASSERT_EQ(rows.size(), 7u);
  const std::vector<int64_t> inputs = {784, 18432, 4608, 4096, 1024, 128, 10};
  const std::vector<int64_t> rounded = {18432, 0, 4096, 0, 128, 10, 0};
  const std::vector<int64_t> params = {800, 0, 51200, 0, 131200, 1290, 0};
  int64_t sum_in = 0, sum_round = 0, sum_params = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].inputs, inputs[i]) << i;
    EXPECT_EQ(rows[i].rounded, rounded[i]) << i;
    EXPECT_EQ(rows[i].parameters, params[i]) << i;
    sum_in += rows[i].inputs;
    sum_round += rows[i].rounded;
    sum_params += rows[i].parameters;
  }
  EXPECT_EQ(sum_in, 29082);
  EXPECT_EQ(sum_round, 22666);
  EXPECT_EQ(sum_params, 184490);
  EXPECT_EQ(rows[0].out_shape, (std::vector<int64_t>{32, 24, 24}));
}

TEST(Modules, SteQuantizesOnReadAndPassesGradients) {
  fxp::nn::QLinear layer(6, 4, true, config("ste"));
  const auto x = torch::randn({5, 6});
  const auto y = layer->forward(x);
  EXPECT_TRUE(on_grid(y, 8));
  EXPECT_FALSE(on_grid(layer->linear->weight, 10));  // the fp32 master copy is untouched
  y.sum().backward();
  EXPECT_GT(layer->linear->weight.grad().abs().sum().item<double>(), 0.0);
}

TEST(Modules, QpuInitializationPutsParametersOnTheGrid) {
  fxp::nn::PaperCNN model(config("sqpu"));
  model->quantize_parameters_("stochastic", 3);
  for (const auto& p : model->parameters()) EXPECT_TRUE(on_grid(p, 10));
  EXPECT_THROW(fxp::nn::weight_mode_for("int8"), c10::Error);
  // fp32 layers keep their float values, whatever formats their config holds (as fxp.nn's).
  fxp::nn::PaperCNN fp32(config("fp32"));
  std::vector<torch::Tensor> before;
  for (const auto& p : fp32->parameters()) before.push_back(p.detach().clone());
  fp32->quantize_parameters_("stochastic", 3);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(fp32->parameters()[i], before[i]));
}

}  // namespace

namespace {

TEST(Modules, OutputStatsCountSaturatedOutputsWithoutGrad) {
  QuantConfig c = config("sqpu");
  c.act_total_bits = 4;
  c.act_frac_bits = 3;  // outputs in [-1, 0.875]: many saturate
  c.act_rounding = "hte";
  fxp::nn::QLinear layer(8, 6, true, c);
  const torch::Tensor x = torch::randn({5, 8}) * 4;
  torch::NoGradGuard no_grad;
  const torch::Tensor reference = torch::nn::functional::linear(x, layer->linear->weight, layer->linear->bias);
  // Saturated: the rounded code (round half to even of x * 2^3) falls outside [-8, 7].
  const torch::Tensor codes = torch::round(reference * 8);
  const int64_t expected = (codes > 7).sum().item<int64_t>() + (codes < -8).sum().item<int64_t>();
  ASSERT_GT(expected, 0);

  layer->forward(x);  // disabled: nothing counted
  EXPECT_FALSE(layer->output_stats.saturated.defined());
  layer->output_stats.enabled = true;
  const torch::Tensor y = layer->forward(x);
  const torch::Tensor y_again = layer->forward(x);
  EXPECT_EQ(layer->output_stats.saturated.item<int64_t>(), 2 * expected);  // accumulates
  EXPECT_EQ(layer->output_stats.elements, 2 * 30);
  EXPECT_TRUE(torch::equal(y, fxp::quantize(reference, 4, 3)));  // the same values as without stats
  layer->output_stats.reset();
  EXPECT_FALSE(layer->output_stats.saturated.defined());
  EXPECT_EQ(layer->output_stats.elements, 0);
}

TEST(Modules, OutputStatsStayOffUnderAutograd) {
  QuantConfig c = config("ste");
  fxp::nn::QLinear layer(3, 2, false, c);
  layer->output_stats.enabled = true;
  layer->forward(torch::randn({4, 3})).sum().backward();  // training keeps the STE path
  EXPECT_FALSE(layer->output_stats.saturated.defined());
  EXPECT_TRUE(layer->linear->weight.grad().defined());
}

// Note [Convolution padding]: every padding torch::nn::Conv2d takes, with the values it gives; packed
// storage refuses the ones its layer op cannot take. (padding_mode was ignored: reflect padded zeros.)
TEST(Modules, ConvolutionsPadAsTorchDoes) {
  using torch::nn::Conv2dOptions;
  const std::vector<Conv2dOptions> cases = {
      Conv2dOptions(2, 3, 3).padding(1).padding_mode(torch::kReflect),
      Conv2dOptions(2, 3, 3).padding(2).padding_mode(torch::kReplicate),
      Conv2dOptions(2, 3, {3, 2}).padding({1, 2}).padding_mode(torch::kCircular),
      Conv2dOptions(2, 3, 4).padding(torch::kSame).padding_mode(torch::kReflect).dilation(2),
      Conv2dOptions(2, 3, 3).padding(torch::kSame),
      Conv2dOptions(2, 3, 3).padding(torch::kValid),
      Conv2dOptions(2, 3, 3).padding(1).stride(2)};
  const torch::Tensor x = torch::randn({2, 2, 9, 8});
  for (const auto& options : cases) {
    fxp::nn::QConv2d layer(options, config("fp32"));
    std::ostringstream name;
    layer->conv->pretty_print(name);
    EXPECT_TRUE(torch::equal(layer->forward(x), layer->conv->forward(x))) << name.str();
    // STE, weights already on the grid (so reading them changes nothing), HTE outputs: torch's
    // convolution, quantized.
    QuantConfig c = config("ste");
    c.act_rounding = "hte";
    fxp::nn::QConv2d ste(options, c);
    torch::NoGradGuard no_grad;
    for (auto& p : ste->conv->parameters()) p.copy_(fxp::quantize(p, 16, 10));
    EXPECT_TRUE(torch::equal(ste->forward(x), fxp::quantize(ste->conv->forward(x), 16, 8))) << name.str();
  }
  // "same" with another mode and an uneven total: Python's order (the extra after, H's amounts third and
  // fourth), written out; LibTorch's Conv2dImpl swaps the dimensions there and changes the output's shape.
  {
    const auto options = Conv2dOptions(2, 3, {4, 3}).padding(torch::kSame).padding_mode(torch::kReflect)
                             .dilation({1, 2});
    fxp::nn::QConv2d layer(options, config("fp32"));
    const torch::Tensor y = layer->forward(x);
    namespace F = torch::nn::functional;
    const torch::Tensor padded = F::pad(x, F::PadFuncOptions({2, 2, 1, 2}).mode(torch::kReflect));
    EXPECT_TRUE(torch::equal(y, torch::conv2d(padded, layer->conv->weight, layer->conv->bias, torch::IntArrayRef{1, 1},
                                              torch::IntArrayRef{0, 0}, torch::IntArrayRef{1, 2})));
    EXPECT_EQ(y.sizes(), torch::IntArrayRef({2, 3, 9, 8}));
  }
  for (const auto& options : {Conv2dOptions(2, 3, 3).padding(1).padding_mode(torch::kReflect),
                              Conv2dOptions(2, 3, 3).padding(torch::kSame)}) {
    fxp::nn::QConv2d packed(options, config("sqpu"));
    fxp::testing::expect_error([&] { packed->pack_weights_(); },
                               "fxp::nn::QConv2d: packed storage supports numeric zero padding only");
  }
}

// A bad width is named by its format.
TEST(Modules, ABadConfigNamesItsFormat) {
  QuantConfig c = config("ste");
  c.act_frac_bits = 20;
  fxp::testing::expect_error([&] { fxp::nn::QLinear(3, 2, true, c); },
                             "fxp::nn: the output format (act_total_bits, act_frac_bits): frac_bits must be in [0, "
                             "total_bits - 1] = [0, 15], but got 20");
  c = config("ste");
  c.param_total_bits = 40;
  fxp::testing::expect_error([&] { fxp::nn::QLinear(3, 2, true, c); },
                             "fxp::nn: the parameter format (param_total_bits, param_frac_bits): total_bits must be");
}

// A packed layer's codes keep the format they were packed in: a config changed afterwards (by hand, or a
// controller's) once reread them in its format, and AdaPT's and MSQ's controllers took packed networks.
TEST(Modules, PackedWeightsKeepTheirFormat) {
  fxp::nn::QLinear layer(3, 2, true, config("sqpu"));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.copy_(fxp::quantize(p, 16, 10));
  }
  layer->pack_weights_();
  const torch::Tensor x = torch::randn({4, 3});
  layer->forward(x);
  layer->config.param_frac_bits = 4;
  fxp::testing::expect_error([&] { layer->forward(x); },
                             "fxp::nn: the layer's param format is FxP(16,4), but its packed weights are codes of "
                             "FxP(16,10); a packed layer's format is fixed");
  EXPECT_EQ(layer->packed_storage().at(0).frac_bits, 10);  // what the codes are, for an optimizer
  auto net = fxp::nn::make_network("lenet5", config("sqpu"), 1, 10);
  net->quantize_parameters_("nearest_even", 0);
  net->pack_(true, false);
  // Unbatched (C, H, W) input, as nn::Conv2d takes it, through the packed layer's op.
  fxp::nn::QConv2d conv(torch::nn::Conv2dOptions(2, 3, 3).padding(1), config("sqpu"));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : conv->parameters()) p.copy_(fxp::quantize(p, 16, 10));
  }
  conv->config.act_rounding = "hte";
  const torch::Tensor image = fxp::quantize(torch::randn({2, 5, 5}), 16, 8);
  const torch::Tensor unpacked = conv->forward(image);
  EXPECT_EQ(conv->outputs_per_sample, 3 * 5 * 5);  // AdaPT's multiply-adds: one sample's outputs, as batched
  fxp::nn::QLinear linear(4, 3, true, config("ste"));
  linear->forward(torch::randn({4}));
  EXPECT_EQ(linear->outputs_per_sample, 3);
  linear->forward(torch::randn({2, 5, 4}));
  EXPECT_EQ(linear->outputs_per_sample, 5 * 3);
  conv->pack_weights_();
  EXPECT_TRUE(torch::equal(conv->forward(image), unpacked));
  EXPECT_EQ(conv->outputs_per_sample, 3 * 5 * 5);
  fxp::testing::expect_error([&] { fxp::adapt::Controller controller(*net, {}); },
                             "has packed weights, whose format is fixed; AdaPT changes the formats");
  fxp::testing::expect_error([&] { fxp::msq::Controller controller(*net, {}); },
                             "has packed weights, which MSQ cannot read through RoundClamp");
}

}  // namespace
