// The networks fxp trains, built from its quantized layers (nn/modules.h):
// the QPU paper's CNN, and LeNet-5, ResNet-20 and AlexNet as the AdaPT paper
// uses them (docs/models.md). Every method (fp32, ste, sqpu, hteqpu) works on
// every network: the layers' QuantConfig decides.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "nn/modules.h"
#include "nn/network.h"

namespace fxp::nn {

// The QPU paper's Table 1 network (Gupta et al. 2015): 184,490 parameters for
// 1x28x28 inputs and 10 classes.
class PaperCNNImpl : public NetworkImpl {
 public:
  explicit PaperCNNImpl(QuantConfig config, int64_t in_channels = 1, int64_t num_classes = 10);
  // Packed storage for the whole network: every layer's weights (QPU methods)
  // and the saved inputs of conv2, fc1 and fc2, which are layer outputs on the
  // act grid (conv1's input is the float network input).
  void pack_(bool weights, bool saved_inputs) override;
  QConv2d conv1{nullptr}, conv2{nullptr};
  QLinear fc1{nullptr}, fc2{nullptr};

 protected:
  torch::Tensor run(torch::Tensor x, LayerTrace* trace) override;
};
TORCH_MODULE(PaperCNN);

// LeNet-5 (LeCun et al. 1998) as the AdaPT code builds it: tanh, average
// pooling, C5 as a 5x5 convolution, full C3 connectivity. 61,706 parameters
// for 1x32x32 inputs and 10 classes.
class LeNet5Impl : public NetworkImpl {
 public:
  LeNet5Impl(QuantConfig config, int64_t in_channels, int64_t num_classes);
  // Packed storage: every layer's weights (QPU methods). No saved input can
  // be packed: each is a tanh (and average pool) of a layer's output, off
  // any grid, or the float network input.
  void pack_(bool weights, bool saved_inputs) override;
  QConv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  QLinear fc1{nullptr}, fc2{nullptr};

 protected:
  torch::Tensor run(torch::Tensor x, LayerTrace* trace) override;
};
TORCH_MODULE(LeNet5);

// A basic residual block: two 3x3 convolutions with batch norm, and a 1x1
// convolution with batch norm on the shortcut where the shape changes.
class ResidualBlockImpl : public torch::nn::Module {
 public:
  ResidualBlockImpl(int64_t in_planes, int64_t planes, int64_t stride, const QuantConfig& config);
  torch::Tensor forward(const torch::Tensor& x, LayerTrace* trace);
  QConv2d conv1{nullptr}, conv2{nullptr}, shortcut_conv{nullptr};
  QBatchNorm2d bn1{nullptr}, bn2{nullptr}, shortcut_bn{nullptr};
  QAdd add{nullptr};
};
TORCH_MODULE(ResidualBlock);

// ResNet-20, the CIFAR variant of He et al. (2016): a 3x3 stem, 3 stages of 3
// basic blocks with 16/32/64 channels, global average pooling and one linear
// layer. The shortcuts that change shape are 1x1 projections (He et al.'s
// option B, as the AdaPT and MuPPET code build them). 272,474 parameters for
// 3x32x32 inputs and 10 classes (the paper's "0.27M").
class ResNet20Impl : public NetworkImpl {
 public:
  ResNet20Impl(QuantConfig config, int64_t in_channels, int64_t num_classes);
  QConv2d conv1{nullptr};
  QBatchNorm2d bn1{nullptr};
  std::vector<ResidualBlock> blocks;
  QLinear fc{nullptr};

 protected:
  torch::Tensor run(torch::Tensor x, LayerTrace* trace) override;
};
TORCH_MODULE(ResNet20);

// AlexNet, the CIFAR-size variant of the AdaPT code: five convolutions
// (11x11/4, 5x5, three 3x3) with ReLU and three 2x2 max-pools, then one linear
// layer. 2,472,266 parameters for 3x32x32 inputs and 10 classes.
class AlexNetImpl : public NetworkImpl {
 public:
  AlexNetImpl(QuantConfig config, int64_t in_channels, int64_t num_classes);
  QConv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr}, conv4{nullptr}, conv5{nullptr};
  QLinear fc{nullptr};

 protected:
  torch::Tensor run(torch::Tensor x, LayerTrace* trace) override;
};
TORCH_MODULE(AlexNet);

// The network names fxp-train accepts, and the square image size each takes
// (inputs of another size are padded or cropped to it: data/datasets.h).
const std::vector<std::string>& network_names();
int64_t network_image_size(const std::string& name);
// Whether the named network has batch norm layers (false for a name it does not know).
bool network_has_batch_norm(const std::string& name);
// Builds network `name` for inputs of `in_channels` channels and `num_classes`
// classes, every layer quantized as `config` says.
std::shared_ptr<NetworkImpl> make_network(const std::string& name, const QuantConfig& config, int64_t in_channels,
                                          int64_t num_classes);

}  // namespace fxp::nn
