// AdaPT's analytical performance model (Kummer et al., Section 4; every term
// in docs/adapt.md): the cost of training counted in multiply-adds weighted by
// word length and weight density, against float32 SGD on the same batches.
// Written once: the controller accumulates each layer's work as it trains,
// and these functions turn it into SU¹, SZ and the inference speed-up.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

namespace fxp::adapt {

// One layer's work so far. Unit: one float32 multiply-add.
struct LayerWork {
  int64_t madds = 0;       // forward multiply-adds per sample (outputs x fan-in)
  int64_t parameters = 0;  // weight and bias elements
  // Sums over iterations t of B_t * BW_t / 32 * density_t (the forward pass and
  // the input gradient, which multiply by the sparse quantized weights) and of
  // B_t * BW_t / 32 (the weight gradient: dense activations at the layer's
  // word length), with B_t the batch and density_t the fraction of non-zero
  // quantized weights.
  double sparse_units = 0;
  double dense_units = 0;
  int64_t samples = 0;     // sum of B_t: what float32 SGD computes at 32 bits, densely
  int64_t iterations = 0;  // optimizer steps
  int64_t pd_evaluations = 0;  // PD's roundings + histograms of the layer's parameters
  int64_t switches = 0;        // PU's GD norm over the accumulator and its reset, per switch
  // The layer's final word length and density (model size, inference).
  int64_t bits = 32;
  double density = 1;
};

// Note [Multiply-adds per sample]
// LayerWork::madds is a layer's forward multiply-adds per sample: its output
// elements per sample times its multiply-adds per output. A linear or
// convolution layer's multiply-adds per output are its fan-in, the elements of
// one output row of its weight ([out, in]: in; [out, in / groups, kh, kw]: the
// product of the three). An input with one dimension fewer than the weight
// ([in], [C, H, W]) is one unbatched sample, whose outputs are all one
// sample's; any other input is a batch along dimension 0. Written once, for
// fxp::nn's layers (nn/modules.h) and for the Python controller's forward
// hooks, which pass their shapes to fxp.AdaptController.set_forward_shapes.
int64_t fan_in(c10::IntArrayRef weight_sizes);
bool is_batched_input(int64_t input_dim, int64_t weight_dim);
int64_t outputs_per_sample(c10::IntArrayRef output_sizes, bool batched);

struct TrainingCost {
  double adapt = 0;    // forward + backward + AdaPT's overhead + the float32 update
  double float32 = 0;  // forward + backward + update, all float32 and dense
  double speedup() const { return adapt > 0 ? float32 / adapt : 0; }  // SU¹
};

// Per layer: adapt = madds * (2 * sparse_units + dense_units)    [forward, input and weight gradients]
//                  + iterations * parameters * (1 + 3 + l1)       [float32 update; Eq. 3.4 norm, divide, accumulate; L1]
//                  + pd_evaluations * 2 * parameters              [PD: round + bin each element per candidate]
//                  + switches * 2 * parameters                    [PU: GD's norm of the accumulator, its reset]
//            float32 = 3 * madds * samples + iterations * parameters.
TrainingCost training_cost(const std::vector<LayerWork>& layers, bool l1);

// SZ: the trained model's size against float32, weights stored sparse at
// their word length (index overhead not counted): sum P * BW * density / (32 sum P).
double model_size_ratio(const std::vector<LayerWork>& layers);

// Inference speed-up against float32: sum M * 32 / sum M * BW * density
// (forward only, final formats).
double inference_speedup(const std::vector<LayerWork>& layers);

}  // namespace fxp::adapt
