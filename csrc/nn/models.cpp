#include "nn/models.h"

#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

#include "ops/ops.h"

namespace fxp::nn {
namespace {

// in_channels, once the network's sizes are checked: in each constructor's
// base initializer, before any layer is built (built directly, a network of 0
// classes was accepted; make_network checked).
int64_t checked_in_channels(int64_t in_channels, int64_t num_classes) {
  if (in_channels < 1 || num_classes < 2) {
    throw std::invalid_argument("fxp::nn: a network needs at least 1 input channel and 2 classes, but got " +
                                std::to_string(in_channels) + " and " + std::to_string(num_classes));
  }
  return in_channels;
}

}  // namespace

// ---- the QPU paper's CNN --------------------------------------------------------

PaperCNNImpl::PaperCNNImpl(QuantConfig config, int64_t in_channels, int64_t num_classes)
    : NetworkImpl("paper_cnn", {checked_in_channels(in_channels, num_classes), 28, 28}) {
  conv1 = register_module("conv1", QConv2d(torch::nn::Conv2dOptions(in_channels, 32, 5).bias(false), config));
  conv2 = register_module("conv2", QConv2d(torch::nn::Conv2dOptions(32, 64, 5).bias(false), config));
  fc1 = register_module("fc1", QLinear(1024, 128, true, config));
  fc2 = register_module("fc2", QLinear(128, num_classes, true, config));
}

void PaperCNNImpl::pack_(bool weights, bool saved_inputs) {
  if (weights) {
    conv1->pack_weights_();
    conv2->pack_weights_();
    fc1->pack_weights_();
    fc2->pack_weights_();
  }
  if (saved_inputs) {
    // Each input is the previous layer's quantized output after ReLU (and max-pool): on its act grid.
    TORCH_CHECK(conv1->config.weight_mode != WeightMode::Fp32 && conv1->config.weight_mode != WeightMode::Msq,
                "fxp::nn: fp32 and msq layers have float activations: no grid to save inputs on");
    conv2->packed.saved_input_format = std::vector<int64_t>{conv1->config.act_total_bits, conv1->config.act_frac_bits};
    fc1->packed.saved_input_format = std::vector<int64_t>{conv2->config.act_total_bits, conv2->config.act_frac_bits};
    fc2->packed.saved_input_format = std::vector<int64_t>{fc1->config.act_total_bits, fc1->config.act_frac_bits};
  }
}

torch::Tensor PaperCNNImpl::run(torch::Tensor x, LayerTrace* trace) {
  torch::Tensor y = conv1->forward(x);
  trace_layer(trace, "Conv2d", x, y, true, parameter_count(*conv1));
  x = relu_max_pool2x2(y);
  trace_layer(trace, "MaxPool2d", y, x, false, 0);
  y = conv2->forward(x);
  trace_layer(trace, "Conv2d", x, y, true, parameter_count(*conv2));
  x = relu_max_pool2x2(y).flatten(1);
  trace_layer(trace, "MaxPool2d", y, x, false, 0);
  y = fc1->forward(x);
  trace_layer(trace, "Linear", x, y, true, parameter_count(*fc1));
  x = torch::relu(y);
  y = fc2->forward(x);
  trace_layer(trace, "Linear", x, y, true, parameter_count(*fc2));
  return y;
}

// ---- LeNet-5 ------------------------------------------------------------------

LeNet5Impl::LeNet5Impl(QuantConfig config, int64_t in_channels, int64_t num_classes)
    : NetworkImpl("lenet5", {checked_in_channels(in_channels, num_classes), 32, 32}) {
  conv1 = register_module("conv1", QConv2d(torch::nn::Conv2dOptions(in_channels, 6, 5), config));
  conv2 = register_module("conv2", QConv2d(torch::nn::Conv2dOptions(6, 16, 5), config));
  conv3 = register_module("conv3", QConv2d(torch::nn::Conv2dOptions(16, 120, 5), config));
  fc1 = register_module("fc1", QLinear(120, 84, true, config));
  fc2 = register_module("fc2", QLinear(84, num_classes, true, config));
}

void LeNet5Impl::pack_(bool weights, bool /*saved_inputs: none on a grid*/) {
  if (weights) {
    for (QConv2d* conv : {&conv1, &conv2, &conv3}) (*conv)->pack_weights_();
    fc1->pack_weights_();
    fc2->pack_weights_();
  }
}

torch::Tensor LeNet5Impl::run(torch::Tensor x, LayerTrace* trace) {
  for (QConv2d* conv : {&conv1, &conv2}) {
    const torch::Tensor y = (*conv)->forward(x);
    trace_layer(trace, "Conv2d", x, y, true, parameter_count(**conv));
    x = torch::avg_pool2d(torch::tanh(y), 2);
    trace_layer(trace, "AvgPool2d", y, x, false, 0);
  }
  torch::Tensor y = conv3->forward(x);
  trace_layer(trace, "Conv2d", x, y, true, parameter_count(*conv3));
  x = torch::tanh(y).flatten(1);
  y = fc1->forward(x);
  trace_layer(trace, "Linear", x, y, true, parameter_count(*fc1));
  x = torch::tanh(y);
  y = fc2->forward(x);
  trace_layer(trace, "Linear", x, y, true, parameter_count(*fc2));
  return y;
}

// ---- ResNet-20 ----------------------------------------------------------------

namespace {

torch::nn::Conv2dOptions conv3x3(int64_t in, int64_t out, int64_t stride) {
  return torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false);
}

// He et al.'s initialization for ResNets: N(0, 2 / (k*k*out)) for convolutions,
// weight 1 and bias 0 for batch norm (as the AdaPT/MuPPET code initializes).
void init_resnet(torch::nn::Module& network) {
  torch::NoGradGuard no_grad;
  for (const auto& m : network.modules(/*include_self=*/false)) {
    if (auto* conv = m->as<torch::nn::Conv2dImpl>()) {
      const auto k = conv->options.kernel_size();
      const double fan_out = static_cast<double>(k->at(0) * k->at(1) * conv->options.out_channels());
      conv->weight.normal_(0, std::sqrt(2.0 / fan_out));
    } else if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      bn->weight.fill_(1);
      bn->bias.zero_();
    }
  }
}

}  // namespace

