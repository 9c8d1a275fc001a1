// The C++ usage example from README.md: quantize a tensor to FxP(8, 4) with
// round-half-to-even and with stochastic rounding, and print the errors.
#include <torch/torch.h>

#include <iostream>

#include "ops.h"

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
  return 0;
}
