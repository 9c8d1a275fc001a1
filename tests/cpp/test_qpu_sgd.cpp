// fxp::optim::QpuSgd: agreement with the fused op, state round trip, lr changes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "ops/ops.h"
#include "optim/qpu_sgd.h"
#include "test_util.h"

#if defined(FXP_WITH_CUDA)
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using fxp::optim::QpuSgd;
using fxp::optim::QpuSgdOptions;
using fxp::testing::expect_error;

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

// An optimizer's checkpoint, and loading one (round_trip in two halves).
std::shared_ptr<std::stringstream> save(const torch::optim::Optimizer& from) {
  auto stream = std::make_shared<std::stringstream>();
  torch::serialize::OutputArchive out;
  from.save(out);
  out.save_to(*stream);
  return stream;
}
void load(QpuSgd& to, std::stringstream& stream) {
  torch::serialize::InputArchive in;
  stream.seekg(0);
  in.load_from(stream);
  to.load(in);
}

// from's state, saved and loaded into to.
void round_trip(const QpuSgd& from, QpuSgd& to) { load(to, *save(from)); }

// Two groups of make_params(seed_a) and make_params(seed_b) with options().
QpuSgd two_groups(std::vector<torch::Tensor>& a, std::vector<torch::Tensor>& b, int64_t seed_a, int64_t seed_b) {
  a = make_params(seed_a);
  b = make_params(seed_b);
  return QpuSgd({torch::optim::OptimizerParamGroup(a), torch::optim::OptimizerParamGroup(b)}, options());
}

int64_t group_step(QpuSgd& opt) { return static_cast<QpuSgdOptions&>(opt.param_groups()[0].options()).step(); }

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

// Note [Capturable QPU step]: the C++ entry point of the capturable form gives
// the plain op's bits, advances the step tensor and counts no NaN on float storage.
TEST(QpuSgdCapturable, EqualsThePlainOpAndAdvancesTheStep) {
  auto params = make_params(3);
  std::vector<torch::Tensor> plain, capt, plain_v, capt_v, grads;
  torch::manual_seed(4);
  for (const auto& p : params) {
    plain.push_back(p.detach().clone());
    capt.push_back(p.detach().clone());
    plain_v.push_back(torch::zeros_like(p));
    capt_v.push_back(torch::zeros_like(p));
    grads.push_back(torch::randn_like(p));
  }
  const torch::Tensor lr = torch::tensor(0.05, torch::kFloat64), step = torch::tensor(int64_t{5});
  const torch::Tensor nans = torch::zeros({}, torch::kLong);
  for (int64_t s = 5; s < 8; ++s) {
    const auto counts = fxp::qpu_sgd_step_(plain, grads, plain_v, 0.05, 0.9, 1e-3, false, 12, 8, 12, 8, "stochastic",
                                           21, s);
    const auto counts2 = fxp::qpu_sgd_step_capturable_(capt, grads, capt_v, lr, step, nans, 0.9, 1e-3, false, 12, 8,
                                                       12, 8, "stochastic", 21);
    EXPECT_TRUE(torch::equal(counts, counts2));
  }
  for (size_t k = 0; k < params.size(); ++k) {
    EXPECT_TRUE(torch::equal(plain[k], capt[k])) << k;
    EXPECT_TRUE(torch::equal(plain_v[k], capt_v[k])) << k;
  }
  EXPECT_EQ(step.item<int64_t>(), 8);
  EXPECT_EQ(nans.item<int64_t>(), 0);
}

