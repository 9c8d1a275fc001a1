// The networks of nn/models.h: published parameter counts, per-layer tables,
// and a few training steps of every network with every method.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "adapt/controller.h"
#include "nn/models.h"
#include "optim/qpu_sgd.h"

#include "test_util.h"

namespace {

using fxp::nn::QuantConfig;
using fxp::testing::expect_error;

QuantConfig config(const std::string& method) {
  QuantConfig c;
  c.weight_mode = fxp::nn::weight_mode_for(method);
  return c;  // params FxP(16,10), outputs FxP(16,8), SR
}

int64_t count(const torch::nn::Module& m) { return fxp::nn::parameter_count(m); }

bool on_grid(const torch::Tensor& t, int64_t frac_bits) {
  const auto c = t.detach().to(torch::kDouble) * std::ldexp(1.0, static_cast<int>(frac_bits));
  return torch::equal(c, torch::round(c));
}

// The counts the papers publish: LeNet-5 61,706 (LeCun et al. 1998, full C3),
// ResNet-20 "0.27M" (He et al. 2016; 272,474 with projection shortcuts),
// the QPU paper's CNN 184,490 (its Table 1), and the AdaPT code's CIFAR AlexNet.
TEST(Models, PublishedParameterCounts) {
  const QuantConfig c = config("fp32");
  EXPECT_EQ(count(*fxp::nn::make_network("paper_cnn", c, 1, 10)), 184490);
  EXPECT_EQ(count(*fxp::nn::make_network("lenet5", c, 1, 10)), 61706);
  const int64_t resnet = count(*fxp::nn::make_network("resnet20", c, 3, 10));
  EXPECT_EQ(resnet, 272474);
  EXPECT_NEAR(resnet / 1e6, 0.27, 0.005);
  EXPECT_EQ(count(*fxp::nn::make_network("alexnet", c, 3, 10)), 2472266);
  // The input channels and classes change only the first and last layers.
  EXPECT_EQ(count(*fxp::nn::make_network("resnet20", c, 1, 47)), 272474 - 2 * 16 * 9 + 37 * 65);
  EXPECT_EQ(count(*fxp::nn::make_network("alexnet", c, 3, 100)), 2472266 + 90 * 257);
}

TEST(Models, DescribeRowsAddUpToTheModel) {
  for (const auto& name : fxp::nn::network_names()) {
    auto net = fxp::nn::make_network(name, config("sqpu"), 3, 10);
    const auto rows = net->describe();
    int64_t params = 0;
    for (const auto& r : rows) params += r.parameters;
    EXPECT_EQ(params, count(*net)) << name;
    EXPECT_EQ(rows.front().inputs, 3 * fxp::nn::network_image_size(name) * fxp::nn::network_image_size(name));
    EXPECT_EQ(rows.back().layer, "Softmax");
    EXPECT_EQ(rows.back().out_shape, (std::vector<int64_t>{10})) << name;
    EXPECT_TRUE(net->is_training()) << "describe restores the training mode";
    // The config's check (Note [Settings without effect]) knows the model without building it.
    EXPECT_EQ(fxp::nn::network_has_batch_norm(name), net->has_batch_norm()) << name;
  }
}

// Describing must not change the model: batch norm's running statistics stay.
TEST(Models, DescribeLeavesBatchNormStatisticsAlone) {
  auto net = fxp::nn::make_network("resnet20", config("fp32"), 3, 10);
  std::vector<torch::Tensor> before;
  for (const auto& b : net->buffers()) before.push_back(b.clone());
  net->describe();
  const auto after = net->buffers();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(torch::equal(after[i], before[i])) << i;
}

TEST(Models, ResNetQuantizesEveryConvBatchNormAndAdd) {
  auto net = fxp::nn::make_network("resnet20", config("ste"), 3, 10);
  std::map<std::string, int> kinds;
  for (const auto& [name, layer] : net->quantized_layers()) {
    auto& module = dynamic_cast<torch::nn::Module&>(*layer);
    kinds[module.name()]++;
  }
  EXPECT_EQ(kinds["fxp::nn::QConv2dImpl"], 1 + 18 + 2);
  EXPECT_EQ(kinds["fxp::nn::QBatchNorm2dImpl"], 1 + 18 + 2);
  EXPECT_EQ(kinds["fxp::nn::QAddImpl"], 9);
  EXPECT_EQ(kinds["fxp::nn::QLinearImpl"], 1);
}

// A few SGD steps of every network with every method: the loss is finite, the
// parameters move, QPU's stay on the grid, and the logits have the class count.
TEST(Models, EveryNetworkTrainsWithEveryMethod) {
  torch::manual_seed(0);
  for (const auto& name : fxp::nn::network_names()) {
    const int64_t size = fxp::nn::network_image_size(name);
    const auto x = torch::randn({4, 3, size, size});
    const auto y = torch::tensor({0, 1, 2, 3}, torch::kLong);
    for (const std::string method : {"fp32", "ste", "sqpu", "hteqpu", "adapt"}) {
      auto net = fxp::nn::make_network(name, config(method == "adapt" ? "ste" : method), 3, 5);
      const bool qpu = method == "sqpu" || method == "hteqpu";
      std::unique_ptr<fxp::adapt::Controller> adapt;
      if (method == "adapt") {
        fxp::adapt::AdaptOptions o;
        o.lookback = {1, 1};  // a switch after every step
        adapt = std::make_unique<fxp::adapt::Controller>(*net, o);
      }
      if (qpu) net->quantize_parameters_(method == "sqpu" ? "stochastic" : "nearest_even", 0);
      std::unique_ptr<torch::optim::Optimizer> opt;
      if (qpu) {
        opt = std::make_unique<fxp::optim::QpuSgd>(
            net->parameters(), fxp::optim::QpuSgdOptions(0.05).momentum(0.9).rounding(
                                   method == "sqpu" ? "stochastic" : "nearest_even"));
      } else {
        opt = std::make_unique<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
      }
      std::vector<torch::Tensor> start;
      for (const auto& p : net->parameters()) start.push_back(p.detach().clone());
      for (int step = 0; step < 2; ++step) {
        opt->zero_grad();
        const auto logits = net->forward(x);
        ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{4, 5})) << name << " " << method;
        const auto loss = torch::nn::functional::cross_entropy(logits, y);
        ASSERT_TRUE(std::isfinite(loss.item<double>())) << name << " " << method;
        loss.backward();
        if (adapt) adapt->after_backward(loss.item<double>(), 4);
        opt->step();
      }
      bool moved = false;
      const auto params = net->parameters();
      for (size_t i = 0; i < params.size(); ++i) moved = moved || !torch::equal(params[i], start[i]);
      EXPECT_TRUE(moved) << name << " " << method;
      if (adapt) {
        for (const auto& l : adapt->layers()) EXPECT_EQ(l.switches, 2) << name << " " << l.name;
      }
      if (qpu) {
        for (const auto& p : params) EXPECT_TRUE(on_grid(p, 10)) << name << " " << method;
      }
    }
  }
}

