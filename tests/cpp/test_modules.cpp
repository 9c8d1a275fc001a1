// fxp::nn: the paper's network and the quantized layers in C++.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "nn/modules.h"
#include "ops.h"

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
}

}  // namespace
