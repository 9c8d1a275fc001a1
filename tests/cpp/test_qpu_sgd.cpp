// fxp::optim::QpuSgd: agreement with the fused op, state round trip, lr changes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

#include "ops.h"
#include "optim/qpu_sgd.h"

namespace {

using fxp::optim::QpuSgd;
using fxp::optim::QpuSgdOptions;

std::vector<torch::Tensor> make_params(int64_t seed) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> params;
  for (int64_t n : {37, 1000, 5}) {
    params.push_back(fxp::quantize(torch::randn({n}), 12, 8).requires_grad_());
  }
  return params;
}

void set_grads(const std::vector<torch::Tensor>& params, int64_t seed) {
  torch::manual_seed(seed);
  for (const auto& p : params) p.mutable_grad() = torch::randn_like(p) * 0.5;
}

QpuSgdOptions options() {
  return QpuSgdOptions(0.05).momentum(0.9).weight_decay(1e-3).total_bits(12).frac_bits(8).seed(21);
}

TEST(QpuSgd, EqualsTheFusedOpWithItsStreams) {
  auto params = make_params(0);
  std::vector<torch::Tensor> direct;
  for (const auto& p : params) direct.push_back(p.detach().clone());
  std::vector<torch::Tensor> buffers;
  for (const auto& p : params) buffers.push_back(torch::zeros_like(p));
  QpuSgd opt(params, options());
  for (int64_t step = 0; step < 4; ++step) {
    set_grads(params, 100 + step);
    std::vector<torch::Tensor> grads;
    for (const auto& p : params) grads.push_back(p.grad().clone());
    opt.step();
    const auto counts = fxp::qpu_sgd_step_(direct, grads, buffers, 0.05, 0.9, 1e-3, false, 12, 8, 12, 8,
                                           "stochastic", 21, step);
    EXPECT_TRUE(torch::equal(counts, opt.last_counts()[0]));
  }
  for (size_t k = 0; k < params.size(); ++k) EXPECT_TRUE(torch::equal(params[k].detach(), direct[k]));
}

TEST(QpuSgd, StateRoundTripContinuesBitIdentically) {
  auto a = make_params(1);
  QpuSgd opt_a(a, options());
  for (int s = 0; s < 3; ++s) {
    set_grads(a, s);
    opt_a.step();
  }
  std::stringstream stream;
  {
    torch::serialize::OutputArchive archive;
    opt_a.save(archive);
    archive.save_to(stream);
  }
  std::vector<torch::Tensor> b;
  for (const auto& p : a) b.push_back(p.detach().clone().requires_grad_());
  QpuSgd opt_b(b, QpuSgdOptions(1.0).seed(999));  // different options, all replaced by the load
  {
    torch::serialize::InputArchive archive;
    archive.load_from(stream);
    opt_b.load(archive);
  }
  EXPECT_EQ(static_cast<QpuSgdOptions&>(opt_b.param_groups()[0].options()).step(), 3);
  for (int s = 3; s < 8; ++s) {
    set_grads(a, s);
    set_grads(b, s);
    opt_a.step();
    opt_b.step();
  }
  for (size_t k = 0; k < a.size(); ++k) EXPECT_TRUE(torch::equal(a[k].detach(), b[k].detach()));
}

TEST(QpuSgd, LearningRateCanChangeBetweenSteps) {
  auto w = torch::zeros({4}).requires_grad_();
  QpuSgd opt({w}, QpuSgdOptions(1.0).rounding("nearest_even").total_bits(16).frac_bits(10));
  for (double lr : {1.0, 0.5, 0.25}) {
    opt.param_groups()[0].options().set_lr(lr);
    const auto before = w.detach().clone();
    w.mutable_grad() = torch::ones({4});
    opt.step();
    EXPECT_TRUE(torch::allclose(before - w.detach(), torch::full({4}, lr)));
  }
}

TEST(QpuSgd, GroupsDrawFromTheirOwnSeeds) {
  auto a = make_params(2);
  auto b = make_params(2);
  QpuSgd opt({torch::optim::OptimizerParamGroup(a), torch::optim::OptimizerParamGroup(b)}, options());
  EXPECT_EQ(static_cast<QpuSgdOptions&>(opt.param_groups()[1].options()).seed(), 22);
  set_grads(a, 5);
  set_grads(b, 5);
  opt.step();
  EXPECT_FALSE(torch::equal(a[1].detach(), b[1].detach()));  // same data, independent draws
}

TEST(QpuSgd, BadOptionsAreRejected) {
  auto w = torch::zeros({4}).requires_grad_();
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).rounding("floor")), c10::Error);
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).nesterov(true)), c10::Error);
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).total_bits(40)), c10::Error);
}

}  // namespace