TEST(Models, QuantizedOutputsOnTheActGrid) {
  auto net = fxp::nn::make_network("resnet20", config("hteqpu"), 3, 10);
  net->eval();
  torch::NoGradGuard no_grad;
  auto block = std::dynamic_pointer_cast<fxp::nn::ResNet20Impl>(net)->blocks.at(3);
  const auto h = block->forward(torch::randn({2, 16, 32, 32}).mul_(4).round_().div_(256), nullptr);
  EXPECT_TRUE(on_grid(h, 8));
}

TEST(Models, PackedStorageOnlyWherePossible) {
  for (const std::string model : {"resnet20", "alexnet"}) {
    auto net = fxp::nn::make_network(model, config("sqpu"), 3, 10);
    expect_error([&] { net->pack_(true, true); },
                 "packed storage is not supported for the " + model + " network yet (only paper_cnn and lenet5)");
  }
  // LeNet-5 packs every layer's weights, and no saved input (each is off any grid).
  auto lenet = fxp::nn::make_network("lenet5", config("sqpu"), 1, 10);
  lenet->quantize_parameters_("nearest_even", 0);
  lenet->pack_(true, true);
  for (const auto& [name, layer] : lenet->quantized_layers()) {
    EXPECT_TRUE(layer->packed.weights) << name;
    EXPECT_FALSE(layer->packed.saved_input_format.has_value()) << name;
  }
  EXPECT_EQ(lenet->quantized_layers().size(), 5u);
  fxp::nn::QBatchNorm2d bn(4, config("sqpu"));
  expect_error([&] { bn->pack_weights_(); }, "batch norm layers cannot pack their parameters yet");
}

