// MSQ's per-layer Hessian traces (csrc/msq/hessian.h): Hutchinson's estimator
// against the exact trace of small models whose Hessian is formed in full.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "msq/controller.h"
#include "msq/hessian.h"
#include "nn/models.h"
#include "nn/modules.h"
#include "ops/ops.h"
#include "test_util.h"

namespace {

using fxp::msq::hessian_traces;
using fxp::msq::HessianTraceOptions;

torch::Tensor param(torch::IntArrayRef shape, int64_t seed) {
  torch::manual_seed(seed);
  return torch::randn(shape, torch::kDouble).requires_grad_();
}

TEST(MsqHessian, DiagonalHessianIsExactAfterOneSample) {
  const auto a = param({5}, 1), b = param({2, 3}, 2);
  const auto ca = torch::rand({5}, torch::kDouble), cb = torch::rand({2, 3}, torch::kDouble);
  // H is diagonal: 2 ca for a, 6 cb b for b.
  const auto loss = (ca * a.pow(2)).sum() + (cb * b.pow(3)).sum();
  const auto traces = hessian_traces(loss, {{a}, {b}}, HessianTraceOptions{1, 7});
  ASSERT_EQ(traces.size(), 2u);
  EXPECT_NEAR(traces[0], (2 * ca).sum().item<double>(), 1e-12);
  EXPECT_NEAR(traces[1], (6 * cb * b.detach()).sum().item<double>(), 1e-12);
}

// A two-layer tanh network with cross entropy: its Hessian is dense, within
// and across layers.
struct SmallNet {
  torch::Tensor w1 = param({3, 4}, 3), b1 = param({3}, 4), w2 = param({2, 3}, 5), b2 = param({2}, 6);
  torch::Tensor x = param({8, 4}, 7).detach();
  torch::Tensor y = torch::tensor({0, 1, 1, 0, 1, 0, 0, 1});
  std::vector<torch::Tensor> params() const { return {w1, b1, w2, b2}; }
  torch::Tensor loss() const {
    const auto h = torch::tanh(torch::nn::functional::linear(x, w1, b1));
    return torch::nn::functional::cross_entropy(torch::nn::functional::linear(h, w2, b2), y);
  }
};

// The full Hessian over the flattened parameters, one Hessian-vector product per column.
torch::Tensor exact_hessian(const SmallNet& net) {
  const auto params = net.params();
  const auto grads = torch::autograd::grad({net.loss()}, params, {}, true, true);
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  auto h = torch::zeros({n, n}, torch::kDouble);
  for (int64_t j = 0; j < n; ++j) {
    torch::Tensor dot = torch::zeros({}, torch::kDouble);
    int64_t offset = 0;
    for (size_t k = 0; k < params.size(); ++k) {
      const int64_t m = params[k].numel();
      if (j >= offset && j < offset + m) dot = dot + grads[k].reshape(-1)[j - offset];
      offset += m;
    }
    const auto column = torch::autograd::grad({dot}, params, {}, true, false, true);
    std::vector<torch::Tensor> flat;
    for (size_t k = 0; k < params.size(); ++k) {
      flat.push_back(column[k].defined() ? column[k].reshape(-1) : torch::zeros({params[k].numel()}, torch::kDouble));
    }
    h.select(1, j).copy_(torch::cat(flat));
  }
  return h;
}

TEST(MsqHessian, MatchesTheExactTraceWithinItsStatisticalBound) {
  const SmallNet net;
  const auto h = exact_hessian(net);
  // Layers: {w1, b1} (elements 0..14) and {w2, b2} (15..22).
  const std::vector<std::pair<int64_t, int64_t>> spans{{0, 15}, {15, 23}};
  const int64_t samples = 4000;
  const auto traces = hessian_traces(net.loss(), {{net.w1, net.b1}, {net.w2, net.b2}}, HessianTraceOptions{samples, 11});
  for (size_t l = 0; l < spans.size(); ++l) {
    const auto [begin, end] = spans[l];
    const auto rows = h.slice(0, begin, end);
    const auto block = rows.slice(1, begin, end);
    const double exact = block.trace().item<double>();
    const double own = 2 * (block.pow(2).sum() - block.diagonal().pow(2).sum()).item<double>();
    const double across = (rows.pow(2).sum() - block.pow(2).sum()).item<double>();
    const double sigma = std::sqrt((own + across) / samples);
    ASSERT_GT(sigma, 0) << "the Hessian is dense: the estimate has a spread to test";
    EXPECT_NEAR(traces[l], exact, 5 * sigma) << "layer " << l << ": exact " << exact;
    EXPECT_GT(std::abs(exact), 10 * sigma) << "the bound must be tight enough to mean something";
  }
}

TEST(MsqHessian, TheSeedFixesTheEstimate) {
  const SmallNet net;
  const std::vector<std::vector<torch::Tensor>> layers{{net.w1, net.b1}, {net.w2, net.b2}};
  const auto first = hessian_traces(net.loss(), layers, HessianTraceOptions{3, 5});
  const auto again = hessian_traces(net.loss(), layers, HessianTraceOptions{3, 5});
  const auto other = hessian_traces(net.loss(), layers, HessianTraceOptions{3, 6});
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other);
}

