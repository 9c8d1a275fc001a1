#include "optim/fleet_sgd.h"

#include <algorithm>

#include "ops/ops.h"

namespace fxp::optim {
namespace {

bool any_momentum(const std::vector<FleetMemberUpdate>& members) {
  return std::any_of(members.begin(), members.end(), [](const auto& m) { return m.momentum != 0; });
}

// torch::optim::SGD's step of one tensor (no dampening, no Nesterov), in its
// order of operations, so that each element rounds as the solo step rounds it.
// `first`: the momentum buffer is new (SGD clones the first direction).
void sgd_update(torch::Tensor p, const torch::Tensor& grad, torch::Tensor buffer, double lr, double momentum,
                double weight_decay, bool first) {
  torch::Tensor d = grad;
  if (weight_decay != 0) d = d.add(p, weight_decay);
  if (momentum != 0) {
    if (first) {
      buffer.copy_(d);
    } else {
      buffer.mul_(momentum).add_(d, 1);
    }
    d = buffer;
  }
  p.add_(d, -1 * lr);
}

}  // namespace

FleetSgd::FleetSgd(std::vector<torch::Tensor> stacks, std::vector<FleetMemberUpdate> members, bool qpu,
                   std::string momentum_form)
    : stacks_(std::move(stacks)), members_(std::move(members)), qpu_(qpu), momentum_form_(std::move(momentum_form)) {
  TORCH_CHECK(!stacks_.empty(), "fxp::optim::FleetSgd: no parameters");
  const int64_t k = stacks_[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(members_.size()) == k, "fxp::optim::FleetSgd: ", members_.size(),
              " members' settings for stacks of ", k);
  if (any_momentum(members_)) {
    for (const auto& s : stacks_) buffers_.push_back(torch::zeros_like(s, at::MemoryFormat::Contiguous));
  }
}

torch::Tensor FleetSgd::momentum_buffer(int64_t m, size_t k) const {
  if (buffers_.empty() || members_.at(static_cast<size_t>(m)).momentum == 0) return {};
  return buffers_.at(k).select(0, m);
}

void FleetSgd::set_momentum_buffers(int64_t m, const std::vector<torch::Tensor>& buffers) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(buffers.size() == stacks_.size() && !buffers_.empty(), "fxp::optim::FleetSgd: member ", m, " got ",
              buffers.size(), " momentum buffers for ", stacks_.size(), " parameters");
  for (size_t k = 0; k < buffers.size(); ++k) buffers_[k].select(0, m).copy_(buffers[k]);
}

void FleetSgd::keep_members(const std::vector<int64_t>& keep, std::vector<torch::Tensor> stacks) {
  torch::NoGradGuard no_grad;
  std::vector<FleetMemberUpdate> members;
  for (const int64_t m : keep) members.push_back(members_.at(static_cast<size_t>(m)));
  members_ = std::move(members);
  stacks_ = std::move(stacks);
  if (!buffers_.empty()) {
    const torch::Tensor rows = torch::tensor(keep, torch::dtype(torch::kLong).device(stacks_[0].device()));
    for (auto& b : buffers_) b = b.index_select(0, rows).contiguous();
  }
  last_counts_ = torch::Tensor();
}

void FleetSgd::step() {
  torch::NoGradGuard no_grad;
  if (qpu_) {
    qpu_step();
  } else {
    sgd_step();
  }
  for (auto& m : members_) m.step += m.active ? 1 : 0;
}

void FleetSgd::qpu_step() {
  std::vector<torch::Tensor> grads;
  for (const auto& s : stacks_) {
    TORCH_CHECK(s.grad().defined(), "fxp::optim::FleetSgd: a parameter stack has no gradient");
    grads.push_back(s.grad().contiguous());
  }
  std::vector<double> lr, momentum, weight_decay;
  std::vector<int64_t> bits, frac, seed, step;
  c10::List<std::string> rounding;
  c10::List<bool> active;
  for (const auto& m : members_) {
    lr.push_back(m.lr), momentum.push_back(m.momentum), weight_decay.push_back(m.weight_decay);
    bits.push_back(m.total_bits), frac.push_back(m.frac_bits), seed.push_back(m.seed), step.push_back(m.step);
    rounding.push_back(m.rounding);
    active.push_back(m.active);
  }
  // Note [Per-member QPU step]: each member as its solo QpuSgd's one group
  // steps it (every tensor has a gradient, so stream k is tensor k).
  last_counts_ = qpu_sgd_members_step_(stacks_, grads, buffers_, lr, momentum, weight_decay, /*nesterov=*/false,
                                       bits, frac, bits, frac, rounding, seed, step, active, momentum_form_);
}

void FleetSgd::sgd_step() {
  // One call over the whole stacks when every member is active and shares
  // its settings and its first-step state (elementwise ops: each element
  // rounds as in its member's solo call); else one call per active member.
  const FleetMemberUpdate& first = members_[0];
  const bool uniform = std::all_of(members_.begin(), members_.end(), [&](const FleetMemberUpdate& m) {
    return m.active && m.lr == first.lr && m.momentum == first.momentum && m.weight_decay == first.weight_decay &&
           (m.step == 0) == (first.step == 0);
  });
  for (size_t k = 0; k < stacks_.size(); ++k) {
    const torch::Tensor& p = stacks_[k];
    TORCH_CHECK(p.grad().defined(), "fxp::optim::FleetSgd: a parameter stack has no gradient");
    const torch::Tensor grad = p.grad();
    const torch::Tensor buffer = buffers_.empty() ? torch::Tensor() : buffers_[k];
    if (uniform) {
      sgd_update(p, grad, buffer, first.lr, first.momentum, first.weight_decay, first.step == 0);
      continue;
    }
    for (size_t m = 0; m < members_.size(); ++m) {
      const FleetMemberUpdate& u = members_[m];
      if (!u.active) continue;
      const auto i = static_cast<int64_t>(m);
      sgd_update(p.select(0, i), grad.select(0, i), buffer.defined() ? buffer.select(0, i) : buffer, u.lr,
                 u.momentum, u.weight_decay, u.step == 0);
    }
  }
}

}  // namespace fxp::optim