ResidualBlockImpl::ResidualBlockImpl(int64_t in_planes, int64_t planes, int64_t stride, const QuantConfig& config) {
  conv1 = register_module("conv1", QConv2d(conv3x3(in_planes, planes, stride), config));
  bn1 = register_module("bn1", QBatchNorm2d(planes, config));
  conv2 = register_module("conv2", QConv2d(conv3x3(planes, planes, 1), config));
  bn2 = register_module("bn2", QBatchNorm2d(planes, config));
  if (stride != 1 || in_planes != planes) {
    shortcut_conv = register_module(
        "shortcut_conv", QConv2d(torch::nn::Conv2dOptions(in_planes, planes, 1).stride(stride).bias(false), config));
    shortcut_bn = register_module("shortcut_bn", QBatchNorm2d(planes, config));
  }
  add = register_module("add", QAdd(config));
}

torch::Tensor ResidualBlockImpl::forward(const torch::Tensor& x, LayerTrace* trace) {
  auto conv_bn = [&](QConv2d& conv, QBatchNorm2d& bn, const torch::Tensor& in) {
    const torch::Tensor y = conv->forward(in);
    trace_layer(trace, "Conv2d", in, y, true, parameter_count(*conv));
    const torch::Tensor z = bn->forward(y);
    trace_layer(trace, "BatchNorm2d", y, z, true, parameter_count(*bn));
    return z;
  };
  const torch::Tensor h = torch::relu(conv_bn(conv1, bn1, x));
  const torch::Tensor main = conv_bn(conv2, bn2, h);
  const torch::Tensor shortcut = shortcut_conv ? conv_bn(shortcut_conv, shortcut_bn, x) : x;
  const torch::Tensor sum = add->forward(main, shortcut);
  trace_layer(trace, "Add", main, sum, true, 0);
  return torch::relu(sum);
}

ResNet20Impl::ResNet20Impl(QuantConfig config, int64_t in_channels, int64_t num_classes)
    : NetworkImpl("resnet20", {checked_in_channels(in_channels, num_classes), 32, 32}) {
  conv1 = register_module("conv1", QConv2d(conv3x3(in_channels, 16, 1), config));
  bn1 = register_module("bn1", QBatchNorm2d(16, config));
  int64_t in_planes = 16;
  for (int64_t stage = 0; stage < 3; ++stage) {
    const int64_t planes = 16 << stage;
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t stride = stage > 0 && i == 0 ? 2 : 1;
      blocks.push_back(register_module("layer" + std::to_string(stage + 1) + "_" + std::to_string(i),
                                       ResidualBlock(in_planes, planes, stride, config)));
      in_planes = planes;
    }
  }
  fc = register_module("fc", QLinear(64, num_classes, true, config));
  init_resnet(*this);
}