TEST(MsqHessian, RefusesBadInput) {
  const SmallNet net;
  fxp::testing::expect_error([&] { hessian_traces(net.loss(), {{net.w1}}, HessianTraceOptions{0, 0}); },
                             "samples must be at least 1");
  fxp::testing::expect_error([&] { hessian_traces(net.w1 * 2, {{net.w1}}, HessianTraceOptions{1, 0}); },
                             "the loss must be a scalar");
  fxp::testing::expect_error(
      [&] { hessian_traces(net.loss(), {{net.w1, net.x}}, HessianTraceOptions{1, 0}); },
      "a parameter of layer 0 does not require grad");
}

fxp::nn::QuantConfig msq_config(int64_t bits, double scale) {
  fxp::nn::QuantConfig c;
  c.weight_mode = fxp::nn::WeightMode::Msq;
  c.msq_bits = bits;
  c.msq_scale = scale;
  return c;
}

// Note [MSQ layers]: the weight through RoundClamp, float bias and outputs, the
// LSB terms kept with autograd for the penalty.
TEST(MsqLayers, LinearReadsItsWeightThroughRoundClamp) {
  torch::manual_seed(0);
  fxp::nn::QLinear layer(6, 4, true, msq_config(3, 1.0));
  torch::NoGradGuard no_grad;
  const float scale = layer->linear->weight.abs().max().item<float>();
  layer->config.msq_scale = scale;
  const auto x = torch::randn({5, 6});
  const auto [q, l1, nonzero] = fxp::round_clamp(layer->linear->weight, scale, 3);
  EXPECT_TRUE(torch::equal(layer->forward(x), torch::nn::functional::linear(x, q, layer->linear->bias)));
  EXPECT_TRUE(torch::equal(layer->msq.lsb_l1, l1));
  EXPECT_EQ(layer->msq.lsb_nonzero.item<int64_t>(), nonzero.item<int64_t>());
  EXPECT_GT(nonzero.item<int64_t>(), 0);
}

TEST(MsqLayers, ThePenaltysGradientIsTheSignOfTheLsb) {
  torch::manual_seed(1);
  fxp::nn::QConv2d layer(torch::nn::Conv2dOptions(2, 3, 3).padding(1), msq_config(4, 0.3));
  const auto x = torch::randn({2, 2, 5, 5});
  const double lambda = 0.25;
  // The float path's first gradient is the fused op's (both straight through).
  layer->msq.float_path = true;
  layer->forward(x).sum().backward();
  const torch::Tensor float_path_grad = layer->conv->weight.grad().clone();
  layer->conv->weight.mutable_grad() = torch::Tensor();
  layer->msq.float_path = false;
  layer->forward(x).sum().backward();
  const torch::Tensor task_grad = layer->conv->weight.grad().clone();
  EXPECT_TRUE(torch::allclose(task_grad, float_path_grad, 1e-6, 1e-6));
  layer->conv->weight.mutable_grad() = torch::Tensor();
  const auto y = layer->forward(x);  // before reading lsb_l1, which this forward sets
  (y.sum() + lambda * layer->msq.lsb_l1).backward();
  const auto sign = torch::sign(fxp::round_clamp_lsb(layer->conv->weight.detach(), 0.3, 4));
  EXPECT_TRUE(torch::allclose(layer->conv->weight.grad(), task_grad + lambda * sign, 0, 1e-6));
  EXPECT_GT(sign.abs().sum().item<double>(), 0);
}

