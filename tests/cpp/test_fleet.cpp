// Fleets (nn/fleet.h, optim/fleet_sgd.h): each member of a fleet trains as
// its solo run does, step for step, with its own seed, formats, rounding, lr,
// momentum and weight decay.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include "nn/fleet.h"
#include "nn/models.h"
#include "optim/fleet_sgd.h"
#include "optim/qpu_sgd.h"

#include "test_util.h"

namespace {

using fxp::testing::expect_error;

struct MemberSettings {
  int64_t seed;
  int64_t param_bits, param_frac, act_bits, act_frac;
  std::string act_rounding;  // sr | hte
  double lr, momentum, weight_decay;
};

// Four members that differ in everything a fleet lets them differ in.
const std::vector<MemberSettings>& four_members() {
  static const std::vector<MemberSettings> members = {
      {0, 16, 10, 16, 8, "sr", 0.01, 0.9, 5e-4},
      {1, 8, 5, 8, 3, "sr", 0.05, 0.9, 0.0},
      {2, 12, 8, 12, 6, "hte", 0.02, 0.0, 0.0},
      {3, 16, 10, 16, 8, "sr", 0.01, 0.5, 1e-3},
  };
  return members;
}

bool is_qpu(const std::string& method) { return method == "sqpu" || method == "hteqpu"; }

// One member's solo run: its model, its optimizer, and its default generator's state.
struct Solo {
  std::shared_ptr<fxp::nn::NetworkImpl> model;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  at::Generator generator;
};

// Builds member m's solo run (as fxp-train sets one up) and a copy of its model for the fleet.
std::pair<Solo, std::shared_ptr<fxp::nn::NetworkImpl>> make_member(const std::string& method, const MemberSettings& s,
                                                                   torch::Dtype dtype,
                                                                   const std::string& model_name = "paper_cnn") {
  fxp::nn::QuantConfig c;
  c.weight_mode = fxp::nn::weight_mode_for(method);
  c.param_total_bits = s.param_bits, c.param_frac_bits = s.param_frac;
  c.act_total_bits = s.act_bits, c.act_frac_bits = s.act_frac, c.act_rounding = s.act_rounding;
  const std::string rounding = method == "hteqpu" ? "nearest_even" : "stochastic";
  auto build = [&] {  // as set_up_training: seeded, built, on the grid (from the seed)
    torch::manual_seed(static_cast<uint64_t>(s.seed));
    auto model = fxp::nn::make_network(model_name, c, 1, 10);
    model->to(dtype);
    if (is_qpu(method)) model->quantize_parameters_(rounding, s.seed);
    return model;
  };
  auto copy = build();
  auto model = build();
  Solo solo{model, nullptr, at::detail::getDefaultCPUGenerator().clone()};
  if (is_qpu(method)) {
    solo.optimizer = std::make_unique<fxp::optim::QpuSgd>(
        model->parameters(), fxp::optim::QpuSgdOptions(s.lr)
                                 .momentum(s.momentum)
                                 .weight_decay(s.weight_decay)
                                 .total_bits(s.param_bits)
                                 .frac_bits(s.param_frac)
                                 .rounding(rounding)
                                 .seed(s.seed));
  } else {
    solo.optimizer = std::make_unique<torch::optim::SGD>(
        model->parameters(), torch::optim::SGDOptions(s.lr).momentum(s.momentum).weight_decay(s.weight_decay));
  }
  return {std::move(solo), copy};
}

fxp::optim::FleetMemberUpdate update_of(const std::string& method, const MemberSettings& s) {
  fxp::optim::FleetMemberUpdate u;
  u.lr = s.lr, u.momentum = s.momentum, u.weight_decay = s.weight_decay;
  u.total_bits = s.param_bits, u.frac_bits = s.param_frac, u.seed = s.seed;
  u.rounding = method == "hteqpu" ? "nearest_even" : "stochastic";
  return u;
}

// One solo step of member `solo` on (x, y), drawing from its own generator.
void solo_step(Solo& solo, const torch::Tensor& x, const torch::Tensor& y) {
  auto default_generator = at::detail::getDefaultCPUGenerator();
  default_generator.set_state(solo.generator.get_state());
  solo.optimizer->zero_grad();
  torch::nn::functional::cross_entropy(solo.model->forward(x), y).backward();
  solo.optimizer->step();
  solo.generator.set_state(default_generator.get_state());
}

// One fleet step on x [K, N, 1, H, W], y [K, N]: the sum of the members'
// mean losses, forward and backward over chunks of `chunk` members (0: all).
void fleet_step(fxp::nn::NetworkFleet& fleet, fxp::optim::FleetSgd& sgd, const torch::Tensor& x,
                const torch::Tensor& y, int64_t chunk = 0) {
  const int64_t n = x.size(1);
  fleet.forward_backward(x, chunk, [&](const torch::Tensor& logits, const fxp::nn::NetworkFleet::MemberRange& r) {
    return torch::nn::functional::cross_entropy(logits.reshape({r.count * n, -1}),
                                                y.narrow(0, r.first, r.count).reshape({-1}),
                                                torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
           static_cast<double>(n);
  });
  sgd.step();
}

// The largest difference of member m's parameters from its solo run's, relative to the parameter's largest value.
double relative_difference(const fxp::nn::NetworkFleet& fleet, int64_t m, const Solo& solo) {
  double worst = 0;
  const auto solo_params = solo.model->parameters();
  for (size_t k = 0; k < solo_params.size(); ++k) {
    const torch::Tensor a = fleet.parameters()[k].select(0, m).detach().to(torch::kDouble);
    const torch::Tensor b = solo_params[k].detach().to(torch::kDouble);
    const double scale = std::max(b.abs().max().item<double>(), 1e-30);
    worst = std::max(worst, (a - b).abs().max().item<double>() / scale);
  }
  return worst;
}

struct FleetRun {
  int64_t image_size;  // the model's input is image_size x image_size
  std::vector<Solo> solos;
  std::unique_ptr<fxp::nn::NetworkFleet> fleet;
  std::unique_ptr<fxp::optim::FleetSgd> sgd;
};

FleetRun make_run(const std::string& method, const std::vector<MemberSettings>& members, torch::Dtype dtype,
                  const std::string& model_name = "paper_cnn") {
  FleetRun run;
  run.image_size = fxp::nn::network_image_size(model_name);
  std::vector<std::shared_ptr<fxp::nn::NetworkImpl>> models;
  std::vector<at::Generator> generators;
  std::vector<fxp::optim::FleetMemberUpdate> updates;
  for (const auto& s : members) {
    auto [solo, copy] = make_member(method, s, dtype, model_name);
    generators.push_back(solo.generator.clone());
    models.push_back(copy);
    updates.push_back(update_of(method, s));
    run.solos.push_back(std::move(solo));
  }
  run.fleet = std::make_unique<fxp::nn::NetworkFleet>(models, generators);
  run.sgd = std::make_unique<fxp::optim::FleetSgd>(run.fleet->parameters(), updates, is_qpu(method));
  return run;
}

// Each member's own batch of step `step`: images of size x size.
std::pair<torch::Tensor, torch::Tensor> batches(int64_t k, int64_t n, int64_t step, torch::Dtype dtype,
                                                int64_t size = 28) {
  auto g = at::make_generator<at::CPUGeneratorImpl>(1000 + static_cast<uint64_t>(step));
  return {torch::randn({k, n, 1, size, size}, g, torch::dtype(dtype)),
          torch::randint(0, 10, {k, n}, g, torch::kLong)};
}

// Trains `run`'s fleet and its solo runs side by side on the same batches
// (batch_size(step) images per member) and expects every member's parameters
// to be its solo run's bit for bit (or within `tolerance`, relative to the
// tensor's largest value), and to have moved from where they started.
void expect_members_match_solo_runs(FleetRun& run, int64_t steps, const std::function<int64_t(int64_t)>& batch_size,
                                    torch::Dtype dtype, int64_t chunk = 0, double tolerance = 0) {
  const int64_t k = run.fleet->size();
  std::vector<torch::Tensor> start;
  for (const auto& p : run.fleet->parameters()) start.push_back(p.detach().clone());
  for (int64_t step = 0; step < steps; ++step) {
    const auto [x, y] = batches(k, batch_size(step), step, dtype, run.image_size);
    fleet_step(*run.fleet, *run.sgd, x, y, chunk);
    for (int64_t m = 0; m < k; ++m) solo_step(run.solos[static_cast<size_t>(m)], x[m], y[m]);
  }
  for (int64_t m = 0; m < k; ++m) {
    EXPECT_LE(relative_difference(*run.fleet, m, run.solos[static_cast<size_t>(m)]), tolerance) << "member " << m;
    bool moved = false;
    for (size_t t = 0; t < start.size(); ++t) moved = moved || !torch::equal(start[t][m], run.fleet->parameters()[t][m]);
    EXPECT_TRUE(moved) << "member " << m << " did not train";
  }
}

// (model, method)
class FleetMatchesSoloRuns : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {
 protected:
  FleetRun make(const std::vector<MemberSettings>& members, torch::Dtype dtype) {
    return make_run(std::get<1>(GetParam()), members, dtype, std::get<0>(GetParam()));
  }
};

// Note [Fleet forward]: every op of a member sums as its solo op does, so 50
// steps of a fleet of 4 give each member its solo run's parameters bit for
// bit, in float64 as in float32 (below).
TEST_P(FleetMatchesSoloRuns, BitForBitInFloat64Over50Steps) {
  FleetRun run = make(four_members(), torch::kDouble);
  expect_members_match_solo_runs(run, 50, [](int64_t) { return 4; }, torch::kDouble);
}

// A fleet of one runs the solo calls: bit-identical in float32 too.
TEST_P(FleetMatchesSoloRuns, AFleetOfOneIsBitIdenticalInFloat32) {
  FleetRun run = make({four_members()[1]}, torch::kFloat);
  expect_members_match_solo_runs(run, 30, [](int64_t) { return 8; }, torch::kFloat);
}

// Note [Fleet forward]: in float32 too, every member of a fleet of 4 keeps
// its solo run's bits (the first convolution runs per member, the linear
// layers' weight gradients are one mm per member), at batch sizes 1 to 64.
TEST_P(FleetMatchesSoloRuns, BitForBitInFloat32Over32Steps) {
  FleetRun run = make(four_members(), torch::kFloat);
  expect_members_match_solo_runs(run, 32, [](int64_t step) { return int64_t{1} << (2 * (step % 4)); }, torch::kFloat);
}

// Note [Fleet thread counts]: a member's convolution forwards and input
// gradients, its linear layers' forwards and input gradients (and at batch 1
// their weight-gradient products) run on one thread each while its solo run's
// use them all; up to batch 32 (the batches
// sweep trains in fleets on the CPU) oneDNN's and mm's results do not depend
// on the thread count (4 threads: more than this machine's cores, so every
// split the solo calls can make happens).
TEST_P(FleetMatchesSoloRuns, BitForBitInFloat32OnFourThreads) {
  const int threads = at::get_num_threads();
  at::set_num_threads(4);
  ASSERT_EQ(at::get_num_threads(), 4);
  FleetRun run = make(four_members(), torch::kFloat);
  expect_members_match_solo_runs(run, 8, [](int64_t step) { return int64_t{1} << (step % 4 == 3 ? 5 : 2 * (step % 4)); },
                                 torch::kFloat);
  at::set_num_threads(threads);
}

// Note [Fleet calls nested in a parallel region]: the members' calls run with
// one OpenMP thread each, and the caller keeps its own thread count, also
// where a chunk of one member runs the calls inline on the caller's thread
// (chunks of 3 and 1 at batch 1, where the linear layers' weight gradients
// spread over the threads, and at batch 4).
TEST_P(FleetMatchesSoloRuns, LeavesTheThreadCountAsItWas) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  FleetRun run = make(four_members(), torch::kFloat);
  for (const int64_t batch : {1, 4}) {
    const auto [x, y] = batches(run.fleet->size(), batch, 0, torch::kFloat, run.image_size);
    fleet_step(*run.fleet, *run.sgd, x, y, /*chunk=*/3);
    EXPECT_EQ(at::get_num_threads(), 2) << "batch " << batch;
    EXPECT_EQ(omp_get_max_threads(), 2) << "batch " << batch;
  }
  at::set_num_threads(threads);
}

// Note [Fleet thread counts]: at batch 64 on 4 threads oneDNN may split the
// solo second convolution's weight-gradient reduction over the threads, where
// the fleet's grouped call keeps each member's on one: the members then agree
// with their solo runs to float32 rounding, not bit for bit (fp32 and STE's
// master copy; QPU parameters lie on their grid, so there the bound holds only
// while no rounding decision flips, as in these 8 steps).
TEST_P(FleetMatchesSoloRuns, Batch64OnFourThreadsToFloat32Rounding) {
  const int threads = at::get_num_threads();
  at::set_num_threads(4);
  ASSERT_EQ(at::get_num_threads(), 4);
  // four_members with ten times the lr: at batch 64 their nearest-even updates would vanish.
  std::vector<MemberSettings> members = four_members();
  for (auto& m : members) m.lr *= 10;
  FleetRun run = make(members, torch::kFloat);
  expect_members_match_solo_runs(run, 8, [](int64_t) { return 64; }, torch::kFloat, 0, 1e-5);
  at::set_num_threads(threads);
}

// Note [Fleet chunks]: members forwarded and backpropagated a chunk at a
// time (here 3 and 1, so both forms of the first convolution) keep their bits.
TEST_P(FleetMatchesSoloRuns, BitForBitInFloat32InChunks) {
  FleetRun run = make(four_members(), torch::kFloat);
  expect_members_match_solo_runs(run, 16, [](int64_t step) { return int64_t{1} << (2 * (step % 4)); }, torch::kFloat,
                                 /*chunk=*/3);
}

// Compaction moves members into new stacks and changes none of them: the
// members kept go on exactly as in a fleet where the others only stopped.
TEST_P(FleetMatchesSoloRuns, CompactionChangesNoMember) {
  FleetRun compacted = make(four_members(), torch::kDouble);
  FleetRun kept_whole = make(four_members(), torch::kDouble);
  const std::vector<std::shared_ptr<fxp::nn::NetworkImpl>> departed = {compacted.fleet->members()[1],
                                                                        compacted.fleet->members()[3]};
  std::vector<const void*> old_storage;  // the stacks before compaction
  for (int64_t step = 0; step < 20; ++step) {
    if (step == 10) {
      for (const auto& p : compacted.fleet->parameters()) old_storage.push_back(p.storage().data());
      compacted.fleet->keep_members({0, 2});
      compacted.sgd->keep_members({0, 2}, compacted.fleet->parameters());
      kept_whole.sgd->members()[1].active = false;
      kept_whole.sgd->members()[3].active = false;
    }
    const auto [x, y] = batches(4, 4, step, torch::kDouble, compacted.image_size);
    fleet_step(*kept_whole.fleet, *kept_whole.sgd, x, y);
    const torch::Tensor rows = torch::tensor(std::vector<int64_t>{0, 2});
    if (step < 10) {
      fleet_step(*compacted.fleet, *compacted.sgd, x, y);
    } else {
      fleet_step(*compacted.fleet, *compacted.sgd, x.index_select(0, rows), y.index_select(0, rows));
    }
  }
  ASSERT_EQ(compacted.fleet->size(), 2);
  for (const auto& [before, after] : {std::pair<int64_t, int64_t>{0, 0}, {2, 1}}) {
    for (size_t k = 0; k < kept_whole.fleet->parameters().size(); ++k) {
      EXPECT_TRUE(torch::equal(compacted.fleet->parameters()[k][after], kept_whole.fleet->parameters()[k][before]))
          << "member " << before << ", tensor " << k;
    }
  }
  // The members that left keep, in their own models, the values they stopped with.
  for (const int64_t m : {1, 3}) {
    const auto params = departed[static_cast<size_t>(m == 1 ? 0 : 1)]->parameters();
    for (size_t k = 0; k < params.size(); ++k) {
      EXPECT_TRUE(torch::equal(params[k], kept_whole.fleet->parameters()[k][m])) << "member " << m << ", tensor " << k;
      EXPECT_NE(params[k].data_ptr(), compacted.fleet->parameters()[k].data_ptr());
      // Storage of their own: not a view of the stacks they left (which would
      // hold them, unchanged since, just as well), nor of anything larger.
      EXPECT_NE(params[k].storage().data(), old_storage[k]) << "member " << m << ", tensor " << k;
      EXPECT_EQ(params[k].storage().nbytes(), params[k].nbytes()) << "member " << m << ", tensor " << k;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Models, FleetMatchesSoloRuns,
                         ::testing::Combine(::testing::Values("paper_cnn", "lenet5"),
                                            ::testing::Values("fp32", "ste", "sqpu", "hteqpu")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(Fleet, MembersParametersViewTheStacks) {
  FleetRun run = make_run("sqpu", four_members(), torch::kFloat);
  const auto [x, y] = batches(4, 2, 0, torch::kFloat);
  fleet_step(*run.fleet, *run.sgd, x, y);
  const auto member_2 = std::dynamic_pointer_cast<fxp::nn::PaperCNNImpl>(run.fleet->members()[2]);
  ASSERT_TRUE(member_2);
  EXPECT_TRUE(torch::equal(member_2->fc1->linear->weight, run.fleet->parameters()[2][2]));
  EXPECT_EQ(member_2->fc1->linear->weight.data_ptr(), run.fleet->parameters()[2][2].data_ptr());
}

TEST(Fleet, RefusesMixedMethodsAndBadInput) {
  auto [sqpu, sqpu_copy] = make_member("sqpu", four_members()[0], torch::kFloat);
  auto [ste, ste_copy] = make_member("ste", four_members()[1], torch::kFloat);
  std::vector<at::Generator> two = {sqpu.generator, ste.generator};
  expect_error([&] { fxp::nn::NetworkFleet({sqpu_copy, ste_copy}, two); }, "a fleet holds one method");
  expect_error([&] { fxp::nn::NetworkFleet({sqpu_copy}, two); }, "1 members but 2 generators");
  fxp::nn::NetworkFleet fleet({sqpu_copy}, {sqpu.generator});
  expect_error([&] { fleet.forward(torch::zeros({2, 1, 1, 28, 28})); }, "expected input [1, N, 1, 28, 28], got [2,");
  expect_error([&] { fleet.forward(torch::zeros({1, 1, 1, 32, 32})); }, "expected input [1, N, 1, 28, 28], got [1,");
  auto [lenet, lenet_copy] = make_member("sqpu", four_members()[1], torch::kFloat, "lenet5");
  auto [mixed, mixed_copy] = make_member("sqpu", four_members()[1], torch::kFloat);
  mixed_copy->quantized_layers()[2].second->config.act_frac_bits += 1;
  expect_error([&] { fxp::nn::NetworkFleet({sqpu_copy, mixed_copy}, two); },
               "member 1's layer fc1 has a format of its own");
  const std::vector<torch::Tensor> no_params;
  expect_error([&] { fleet.forward_members(torch::zeros({1, 1, 1, 28, 28}), {1, 1}, fleet.parameters()); },
               "members 1 to 1 of a fleet of 1");
  expect_error([&] { fleet.forward_members(torch::zeros({1, 1, 1, 28, 28}), {0, 1}, no_params); },
               "expected 6 parameter tensors, got 0");
  expect_error([&] { fxp::nn::NetworkFleet({sqpu_copy, lenet_copy}, two); }, "member 1 is a lenet5, member 0 a paper_cnn");
  fxp::nn::QuantConfig c;
  c.weight_mode = fxp::nn::WeightMode::Qpu;
  expect_error([&] { fxp::nn::NetworkFleet({fxp::nn::make_network("resnet20", c, 1, 10)}, {sqpu.generator}); },
               "fleets train paper_cnn and lenet5, not resnet20");
  const auto no_loss = [](const torch::Tensor& logits, const fxp::nn::NetworkFleet::MemberRange&) {
    return logits.sum();
  };
  expect_error([&] { fleet.forward_backward(torch::zeros({1, 1, 1, 28, 28}), -1, no_loss); },
               "the chunk size must be at least 0 (0: all members), got -1");
}

}  // namespace
