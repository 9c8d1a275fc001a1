// MSQ's per-layer bit widths over plain weight tensors (Han et al.;
// docs/msq.md): the LSB penalty, the pruning checks and the controller's
// state. It knows no network: msq::Controller (msq/controller.h) binds it to
// an fxp::nn network's layers for fxp-train, and torch.classes.fxp.MsqController
// (fxp.msq.MsqController) to a PyTorch model's, so both run this code.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "msq/hessian.h"

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
  torch::Tensor weight;  // the float weights RoundClamp reads
  int64_t bits;
  double scale;
  double sparsity = 0;       // the fraction of zero LSBs at the last check
  double hessian_trace = 0;  // at the last check (0 before, or without the Hessian)
};

// What a layer's record says (metrics.jsonl in fxp-train, layer_records() in Python).
struct MsqLayerRecord {
  std::string name;
  int64_t bits, weights;
  double lsb_sparsity;    // now
  double check_sparsity;  // what the last check measured, before it pruned
  double hessian_trace, scale;
};

class WidthController {
 public:
  // Every weight starts at options.start_bits (at most 15: the export stores
  // n + 1 bits), with scale max |w|, fixed for the run.
  WidthController(std::vector<std::pair<std::string, torch::Tensor>> weights, MsqOptions options);

  // lambda x the sum of the layers' LSB L1 norms (RoundClamp's second output,
  // with autograd; undefined entries are layers not run yet); 0 once frozen.
  torch::Tensor penalty(const std::vector<torch::Tensor>& lsb_l1) const;

  // A pruning check: each layer's LSB sparsity; with the Hessian, its trace
  // from `float_path_loss`, a loss the caller computed with the layers on
  // their float path (Note [MSQ layers]), with Hutchinson vectors from
  // `hessian_seed` (without the Hessian the loss is not read and may be
  // undefined); then the new widths (bits_after_check). The scales stay: the
  // (n-k)-bit grid nests in the n-bit grid only at the same scale, so a
  // pruned zero LSB changes no weight. Returns each layer's bits dropped.
  std::vector<int64_t> check(const torch::Tensor& float_path_loss, uint64_t hessian_seed);

  // The final fine-tuning: widths fixed, no penalty.
  void freeze() { frozen_ = true; }
  bool frozen() const { return frozen_; }

  const std::vector<MsqLayer>& layers() const { return layers_; }
  const MsqOptions& options() const { return options_; }
  double compression_rate() const;
  // Each layer's LSB sparsity now (one pass of RoundClamp per layer, no gradients).
  std::vector<double> sparsities() const;
  // Each layer's record, with its sparsity now (sparsities()).
  std::vector<MsqLayerRecord> records() const;
  // Whether every weight is finite (a diverged run's are not).
  bool weights_finite() const;

  // Everything the controller carries, as named tensors (checkpoints);
  // load_state reads the same names back (undefined: missing).
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  void load_state(const std::function<torch::Tensor(const std::string& name)>& read);

 private:
  MsqOptions options_;
  std::vector<MsqLayer> layers_;
  bool frozen_ = false;
};

}  // namespace fxp::msq