TEST(MsqLayers, TheFloatPathGivesEachLayersHessianTrace) {
  torch::manual_seed(2);
  auto net = fxp::nn::make_network("lenet5", msq_config(4, 0.2), 1, 10);
  std::vector<std::vector<torch::Tensor>> weights;
  for (const auto& [name, layer] : net->quantized_layers()) {
    if (auto* conv = dynamic_cast<fxp::nn::QConv2dImpl*>(layer)) weights.push_back({conv->conv->weight});
    if (auto* linear = dynamic_cast<fxp::nn::QLinearImpl*>(layer)) weights.push_back({linear->linear->weight});
    layer->msq.float_path = true;
  }
  ASSERT_EQ(weights.size(), 5u);
  const auto x = torch::randn({4, 1, 32, 32});
  const auto loss = torch::nn::functional::cross_entropy(net->forward(x), torch::tensor({1, 2, 3, 4}));
  const auto traces = fxp::msq::hessian_traces(loss, weights, HessianTraceOptions{2, 0});
  ASSERT_EQ(traces.size(), 5u);
  for (double t : traces) EXPECT_TRUE(std::isfinite(t) && t != 0);
  // They are the Hessian of the same network in float with its weights at
  // their quantized values, Q_n(w): what the straight-through step sees.
  torch::manual_seed(2);
  auto plain = fxp::nn::make_network("lenet5", fxp::nn::QuantConfig{}, 1, 10);
  std::vector<std::vector<torch::Tensor>> plain_weights;
  {
    torch::NoGradGuard no_grad;
    for (const auto& [name, layer] : plain->quantized_layers()) {
      torch::Tensor w;
      if (auto* conv = dynamic_cast<fxp::nn::QConv2dImpl*>(layer)) w = conv->conv->weight;
      if (auto* linear = dynamic_cast<fxp::nn::QLinearImpl*>(layer)) w = linear->linear->weight;
      if (!w.defined()) continue;
      w.copy_(std::get<0>(fxp::round_clamp(weights[plain_weights.size()][0].detach(), 0.2, 4)));
      plain_weights.push_back({w});
    }
  }
  const auto plain_loss = torch::nn::functional::cross_entropy(plain->forward(x), torch::tensor({1, 2, 3, 4}));
  const auto plain_traces = fxp::msq::hessian_traces(plain_loss, plain_weights, HessianTraceOptions{2, 0});
  for (size_t l = 0; l < traces.size(); ++l) {
    EXPECT_NEAR(traces[l], plain_traces[l], 1e-5 * std::abs(plain_traces[l])) << "layer " << l;
  }
  // The fused op has no second derivative: the float path is what makes this work.
  for (const auto& [name, layer] : net->quantized_layers()) layer->msq.float_path = false;
  const auto fused_loss = torch::nn::functional::cross_entropy(net->forward(x), torch::tensor({1, 2, 3, 4}));
  EXPECT_ANY_THROW(fxp::msq::hessian_traces(fused_loss, weights, HessianTraceOptions{1, 0}));
}