// QpuSgd::set_capturable(true) steps through the capturable op: the same bits
// through an lr change, a frozen parameter and a save/load, and the step count
// written back into the options.
TEST(QpuSgdCapturable, OptimizerEqualsThePlainOne) {
  auto a = make_params(5), b = make_params(5);
  QpuSgd plain(a, options()), capt(b, options());
  capt.set_capturable(true);
  auto steps = [&](int from, int to) {
    for (int s = from; s < to; ++s) {
      set_grads(a, 10 + s);
      set_grads(b, 10 + s);
      a[1].mutable_grad() = torch::Tensor();  // frozen: its row of the counts stays zero
      b[1].mutable_grad() = torch::Tensor();
      if (s == 2) {
        plain.param_groups()[0].options().set_lr(0.01);
        capt.param_groups()[0].options().set_lr(0.01);
      }
      plain.step();
      capt.step();
      EXPECT_TRUE(torch::equal(plain.last_counts()[0], capt.last_counts()[0])) << s;
    }
  };
  steps(0, 4);
  // The device step advanced once per step: sync_steps writes it back over a wrong host count.
  static_cast<QpuSgdOptions&>(capt.param_groups()[0].options()).step(0);
  capt.sync_steps();
  EXPECT_EQ(group_step(capt), 4);
  std::vector<torch::Tensor> c;
  for (const auto& p : b) c.push_back(p.detach().clone().requires_grad_());
  QpuSgd loaded(c, QpuSgdOptions(1.0).seed(999));
  loaded.set_capturable(true);
  round_trip(capt, loaded);
  EXPECT_EQ(group_step(loaded), 4);
  steps(4, 6);
  for (int s = 4; s < 6; ++s) {
    set_grads(c, 10 + s);
    c[1].mutable_grad() = torch::Tensor();
    loaded.step();
  }
  for (size_t k = 0; k < a.size(); ++k) {
    EXPECT_TRUE(torch::equal(a[k].detach(), b[k].detach())) << k;
    EXPECT_TRUE(torch::equal(a[k].detach(), c[k].detach())) << k;
  }
  capt.check_nan();  // no NaN: no error
}

#if defined(FXP_WITH_CUDA)
// The C++ optimizer on a GPU: capturable steps equal the CPU's plain ones bit for bit, its state is
// not made under a capture (Note [State made under capture]), and after eager warm-up steps a
// captured step replays the next steps' bits.
TEST(QpuSgdCuda, CapturableStepsEqualCpuAndReplayFromAGraph) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  auto cpu = make_params(6);
  std::vector<torch::Tensor> gpu;
  for (const auto& p : cpu) gpu.push_back(p.detach().cuda().requires_grad_());
  QpuSgd plain(cpu, options()), capt(gpu, options());
  capt.set_capturable(true);
  auto set_both = [&](int64_t seed) {
    set_grads(cpu, seed);
    for (size_t k = 0; k < cpu.size(); ++k) {  // into the same tensors, which a captured step reads
      if (gpu[k].grad().defined()) {
        gpu[k].mutable_grad().copy_(cpu[k].grad());
      } else {
        gpu[k].mutable_grad() = cpu[k].grad().cuda();
      }
    }
  };
  set_both(30);
  {
    at::cuda::CUDAGraph graph;
    const c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool());
    graph.capture_begin();
    expect_error([&] { capt.step(); }, "is made on the first step that needs it");
    try {
      graph.capture_end();
    } catch (const c10::Error&) {  // an empty or broken capture: what matters is the refusal above
    }
  }
  for (int s = 0; s < 2; ++s) {  // eager steps (the warm-up), on a side stream as torch's recipe
    set_both(40 + s);
    plain.step();
    {
      const c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool());
      capt.step();
      torch::cuda::synchronize();
    }
  }
  for (size_t k = 0; k < cpu.size(); ++k) EXPECT_TRUE(torch::equal(cpu[k].detach(), gpu[k].detach().cpu())) << k;
  at::cuda::CUDAGraph graph;
  {
    const c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool());
    graph.capture_begin();
    capt.step();
    graph.capture_end();
  }
  for (int s = 2; s < 5; ++s) {
    set_both(40 + s);
    plain.step();
    graph.replay();
  }
  torch::cuda::synchronize();
  for (size_t k = 0; k < cpu.size(); ++k) EXPECT_TRUE(torch::equal(cpu[k].detach(), gpu[k].detach().cpu())) << k;
}
#endif