// As fxp.adapt: formats set on float32 or MSQ layers would change nothing.
TEST(Models, AdaptNeedsQuantizedLayersOfOneKind) {
  for (const std::string method : {"fp32", "msq"}) {
    auto net = fxp::nn::make_network("lenet5", config(method), 1, 10);
    expect_error([&] { fxp::adapt::Controller controller(*net, {}); },
                 "is not quantized (a float32 or MSQ layer); AdaPT's layers need weight mode ste");
  }
  auto net = fxp::nn::make_network("lenet5", config("ste"), 1, 10);
  const auto layers = net->quantized_layers();
  layers.back().second->config.weight_mode = fxp::nn::WeightMode::Qpu;
  expect_error([&] { fxp::adapt::Controller controller(*net, {}); },
               "fxp::adapt: layer " + layers.back().first + " is a qpu layer, but the layers before it are not");
  for (const std::string method : {"ste", "sqpu"}) {
    auto ok = fxp::nn::make_network("lenet5", config(method), 1, 10);
    EXPECT_NO_THROW(fxp::adapt::Controller controller(*ok, {}));
  }
}

// Quantized batch norm makes torch::nn::BatchNorm2d's input checks (torch::batch_norm does not).
TEST(Models, QuantizedBatchNormChecksItsInputAsTorchDoes) {
  for (const std::string method : {"ste", "sqpu"}) {
    fxp::nn::QBatchNorm2d bn(3, config(method));
    expect_error([&] { bn->forward(torch::randn({2, 3})); }, "fxp::nn::QBatchNorm2d: expected 4D input (got 2D input)");
    expect_error([&] { bn->forward(torch::randn({1, 3, 1, 1})); },
                 "fxp::nn::QBatchNorm2d: expected more than 1 value per channel when training, got input size "
                 "[1, 3, 1, 1]");
    EXPECT_EQ(bn->bn->num_batches_tracked.item<int64_t>(), 0);  // refused before it counted a batch
    EXPECT_EQ(bn->forward(torch::randn({0, 3, 2, 2})).sizes(), torch::IntArrayRef({0, 3, 2, 2}));  // as torch
    bn->eval();
    EXPECT_EQ(bn->forward(torch::randn({1, 3, 1, 1})).sizes(), torch::IntArrayRef({1, 3, 1, 1}));
  }
}

TEST(Models, BadNamesAndShapes) {
  expect_error([] { fxp::nn::make_network("vgg16", QuantConfig{}, 3, 10); },
               "model must be one of paper_cnn, lenet5, resnet20, alexnet, but got 'vgg16'");
  expect_error([] { fxp::nn::make_network("lenet5", QuantConfig{}, 0, 10); }, "at least 1 input channel and 2 classes");
  // Built directly too (a network of 0 classes was accepted).
  const std::string sizes = "fxp::nn: a network needs at least 1 input channel and 2 classes, but got ";
  expect_error([] { fxp::nn::PaperCNN(QuantConfig{}, 1, 0); }, sizes + "1 and 0");
  expect_error([] { fxp::nn::LeNet5(QuantConfig{}, 0, 10); }, sizes + "0 and 10");
  expect_error([] { fxp::nn::ResNet20(QuantConfig{}, 3, 1); }, sizes + "3 and 1");
  expect_error([] { fxp::nn::AlexNet(QuantConfig{}, -1, 10); }, sizes + "-1 and 10");
}

}  // namespace

