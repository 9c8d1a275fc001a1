// MSQ's controller on an fxp::nn network (Han et al.; docs/msq.md): the
// network's conv and linear layers read their weights through RoundClamp
// (Note [MSQ layers]) at a per-layer bit width that pruning checks lower.
// Add penalty() to the task loss of each step; call check() at each pruning
// check (fxp-train: every --msq-check-every epochs), then freeze() for the
// final fine-tuning at fixed widths.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "msq/hessian.h"
#include "nn/network.h"

namespace fxp::msq {

struct MsqOptions {
  int64_t start_bits = 8;
  int64_t min_bits = 1;
  double lambda = 1e-4;  // the weight of sum |LSB| in the loss
  double alpha = 0.95;   // a layer drops bits when this fraction of its LSBs is 0
  bool hessian = true;   // Hessian-guided k (2 below the mean sensitivity), else k = 1
  HessianTraceOptions hessian_options;
};

// The rule of a pruning check (docs/msq.md): a layer whose LSB sparsity
// reaches alpha drops k bits, k = 2 when its sensitivity is below the mean
// over all layers and 1 otherwise (1 for all without sensitivities), never
// below min_bits. Returns the new widths.
std::vector<int64_t> bits_after_check(const std::vector<int64_t>& bits, const std::vector<double>& sparsity,
                                      const std::vector<double>& sensitivity, double alpha, int64_t min_bits);

// 32 x the weights over the bits they take at their widths (the sign not
// counted, as BSQ and CSQ report it).
double compression_rate(const std::vector<int64_t>& bits, const std::vector<int64_t>& weights);

struct MsqLayer {
  std::string name;
  nn::QuantizedLayer* layer;
  torch::Tensor weight;
  int64_t bits;
  double scale;
  double sparsity = 0;        // the fraction of zero LSBs at the last check
  double hessian_trace = 0;   // at the last check (0 before, or without the Hessian)
};

// Whether every MSQ layer's weight is finite (a diverged run's are not).
class Controller;
bool msq_weights_finite(const Controller& controller);

class Controller {
 public:
  // Binds the network's conv and linear layers in module order, sets them to
  // WeightMode::Msq at options.start_bits (at most 15: the export stores n + 1
  // bits), with scale max |w|, fixed for the run.
  Controller(nn::NetworkImpl& network, MsqOptions options);

  // lambda x sum |LSB| over the layers, from their last forward (with
  // autograd); 0 once frozen.
  torch::Tensor penalty() const;

  // A pruning check: each layer's LSB sparsity; with the Hessian, its trace
  // from `float_path_loss`, a loss the callback computes with the layers on
  // their float path (Note [MSQ layers]), which this call switches on around
  // it, with Hutchinson vectors from `hessian_seed`; then the new widths
  // (bits_after_check). The scales stay: the (n-k)-bit grid nests in the
  // n-bit grid only at the same scale, so a pruned zero LSB changes no
  // weight. Returns each layer's bits dropped.
  std::vector<int64_t> check(const std::function<torch::Tensor()>& float_path_loss, uint64_t hessian_seed);

  // The final fine-tuning: widths fixed, no penalty.
  void freeze() { frozen_ = true; }
  bool frozen() const { return frozen_; }

  const std::vector<MsqLayer>& layers() const { return layers_; }
  const MsqOptions& options() const { return options_; }
  double compression_rate() const;
  // Each layer's LSB sparsity now (one pass of RoundClamp per layer, no gradients).
  std::vector<double> sparsities() const;

  // Everything the controller carries, as named tensors (checkpoints);
  // load_state reads the same names back and sets the layers.
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  void load_state(const std::function<torch::Tensor(const std::string& name)>& read);

 private:
  void apply(MsqLayer& layer) const;

  MsqOptions options_;
  std::vector<MsqLayer> layers_;
  bool frozen_ = false;
};

}  // namespace fxp::msq
