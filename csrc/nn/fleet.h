// A fleet: K runs of one network trained as one batched model (issue 16;
// docs/train.md, "Many runs as one"). Each member keeps its own network, whose
// parameters become views of the fleet's stacks, so everything that reads a
// solo model (validation, checkpoints, statistics) reads a member unchanged.
#pragma once

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "nn/models.h"

namespace fxp::nn {

// One layer of a network as a fleet runs it: a convolution (stride 1, no
// padding) or a linear layer, its output quantized, then its activation and
// pooling. Its parameters are the next weight and, with `bias`, the bias.
struct FleetLayer {
  enum class Activation { None, Relu, Tanh };
  enum class Pool { None, Max2, Avg2 };  // 2 x 2, stride 2
  bool conv;
  bool grouped;  // conv: one grouped call keeps the solo bits (else one call per member)
  bool bias;
  Activation activation;
  Pool pool;

  size_t tensors() const { return bias ? 2 : 1; }  // its parameter tensors
};

// The layers of the networks fleets train (paper_cnn, lenet5), as their
// solo forwards (nn/models.cpp) run them; throws for another.
const std::vector<FleetLayer>& fleet_layers(const std::string& model);

// Note [Fleet forward]
// Member m's layers compute what its solo network computes, for its own batch:
// - a convolution runs as one grouped convolution (groups = K) over
//   [N, K*C, H, W], member m's channels in group m, where that keeps the
//   solo bits, else once per member over member-major [K, N, C, H, W]
//   (below; Note [Fleet layouts]), and each linear layer as the solo addmm
//   per member over [K, N, features] (one baddbmm above batch 64 and on a
//   GPU; Note [Fleet linear layers]);
// - each output quantization and STE weight read is one quantize_members_ste
//   call, with member m's format and rounding, over member m's slice in its
//   solo layout (its element i is the element i of the solo tensor);
// - its draws come from member m's own generator (generators()[m]), one key
//   per stochastic call in the solo forward's order (a bias before its
//   weight, the weight before the output), as the solo run draws from the
//   default generator (docs/design.md, "Random numbers").
// Bits: every member's results are its solo run's, in float32 and float64
// (tested at batch sizes 1 to 64; test_fleet.cpp). That takes care where
// LibTorch's batched kernels sum in another order than the solo ones:
// - a first convolution, with one input channel per group, would take
//   oneDNN's depthwise kernel: it runs as one solo convolution per member
//   (Note [Fleet member convolutions]), as does every later one where the
//   grouped call sums in another order too (FleetLayer::grouped: only the
//   paper CNN's second convolution runs grouped);
// - the linear layers have their own backward (Note [Fleet linear layers]).
// With K = 1 every call is the solo call.
class NetworkFleet {
 public:
  // `members`: K networks of one model (fleet_layers), shape and weight
  // mode, on one device, each with one format for all its layers.
  // `generators`: member m's generator of that device (CPU or CUDA). Each
  // member's parameters are stacked, and then become views of the stacks.
  NetworkFleet(std::vector<std::shared_ptr<NetworkImpl>> members, std::vector<at::Generator> generators);

  // Members first .. first + count - 1.
  struct MemberRange {
    int64_t first;
    int64_t count;
  };
  // The loss to backpropagate from logits [count, N, classes] of the members `range`.
  using ChunkLoss = std::function<torch::Tensor(const torch::Tensor& logits, const MemberRange& range)>;

  // x: [K, N, C, H, W] (the model's input shape), member m's batch in x[m]
  // -> logits [K, N, classes].
  torch::Tensor forward(const torch::Tensor& x);

  // The members `range` (within the fleet), with `params` ([range.count,
  // ...] each, shaped as the stacks, in their order) as their parameters:
  // x [range.count, N, C, H, W].
  torch::Tensor forward_members(const torch::Tensor& x, const MemberRange& range,
                                const std::vector<torch::Tensor>& params);

  // Sets each stack's grad to the gradient of the members' losses: forward and
  // backward over chunks of `chunk` members at a time (0: all at once), each
  // chunk's loss from loss_of. The same bits for every chunk size (Note [Fleet chunks]).
  void forward_backward(const torch::Tensor& x, int64_t chunk, const ChunkLoss& loss_of);

  // The stacks, [K, ...] each, in the network's parameter order.
  const std::vector<torch::Tensor>& parameters() const { return stacks_; }
  int64_t size() const { return static_cast<int64_t>(members_.size()); }
  const std::vector<std::shared_ptr<NetworkImpl>>& members() const { return members_; }
  std::vector<at::Generator>& generators() { return generators_; }

  // Compaction: keeps members `keep` (increasing positions) in new, smaller
  // stacks, which the kept members' parameters view; the others' parameters
  // get copies of their last values. The caller compacts its own stacked
  // state (momentum buffers) alike.
  void keep_members(const std::vector<int64_t>& keep);

 private:
  // Each member's formats and output rounding, as quantize_members_ste takes them.
  struct MemberFormats {
    std::vector<int64_t> param_bits, param_frac, act_bits, act_frac;
    c10::List<std::string> rounding;  // stochastic | nearest_even

    void add(const QuantConfig& c);
    MemberFormats select(const std::vector<int64_t>& members) const;  // those members', in that order
  };
  // The members a forward runs (a chunk, or all): their range and their formats.
  struct Chunk {
    MemberRange range;
    const MemberFormats& formats;
  };

  // One key per member of the chunk (0 where its rounding is deterministic).
  std::pair<std::vector<int64_t>, std::vector<int64_t>> draw_keys(const Chunk& chunk);
  torch::Tensor quantize(const torch::Tensor& x, int64_t member_dim, bool weights, const Chunk& chunk);
  // STE: quantized on read; else as it is.
  torch::Tensor read_weight(const torch::Tensor& stack, const Chunk& chunk);
  torch::Tensor output(const torch::Tensor& y, int64_t member_dim, const Chunk& chunk);
  void stack_parameters();

  std::vector<std::shared_ptr<NetworkImpl>> members_;
  std::vector<FleetLayer> layers_;
  std::vector<at::Generator> generators_;
  std::vector<torch::Tensor> stacks_;
  WeightMode mode_;
  MemberFormats formats_;
};

}  // namespace fxp::nn
