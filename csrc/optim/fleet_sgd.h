// fxp::optim::FleetSgd: the update of a fleet (nn/fleet.h) — every member's
// step over the stacked parameters, each as its solo run's optimizer steps
// it: fxp::optim::QpuSgd for sqpu and hteqpu (through qpu_sgd_members_step_),
// torch::optim::SGD for fp32 and ste.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

namespace fxp::optim {

// One member's update settings and progress.
struct FleetMemberUpdate {
  double lr = 0.01, momentum = 0, weight_decay = 0;
  int64_t total_bits = 16, frac_bits = 10;  // QPU: the parameter (and momentum) format
  std::string rounding = "stochastic";      // QPU: stochastic (sqpu) or nearest_even (hteqpu)
  int64_t seed = 0;                         // QPU: the solo QpuSgd's group seed
  int64_t step = 0;                         // steps taken (SGD: its momentum buffer exists once it is 1)
  bool active = true;                       // a stopped member is not stepped
};

class FleetSgd {
 public:
  // stacks: the fleet's parameters, [K, ...] each. qpu: QpuSgd's update, else
  // torch's SGD (no dampening, no Nesterov, as fxp-train uses them).
  FleetSgd(std::vector<torch::Tensor> stacks, std::vector<FleetMemberUpdate> members, bool qpu,
           std::string momentum_form = "standard");

  // Steps every active member from the stacks' gradients, and advances its step.
  void step();
  // QPU: int64 [K, n, 2] (saturated, vanished) of the last step; undefined for SGD.
  const torch::Tensor& last_counts() const { return last_counts_; }

  std::vector<FleetMemberUpdate>& members() { return members_; }
  const std::vector<FleetMemberUpdate>& members() const { return members_; }
  // Member m's momentum buffer of stack k (a view; undefined without momentum).
  torch::Tensor momentum_buffer(int64_t m, size_t k) const;
  // Copies `buffers` (one per stack) into member m's rows (resume).
  void set_momentum_buffers(int64_t m, const std::vector<torch::Tensor>& buffers);

  // Compaction (nn::NetworkFleet::keep_members): the new stacks hold members
  // `keep` of the old, in order.
  void keep_members(const std::vector<int64_t>& keep, std::vector<torch::Tensor> stacks);

 private:
  void sgd_step();
  void qpu_step();

  std::vector<torch::Tensor> stacks_, buffers_;  // buffers_: empty when no member has momentum
  std::vector<FleetMemberUpdate> members_;
  bool qpu_;
  std::string momentum_form_;
  torch::Tensor last_counts_;
};

}  // namespace fxp::optim
