// The paper's bookkeeping, computed from the model definition (nn::NetworkImpl::describe):
// Table 1 (per-layer inputs, rounded outputs, parameters), Table 3 (rounding
// operations per method) and the training-memory model of Eq. 5 / Figures 2 and 11.
// docs/train.md derives every number and says where the paper's own differ.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "nn/network.h"

namespace fxp::train {

struct ModelCounts {
  int64_t input_elements;   // the network input per sample (never quantized)
  int64_t saved_inputs;     // Table 1 "Inputs": elements saved for the backward pass per sample
  int64_t rounded_outputs;  // Table 1 "Round": layer outputs rounded per sample
  int64_t parameters;       // Table 1 "Parameters"
};
ModelCounts model_counts(const std::vector<nn::LayerRow>& rows);

// Rounding operations of one training step (forward, backward and update) on a batch.
struct RoundingCounts {
  int64_t inference;      // layer outputs, plus STE's weight reads
  int64_t update;         // QPU: the parameter, and the momentum buffer when momentum > 0
  int64_t stochastic;     // how many of the two sums use SR
  int64_t total() const { return inference + update; }
};
RoundingCounts rounding_counts(const ModelCounts& counts, const std::string& method,
                               const std::string& inference_rounding, bool with_momentum, int64_t batch_size);

// Note [Two memory accountings]
// "paper": the terms that reproduce the paper's stated ratios (SQPU/STE = 0.571
//   at 16 bits, batch 16; 0.446 at 12 bits), reconstructed because the paper
//   gives only Eq. 5: STE holds an fp32 master copy, a B-bit weight copy and
//   fp32 saved inputs (fake quantization); QPU holds B-bit weights, a B-bit
//   momentum buffer and B-bit saved inputs; the network input is fp32.
// "full": every tensor a training step holds, with quantized tensors stored at
//   their bit width: weights (and STE's quantized copy), fp32 gradients, the
//   momentum buffer, and the saved inputs (fp32 network input, quantized layer
//   outputs at out_bits for every quantized method).
struct MemoryTerm {
  std::string name;
  int64_t elements;
  int64_t bits;
  double bytes() const { return static_cast<double>(elements) * static_cast<double>(bits) / 8.0; }
};
struct MemoryEstimate {
  std::string accounting;  // paper | full
  std::vector<MemoryTerm> terms;
  double total_bytes() const;
};
MemoryEstimate estimate_memory(const ModelCounts& counts, const std::string& accounting, const std::string& method,
                               int64_t param_bits, int64_t out_bits, bool with_momentum, int64_t batch_size);

nlohmann::json to_json(const MemoryEstimate& estimate);

// The paper's method (fp32, ste, sqpu, hteqpu) whose accounting counts a run
// of `method`: AdaPT keeps a float32 master copy read quantized (ste) or, with
// update qpu, none (sqpu); MSQ trains a float32 master copy with float
// activations (fp32; the forward's transient quantized weights are not counted).
std::string memory_counted_as(const std::string& method, const std::string& adapt_update);

// The whole --describe-model report for one configuration, as JSON and as text.
// The method is counted as memory_counted_as(method, adapt_update), at
// param_bits and out_bits (AdaPT: its start format).
nlohmann::json describe_model(const std::vector<nn::LayerRow>& rows, const std::string& method,
                              const std::string& adapt_update, const std::string& inference_rounding,
                              int64_t param_bits, int64_t out_bits, bool with_momentum, int64_t batch_size);
std::string describe_model_text(const nlohmann::json& report);

}  // namespace fxp::train