torch::Tensor ResNet20Impl::run(torch::Tensor x, LayerTrace* trace) {
  torch::Tensor y = conv1->forward(x);
  trace_layer(trace, "Conv2d", x, y, true, parameter_count(*conv1));
  x = bn1->forward(y);
  trace_layer(trace, "BatchNorm2d", y, x, true, parameter_count(*bn1));
  x = torch::relu(x);
  for (auto& block : blocks) x = block->forward(x, trace);
  y = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  trace_layer(trace, "AvgPool2d", x, y, false, 0);
  x = fc->forward(y);
  trace_layer(trace, "Linear", y, x, true, parameter_count(*fc));
  return x;
}

// ---- AlexNet --------------------------------------------------------------------

AlexNetImpl::AlexNetImpl(QuantConfig config, int64_t in_channels, int64_t num_classes)
    : NetworkImpl("alexnet", {checked_in_channels(in_channels, num_classes), 32, 32}) {
  using torch::nn::Conv2dOptions;
  conv1 = register_module("conv1", QConv2d(Conv2dOptions(in_channels, 64, 11).stride(4).padding(5), config));
  conv2 = register_module("conv2", QConv2d(Conv2dOptions(64, 192, 5).padding(2), config));
  conv3 = register_module("conv3", QConv2d(Conv2dOptions(192, 384, 3).padding(1), config));
  conv4 = register_module("conv4", QConv2d(Conv2dOptions(384, 256, 3).padding(1), config));
  conv5 = register_module("conv5", QConv2d(Conv2dOptions(256, 256, 3).padding(1), config));
  fc = register_module("fc", QLinear(256, num_classes, true, config));
}

torch::Tensor AlexNetImpl::run(torch::Tensor x, LayerTrace* trace) {
  // Each convolution, and whether a max-pool follows its ReLU.
  const std::vector<std::pair<QConv2d*, bool>> convs = {
      {&conv1, true}, {&conv2, true}, {&conv3, false}, {&conv4, false}, {&conv5, true}};
  for (const auto& [conv, pooled] : convs) {
    const torch::Tensor y = (*conv)->forward(x);
    trace_layer(trace, "Conv2d", x, y, true, parameter_count(**conv));
    if (pooled) {
      x = relu_max_pool2x2(y);
      trace_layer(trace, "MaxPool2d", y, x, false, 0);
    } else {
      x = torch::relu(y);
    }
  }
  x = x.flatten(1);
  const torch::Tensor y = fc->forward(x);
  trace_layer(trace, "Linear", x, y, true, parameter_count(*fc));
  return y;
}

// ---- by name --------------------------------------------------------------------

const std::vector<std::string>& network_names() {
  static const std::vector<std::string> names = {"paper_cnn", "lenet5", "resnet20", "alexnet"};
  return names;
}

int64_t network_image_size(const std::string& name) {
  if (name == "paper_cnn") return 28;
  if (name == "lenet5" || name == "resnet20" || name == "alexnet") return 32;
  throw std::invalid_argument("model must be one of paper_cnn, lenet5, resnet20, alexnet, but got '" + name + "'");
}

bool network_has_batch_norm(const std::string& name) { return name == "resnet20"; }

std::shared_ptr<NetworkImpl> make_network(const std::string& name, const QuantConfig& config, int64_t in_channels,
                                          int64_t num_classes) {
  network_image_size(name);  // checks the name; each network's constructor checks the sizes
  if (name == "paper_cnn") return std::make_shared<PaperCNNImpl>(config, in_channels, num_classes);
  if (name == "lenet5") return std::make_shared<LeNet5Impl>(config, in_channels, num_classes);
  if (name == "resnet20") return std::make_shared<ResNet20Impl>(config, in_channels, num_classes);
  return std::make_shared<AlexNetImpl>(config, in_channels, num_classes);
}

}  // namespace fxp::nn