TEST(QpuSgdCapturable, PackedNanIsCountedThenRaisedByCheckNan) {
  const torch::Tensor stand_in = torch::zeros({3}).requires_grad_();
  const torch::Tensor codes = torch::tensor({16, 32, -8}, torch::kInt8);
  QpuSgd opt({stand_in}, QpuSgdOptions(0.5).total_bits(8).frac_bits(4).rounding("nearest_even"));
  opt.set_packed_storage(stand_in, codes, 8, 4);
  opt.set_capturable(true);
  stand_in.mutable_grad() = torch::tensor({1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f});
  opt.step();  // no error: the count stays on the device
  EXPECT_EQ(codes[1].item<int>(), 32);  // the NaN element kept its code
  EXPECT_THROW(opt.check_nan(), c10::ValueError);
  opt.check_nan();  // the count was reset
  stand_in.mutable_grad() = torch::full({3}, std::numeric_limits<float>::quiet_NaN());
  opt.step();
  expect_error([&] { opt.check_nan(); }, "fxp::qpu_sgd_step_: 3 updated values are NaN");
}

TEST(QpuSgd, StateRoundTripContinuesBitIdentically) {
  auto a = make_params(1);
  QpuSgd opt_a(a, options());
  for (int s = 0; s < 3; ++s) {
    set_grads(a, s);
    opt_a.step();
  }
  std::vector<torch::Tensor> b;
  for (const auto& p : a) b.push_back(p.detach().clone().requires_grad_());
  QpuSgd opt_b(b, QpuSgdOptions(1.0).seed(999));  // different options, all replaced by the load
  round_trip(opt_a, opt_b);
  EXPECT_EQ(group_step(opt_b), 3);
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
  std::vector<torch::Tensor> a, b;
  QpuSgd opt = two_groups(a, b, 2, 2);
  EXPECT_EQ(static_cast<QpuSgdOptions&>(opt.param_groups()[1].options()).seed(), 22);
  set_grads(a, 5);
  set_grads(b, 5);
  opt.step();
  EXPECT_FALSE(torch::equal(a[1].detach(), b[1].detach()));  // same data, independent draws
  // Keys wrap modulo 2^64, as in Python: the group after INT64_MAX's is INT64_MIN's.
  EXPECT_EQ(fxp::optim::group_seed(std::numeric_limits<int64_t>::max(), 1), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(fxp::optim::group_seed(-1, 1), 0);
}

// A group added later gets its own key too (it drew with group 0's: the same numbers for the same data).
TEST(QpuSgd, AnAddedGroupDrawsFromItsOwnSeed) {
  std::vector<torch::Tensor> a = make_params(2), b = make_params(2);
  QpuSgd opt(a, options());
  opt.add_param_group(torch::optim::OptimizerParamGroup(b));
  EXPECT_EQ(static_cast<QpuSgdOptions&>(opt.param_groups()[1].options()).seed(), 22);
  set_grads(a, 5);
  set_grads(b, 5);
  opt.step();
  EXPECT_FALSE(torch::equal(a[1].detach(), b[1].detach()));
  // A group with its own options keeps its seed; one the step would refuse is not added.
  opt.add_param_group(torch::optim::OptimizerParamGroup(make_params(3), std::make_unique<QpuSgdOptions>(options().seed(7))));
  EXPECT_EQ(static_cast<QpuSgdOptions&>(opt.param_groups()[2].options()).seed(), 7);
  // Options without a seed: the optimizer's seed + the index, as a Python group dict without "seed".
  opt.add_param_group(torch::optim::OptimizerParamGroup(make_params(3), std::make_unique<QpuSgdOptions>(QpuSgdOptions(0.1))));
  EXPECT_EQ(static_cast<QpuSgdOptions&>(opt.param_groups()[3].options()).seed(), 21 + 3);
  std::vector<torch::Tensor> c = make_params(2);
  QpuSgd unseeded(c, QpuSgdOptions(0.1));  // no seed anywhere: 0 + the index
  set_grads(c, 5);
  EXPECT_EQ(static_cast<QpuSgdOptions&>(unseeded.param_groups()[0].options()).seed(), 0);
  static_cast<QpuSgdOptions&>(unseeded.param_groups()[0].options()).seed(std::nullopt);
  expect_error([&] { unseeded.step(); }, "a param group's seed was unset after the group was added");
  expect_error([&] { opt.add_param_group(torch::optim::OptimizerParamGroup(make_params(4), std::make_unique<QpuSgdOptions>(options().lr(-1)))); },
               "lr must be a non-negative finite number");
  EXPECT_EQ(opt.param_groups().size(), 4u);
}

// Checkpoints load in full or not at all: another optimizer's (torch's macro asserted "report a bug to
// PyTorch"), options the step refuses, momentum that does not fit the parameters (refused only at the next
// step, in the op's terms).
TEST(QpuSgd, ALoadRefusesWhatDoesNotFitAndChangesNothing) {
  auto a = make_params(1);
  QpuSgd opt(a, options());
  set_grads(a, 0);
  opt.step();
  auto sgd_params = make_params(1);
  torch::optim::SGD sgd(sgd_params, torch::optim::SGDOptions(0.1).momentum(0.9));
  expect_error([&] { load(opt, *save(sgd)); },
               "fxp::optim::QpuSgd: a param group of the checkpoint lacks 'total_bits', which every QpuSgd group has "
               "(is it another optimizer's checkpoint?)");
  EXPECT_EQ(group_step(opt), 1);  // this optimizer as it was
  // Momentum of other shapes: the same parameters, listed in another order.
  std::vector<torch::Tensor> reordered = {a[1], a[0], a[2]};
  QpuSgd other(reordered, options());
  set_grads(reordered, 1);
  other.step();
  other.step();
  const auto before = opt.state().at(a[0].unsafeGetTensorImpl())->clone();
  expect_error([&] { load(opt, *save(other)); },
               "fxp::optim::QpuSgd: the checkpoint's momentum buffer of parameter 0 of group 0 is Float of shape "
               "[1000], but the parameter is Float of shape [37]");
  EXPECT_EQ(group_step(opt), 1);
  EXPECT_TRUE(torch::equal(
      static_cast<fxp::optim::QpuSgdParamState&>(*opt.state().at(a[0].unsafeGetTensorImpl())).momentum_buffer(),
      static_cast<fxp::optim::QpuSgdParamState&>(*before).momentum_buffer()));
  // Options the step refuses.
  QpuSgd bad(make_params(1), options());
  static_cast<QpuSgdOptions&>(bad.param_groups()[0].options()).lr(-1);
  expect_error([&] { load(opt, *save(bad)); },
               "fxp::optim::QpuSgd: the checkpoint's group 0 has options the step refuses: lr must "
               "be a non-negative finite number");
  QpuSgd unseeded(make_params(1), options());
  static_cast<QpuSgdOptions&>(unseeded.param_groups()[0].options()).seed(std::nullopt);
  expect_error([&] { load(opt, *save(unseeded)); }, "fxp::optim::QpuSgd: the checkpoint's group 0 has no seed");
  opt.step();  // and it still steps
  EXPECT_EQ(group_step(opt), 2);
  // An optimizer that has not stepped (the usual one to load into) keeps no state of a refused checkpoint:
  // torch's serialize keeps what a snapshot restore would not overwrite.
  auto fresh_params = make_params(1);
  QpuSgd fresh(fresh_params, options());
  expect_error([&] { load(fresh, *save(other)); }, "the checkpoint's momentum buffer of parameter 0 of group 0");
  EXPECT_TRUE(fresh.state().empty());
  EXPECT_EQ(group_step(fresh), 0);
  // A refused load keeps the state's tensors themselves (a captured CUDA graph may hold them).
  const torch::Tensor& held =
      static_cast<fxp::optim::QpuSgdParamState&>(*opt.state().at(a[0].unsafeGetTensorImpl())).momentum_buffer();
  const torch::Tensor held_copy = held;
  expect_error([&] { load(opt, *save(other)); }, "the checkpoint's momentum buffer");
  EXPECT_TRUE(static_cast<fxp::optim::QpuSgdParamState&>(*opt.state().at(a[0].unsafeGetTensorImpl()))
                  .momentum_buffer()
                  .is_same(held_copy));
}

// Packed codes are in their group's format: a checkpoint of another format once loaded, and the codes were
// then read in it (each update 3x too large from FxP(12,8) to FxP(16,10)). Float storage may load one.
TEST(QpuSgd, APackedGroupLoadsOnlyItsOwnFormat) {
  const auto hte = [](int64_t bits, int64_t frac) {
    return QpuSgdOptions(1.0).rounding("nearest_even").total_bits(bits).frac_bits(frac);
  };
  auto p = torch::zeros({4}).requires_grad_();
  QpuSgd packed({p}, hte(12, 8));
  packed.set_packed_storage(p, fxp::pack(p.detach(), 12, 8), 12, 8);
  auto q = torch::zeros({4}).requires_grad_();
  QpuSgd wide({q}, hte(16, 10));
  expect_error([&] { load(packed, *save(wide)); },
               "fxp::optim::QpuSgd: the checkpoint's group 0 has format FxP(16,10), but its packed storage holds "
               "codes of FxP(12,8)");
  EXPECT_EQ(static_cast<QpuSgdOptions&>(packed.param_groups()[0].options()).total_bits(), 12);
  auto m = torch::zeros({3, 4}).requires_grad_();
  QpuSgd strided({m}, hte(12, 8));
  expect_error([&] { strided.set_packed_storage(m, fxp::pack(m.detach().t(), 12, 8).t(), 12, 8); },
               "fxp::optim::QpuSgd: the codes must be contiguous");
  auto r = torch::zeros({4}).requires_grad_();
  QpuSgd plain({r}, hte(12, 8));
  load(plain, *save(wide));
  EXPECT_EQ(static_cast<QpuSgdOptions&>(plain.param_groups()[0].options()).total_bits(), 16);
}

TEST(QpuSgd, BadOptionsAreRejected) {
  auto w = torch::zeros({4}).requires_grad_();
  // Named as the optimizer's options, not as the op's arguments.
  expect_error([&] { QpuSgd({w}, QpuSgdOptions(-0.1)); },
               "fxp::optim::QpuSgd: lr must be a non-negative finite number, but got -0.1");
  expect_error([&] { QpuSgd({w}, QpuSgdOptions(0.1).momentum_total_bits(8)); },
               "fxp::optim::QpuSgd: momentum_total_bits and momentum_frac_bits go together (both -1: the parameter "
               "format), but got 8 and -1");
  expect_error([&] { QpuSgd({w}, QpuSgdOptions(0.1).momentum_frac_bits(4)); }, "but got -1 and 4");
  expect_error([&] { QpuSgd({w}, QpuSgdOptions(0.1).rounding("bogus")); },
               "fxp::optim::QpuSgd: rounding must be nearest_even (HTEQPU) or stochastic (SQPU), but got 'bogus'");
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).rounding("floor")), c10::Error);
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).nesterov(true)), c10::Error);
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).total_bits(40)), c10::Error);
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(std::numeric_limits<double>::infinity())), c10::Error);
  EXPECT_THROW(QpuSgd({w}, QpuSgdOptions(0.1).momentum(std::nan(""))), c10::Error);
}