// docs/msq.md: a layer past alpha drops 2 bits below the mean sensitivity, 1 otherwise, not below min_bits.
TEST(MsqRules, BitsAfterACheckFollowSparsityAndSensitivity) {
  const std::vector<int64_t> bits{8, 8, 8, 2, 5};
  const std::vector<double> sparsity{0.99, 0.5, 0.97, 0.99, 0.949};
  const std::vector<double> sensitivity{1.0, 5.0, 3.0, 0.5, 0.1};  // mean 1.92
  EXPECT_EQ(fxp::msq::bits_after_check(bits, sparsity, sensitivity, 0.95, 1), (std::vector<int64_t>{6, 8, 7, 1, 5}));
  EXPECT_EQ(fxp::msq::bits_after_check(bits, sparsity, {}, 0.95, 1), (std::vector<int64_t>{7, 8, 7, 1, 5}));
  EXPECT_EQ(fxp::msq::bits_after_check(bits, sparsity, sensitivity, 0.95, 7), (std::vector<int64_t>{7, 8, 7, 2, 5}));
  EXPECT_EQ(fxp::msq::bits_after_check(bits, sparsity, sensitivity, 0.0, 1), (std::vector<int64_t>{6, 7, 7, 1, 3}));
}

TEST(MsqRules, CompressionRateCountsEachWeightAtItsWidth) {
  // 100 weights at 2 bits and 300 at 4: 32 * 400 / (200 + 1200).
  EXPECT_DOUBLE_EQ(fxp::msq::compression_rate({2, 4}, {100, 300}), 32.0 * 400 / 1400);
  EXPECT_DOUBLE_EQ(fxp::msq::compression_rate({32}, {7}), 1.0);
}

// The network-free core that Python's MsqController runs: a bad state changes
// nothing (all or nothing), and the penalty needs one L1 norm per layer.
TEST(MsqWidthController, LoadsAStateAllOrNothing) {
  torch::manual_seed(5);
  fxp::msq::MsqOptions o;
  o.start_bits = 6;
  o.alpha = 0.0;
  o.hessian = false;
  fxp::msq::WidthController widths({{"a", torch::randn({4, 3})}, {"b", torch::randn({7})}}, o);
  EXPECT_EQ(widths.check(torch::Tensor(), 0), (std::vector<int64_t>{1, 1}));
  const auto state = widths.state();
  const auto read = [&](const std::string& name, const torch::Tensor& replace_bits) {
    return [&, name, replace_bits](const std::string& key) {
      if (key == "msq.bits" && replace_bits.defined()) return replace_bits;
      for (const auto& [k, t] : state) {
        if (k == key) return t;
      }
      return torch::Tensor();
    };
  };
  fxp::msq::WidthController other({{"a", torch::randn({4, 3})}, {"b", torch::randn({7})}}, o);
  fxp::testing::expect_error([&] { other.load_state(read("", torch::tensor({5, 0}))); }, "has bits 0");
  // The message says what a width may be (it gave the bits and the scale only).
  fxp::testing::expect_error([&] { other.load_state(read("", torch::tensor({5, 99}))); },
                             "fxp::msq: the state's layer b has bits 99; 'msq.bits' must be in [1, 15] (a width, "
                             "the sign not counted)");
  EXPECT_EQ(other.layers()[0].bits, 6) << "a failed load leaves every layer as it was";
  other.load_state(read("", torch::Tensor()));
  EXPECT_EQ(other.layers()[0].bits, 5);
  EXPECT_EQ(other.layers()[1].bits, 5);
  fxp::testing::expect_error([&] { other.penalty({torch::Tensor()}); }, "one LSB L1 norm per layer (2), but got 1");
  fxp::testing::expect_error(
      [&] { fxp::msq::WidthController({{"c", torch::zeros({0})}}, o); }, "the weights of c are empty");
  fxp::testing::expect_error([&] { fxp::msq::WidthController({{"h", torch::ones({2}, torch::kHalf)}}, o); },
                             "the weights of h must be float32 or float64");
}

