// The C++ usage example from README.md: quantize a tensor to FxP(8, 4) with
// round-half-to-even and with stochastic rounding, and print the errors; then
// train a fixed-point layer for a few steps with quantized parameter updates.
#include <torch/torch.h>

#include <iostream>

#include <fxp/fxp.h>

int main() {
  torch::manual_seed(0);
  const torch::Tensor x = torch::randn({1 << 20});
  const torch::Tensor hte = fxp::quantize(x, /*total_bits=*/8, /*frac_bits=*/4);
  const torch::Tensor sr = fxp::quantize_seeded(x, 8, 4, "stochastic", /*seed=*/42, /*offset=*/0);
  for (const auto& [name, q] : {std::pair{"nearest_even", hte}, std::pair{"stochastic", sr}}) {
    const torch::Tensor err = q - x;
    std::cout << name << ": mean error " << err.mean().item<double>() << ", max |error| "
              << err.abs().max().item<double>() << "\n";
  }
  // Straight-through: the gradient passes through the rounding.
  const torch::Tensor w = torch::randn({4}, torch::requires_grad());
  fxp::quantize_ste(w, 8, 4).sum().backward();
  std::cout << "STE gradient: " << w.grad() << "\n";

  // SQPU: the layer's weights live in FxP(16, 10); each step rounds the update
  // stochastically, so they never leave the grid (no fp32 master copy).
  fxp::nn::QuantConfig config;
  config.weight_mode = fxp::nn::WeightMode::Qpu;
  fxp::nn::QLinear layer(16, 4, /*bias=*/true, config);
  const std::vector<torch::Tensor> params = layer->parameters();
  {
    torch::NoGradGuard no_grad;  // an in-place change of leaves, not part of the graph
    fxp::quantize_parameters_(params, {16, 16}, {10, 10}, "nearest_even", /*seed=*/0);
  }
  fxp::optim::QpuSgd optimizer(params, fxp::optim::QpuSgdOptions(0.1).momentum(0.9).seed(7));
  const torch::Tensor inputs = torch::randn({64, 16});
  const torch::Tensor targets = torch::randn({64, 4});
  for (int step = 0; step < 5; ++step) {
    optimizer.zero_grad();
    const torch::Tensor loss = torch::mse_loss(layer->forward(inputs), targets);
    loss.backward();
    optimizer.step();
    std::cout << "QPU step " << step << ": loss " << loss.item<double>() << "\n";
  }
  const torch::Tensor weight = layer->linear->weight;
  const bool on_grid = torch::equal(fxp::quantize(weight, 16, 10), weight);
  std::cout << "weights on the FxP(16, 10) grid: " << (on_grid ? "yes" : "no") << "\n";
  return on_grid ? 0 : 1;
}