// A sparse gradient (nn::Embedding with sparse) is named by the op, not by a failed .contiguous().
TEST(QpuSgd, ASparseGradientIsNamed) {
  auto w = torch::zeros({4, 2}).requires_grad_();
  QpuSgd opt({w}, QpuSgdOptions(0.1));
  w.mutable_grad() = torch::ones({4, 2}).to_sparse();
  expect_error([&] { opt.step(); }, "parameter 0 of group 0 has a Sparse gradient; the QPU step takes dense ones");
  opt.set_capturable(true);  // the capturable op has no kernel for sparse tensors: the optimizer checks first
  expect_error([&] { opt.step(); }, "parameter 0 of group 0 has a Sparse gradient");
  // The op itself, for callers without the optimizer.
  expect_error([&] { fxp::qpu_sgd_step_({w.detach()}, {w.grad()}, {}, 0.1, 0, 0, false, 16, 10, 16, 10, "stochastic", 0, 0); },
               "grads[0] is a Sparse tensor; the QPU step takes dense ones");
  EXPECT_TRUE(torch::equal(w.detach(), torch::zeros({4, 2})));
}

// A bad value set by hand in a later group is refused before any group steps.
TEST(QpuSgd, ABadLaterGroupChangesNothing) {
  std::vector<torch::Tensor> a, b;
  QpuSgd opt = two_groups(a, b, 2, 3);
  set_grads(a, 5);
  set_grads(b, 6);
  opt.step();
  std::vector<torch::Tensor> before;
  for (const auto& p : a) before.push_back(p.detach().clone());
  opt.param_groups()[1].options().set_lr(-1.0);
  set_grads(a, 7);
  set_grads(b, 8);
  expect_error([&] { opt.step(); }, "lr must be");
  for (size_t k = 0; k < a.size(); ++k) EXPECT_TRUE(torch::equal(a[k].detach(), before[k])) << k;
  EXPECT_EQ(group_step(opt), 1);
  opt.param_groups()[1].options().set_lr(0.05);
  opt.step();  // checked again: fine
  EXPECT_EQ(group_step(opt), 2);
}