TEST(MsqController, PenaltyChecksAndState) {
  torch::manual_seed(3);
  auto net = fxp::nn::make_network("lenet5", fxp::nn::QuantConfig{}, 1, 10);
  fxp::msq::MsqOptions o;
  o.start_bits = 6;
  o.lambda = 0.5;
  o.alpha = 0.0;  // every layer passes: the check drops bits by sensitivity alone
  o.hessian_options = HessianTraceOptions{2, 1};
  fxp::msq::Controller controller(*net, o);
  ASSERT_EQ(controller.layers().size(), 5u);
  EXPECT_DOUBLE_EQ(controller.compression_rate(), 32.0 / 6);
  const auto x = torch::randn({4, 1, 32, 32});
  const auto y = torch::tensor({1, 2, 3, 4});
  const auto loss = torch::nn::functional::cross_entropy(net->forward(x), y);
  // The penalty is lambda times the layers' sum |LSB| from this forward.
  double want = 0;
  for (size_t i = 0; i < controller.layers().size(); ++i) {
    const auto& l = controller.layers()[i];
    EXPECT_EQ(controller.network_layer(i).config.weight_mode, fxp::nn::WeightMode::Msq);
    EXPECT_EQ(l.scale, l.weight.detach().abs().max().item<float>());
    want += std::get<1>(fxp::round_clamp(l.weight.detach(), l.scale, 6)).item<double>();
  }
  const auto penalty = controller.penalty();
  EXPECT_NEAR(penalty.item<double>(), 0.5 * want, 1e-6 * want);
  (loss + penalty).backward();
  for (const auto& l : controller.layers()) EXPECT_TRUE(l.weight.grad().defined());
  // A check: traces on the float path, then k = 2 below the mean sensitivity, else 1.
  std::vector<double> scales;
  for (const auto& l : controller.layers()) scales.push_back(l.scale);
  const auto dropped =
      controller.check([&] { return torch::nn::functional::cross_entropy(net->forward(x), y); }, /*hessian_seed=*/9);
  double mean = 0;
  for (const auto& l : controller.layers()) mean += l.hessian_trace / l.weight.numel() / 5;
  for (size_t i = 0; i < 5; ++i) {
    const auto& l = controller.layers()[i];
    EXPECT_FALSE(controller.network_layer(i).msq.float_path);
    EXPECT_EQ(dropped[i], l.hessian_trace / l.weight.numel() < mean ? 2 : 1) << l.name;
    EXPECT_EQ(l.bits, 6 - dropped[i]);
    EXPECT_EQ(controller.network_layer(i).config.msq_bits, l.bits);
    EXPECT_EQ(l.scale, scales[i]) << "the scale stays, so the lower grid nests in the upper";
    EXPECT_GT(l.sparsity, 0.0);
  }
  // The state round-trips into a fresh controller of the same network.
  const auto state = controller.state();
  auto other_net = fxp::nn::make_network("lenet5", fxp::nn::QuantConfig{}, 1, 10);
  fxp::msq::Controller other(*other_net, o);
  other.load_state([&](const std::string& name) {
    for (const auto& [n, t] : state) {
      if (n == name) return t;
    }
    return torch::Tensor();
  });
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(other.layers()[i].bits, controller.layers()[i].bits);
    EXPECT_EQ(other.layers()[i].scale, controller.layers()[i].scale);
    EXPECT_EQ(other.network_layer(i).config.msq_bits, controller.layers()[i].bits);
  }
  // Frozen: no penalty, no checks.
  controller.freeze();
  EXPECT_EQ(controller.penalty().item<double>(), 0.0);
  fxp::testing::expect_error([&] { controller.check([&] { return loss; }, 0); }, "frozen");
  // A refused controller leaves the network as it was.
  auto fresh = fxp::nn::make_network("lenet5", fxp::nn::QuantConfig{}, 1, 10);
  fxp::testing::expect_error([&] { o.start_bits = 16, fxp::msq::Controller(*fresh, o); }, "start_bits <= 15");
  for (const auto& [name, layer] : fresh->quantized_layers()) {
    EXPECT_EQ(layer->config.weight_mode, fxp::nn::WeightMode::Fp32) << name;
  }
}

}  // namespace