// Note [Batch norm recalibration]: the running statistics become the average
// of the batches' (cumulative, as torch's batch norm without momentum), the
// parameters, the momentum, the module's mode and the generator do not change.
TEST(Models, BatchNormRecalibrationAveragesTheBatchesStatistics) {
  for (const std::string method : {"fp32", "ste-hte", "ste-sr"}) {
    SCOPED_TRACE(method);
    QuantConfig c = config(method.substr(0, method.find('-')));
    if (method != "fp32") c.act_rounding = method.substr(4);  // sr: the forward passes draw random numbers
    torch::manual_seed(3);
    auto net = std::dynamic_pointer_cast<fxp::nn::ResNet20Impl>(fxp::nn::make_network("resnet20", c, 1, 10));
    ASSERT_TRUE(net);
    const std::vector<torch::Tensor> batches = {torch::randn({6, 1, 32, 32}), torch::randn({4, 1, 32, 32})};
    std::vector<torch::Tensor> before;
    for (const auto& p : net->parameters()) before.push_back(p.detach().clone());
    const auto& bn = net->bn1->bn;
    // Stale statistics that the recalibration must not average in.
    bn->running_mean.fill_(5), bn->running_var.fill_(7), bn->num_batches_tracked.fill_(100);
    const bool training = method == "ste-sr";  // each mode must come back
    net->train(training);
    auto generator = at::detail::getDefaultCPUGenerator();
    const torch::Tensor state = generator.get_state();
    net->recalibrate_batch_norm(2, [&](int64_t b) { return batches.at(static_cast<size_t>(b)); });

    EXPECT_EQ(net->is_training(), training);
    EXPECT_TRUE(torch::equal(generator.get_state(), state));
    const auto after = net->parameters();
    for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(after[i], before[i]));
    EXPECT_EQ(bn->options.momentum(), std::optional<double>(0.1));
    EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 2);
    if (method == "ste-sr") {
      // A pass that throws leaves everything as it was, the statistics included.
      const torch::Tensor mean = bn->running_mean.clone();
      expect_error(
          [&] {
            net->recalibrate_batch_norm(2, [&](int64_t b) {
              if (b == 1) throw std::runtime_error("bad batch");
              return batches[0];
            });
          },
          "bad batch");
      EXPECT_TRUE(torch::equal(bn->running_mean, mean));
      EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 2);
      EXPECT_EQ(bn->options.momentum(), std::optional<double>(0.1));
      EXPECT_EQ(net->is_training(), training);
      EXPECT_TRUE(torch::equal(generator.get_state(), state));
      continue;  // conv1's outputs depend on the draws
    }
    // What bn1 saw: conv1's outputs.
    torch::Tensor mean = torch::zeros({16}), var = torch::zeros({16});
    {
      torch::NoGradGuard no_grad;
      for (const auto& x : batches) {
        const torch::Tensor y = net->conv1->forward(x);
        mean += y.mean({0, 2, 3}) / 2;
        var += y.var({0, 2, 3}, /*unbiased=*/true) / 2;
      }
    }
    EXPECT_TRUE(torch::allclose(bn->running_mean, mean, 1e-5, 1e-6));
    EXPECT_TRUE(torch::allclose(bn->running_var, var, 1e-5, 1e-6));
  }
  // Without batch norm, nothing to do.
  auto lenet = fxp::nn::make_network("lenet5", config("ste"), 1, 10);
  lenet->recalibrate_batch_norm(1, [](int64_t) -> torch::Tensor { throw std::logic_error("no batch needed"); });
  expect_error([&] { lenet->recalibrate_batch_norm(0, [](int64_t) { return torch::Tensor(); }); },
               "at least one batch");
}