// Issue 11: a parameter without a gradient must not shift the draws of the
// others (Note [QPU random streams]), and the counts keep one row per parameter.
TEST(QpuSgd, AParameterWithoutGradientShiftsNoStream) {
  auto all = make_params(3);
  auto some = make_params(3);
  QpuSgd opt_all(all, options()), opt_some(some, options());
  set_grads(all, 7);
  set_grads(some, 7);
  some[0].mutable_grad() = torch::Tensor();  // frozen, or unused in this step
  opt_all.step();
  opt_some.step();
  EXPECT_TRUE(torch::equal(all[1].detach(), some[1].detach()));
  EXPECT_TRUE(torch::equal(all[2].detach(), some[2].detach()));
  const torch::Tensor counts = opt_some.last_counts().at(0);
  ASSERT_EQ(counts.sizes(), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(counts[0].sum().item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(counts.narrow(0, 1, 2), opt_all.last_counts()[0].narrow(0, 1, 2)));
}

TEST(QpuSgd, CountsOfEveryGroupConcatenateToOneRowPerParameter) {
  std::vector<torch::Tensor> a, b;
  QpuSgd opt = two_groups(a, b, 4, 5);
  set_grads(a, 1);
  set_grads(b, 2);
  b[2].mutable_grad() = torch::Tensor();
  opt.step();
  // fxp-train adds torch::cat(last_counts()) into a [n_params, 2] tensor.
  EXPECT_EQ(torch::cat(opt.last_counts()).sizes(), (std::vector<int64_t>{6, 2}));
}

TEST(QpuSgd, AStridedParameterStepsAsItsContiguousCopy) {
  torch::manual_seed(6);
  const torch::Tensor values = fxp::quantize(torch::randn({7, 5}), 12, 8);
  auto strided = values.t().contiguous().t().requires_grad_();  // column-major storage, same values
  auto plain = values.clone().requires_grad_();
  ASSERT_FALSE(strided.is_contiguous());
  QpuSgd opt_s({strided}, options()), opt_p({plain}, options());
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(step);
    const torch::Tensor g = torch::randn({7, 5});
    strided.mutable_grad() = g.clone();
    plain.mutable_grad() = g.clone();
    opt_s.step();
    opt_p.step();
  }
  EXPECT_FALSE(strided.is_contiguous());  // updated in place, layout kept
  EXPECT_TRUE(torch::equal(strided.detach(), plain.detach()));
}

}  // namespace
