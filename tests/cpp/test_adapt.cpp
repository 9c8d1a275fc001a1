// AdaPT's precision-switching rules (csrc/adapt/precision.h) on hand-computed
// cases and against brute force.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "adapt/controller.h"
#include "adapt/precision.h"
#include "nn/models.h"
#include "ops/ops.h"

#include "test_util.h"

namespace {

namespace fa = fxp::adapt;
using fxp::testing::expect_error;

TEST(AdaptKl, ZeroForALosslessQuantizationPositiveOtherwise) {
  // Multiples of 1/8 in [-1, 1): exact at FL = 3, so KL is 0 at any resolution.
  const auto w = torch::arange(-8, 8, torch::kDouble) / 8;
  for (int64_t r : {1, 7, 50, 150}) EXPECT_EQ(fa::quantization_kl(w, {0, 3}, r), 0.0) << r;
  EXPECT_EQ(fa::quantization_kl(w, {8, 4}, 150), 0.0);
  // FL = 1 rounds 1/8 and 3/8 to 0 and 1/2: bins that held them empty out.
  EXPECT_GT(fa::quantization_kl(w, {0, 1}, 16), 0.0);
  // Saturation at FxP(2, 1) (range [-1, 0.5]) piles the top values in one bin.
  EXPECT_GT(fa::quantization_kl(w, {2, 1}, 4), 0.0);
  // At resolution 1 every quantization is lossless: one bin holds everything.
  EXPECT_EQ(fa::quantization_kl(w, {0, 0}, 1), 0.0);
}

TEST(AdaptKl, DiscreteKlByHand) {
  const auto p = torch::tensor({2.0, 2.0, 0.0}), q = torch::tensor({1.0, 3.0, 0.0});
  // P = (1/2, 1/2), Q = (1/4, 3/4): 1/2 log 2 + 1/2 log(2/3).
  EXPECT_NEAR(fa::kl_divergence(p, q), 0.5 * std::log(2.0) + 0.5 * std::log(2.0 / 3.0), 1e-15);
  EXPECT_EQ(fa::kl_divergence(q, q), 0.0);
  EXPECT_EQ(fa::kl_divergence(torch::tensor({1.0, 1.0}), torch::tensor({2.0, 0.0})),
            std::numeric_limits<double>::infinity());
  // Values past the range count in the end bins.
  EXPECT_TRUE(torch::equal(fa::histogram(torch::tensor({-5.0, 0.1, 0.9, 7.0}), 0, 1, 2),
                           torch::tensor({2, 2}, torch::kLong)));
}

// Note [Fused quantize and histogram]: one pass equals rounding with
// round_to_format and binning with torch.histc, count for count, for float32
// and float64 weights, with and without saturation, and for values that fall
// on bin edges and beyond the range.
TEST(AdaptKl, FusedHistogramEqualsRoundThenHistc) {
  torch::manual_seed(3);
  int compared = 0;
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    for (int trial = 0; trial < 40; ++trial) {
      auto w = (torch::randn({1000 + 37 * trial}, torch::kDouble) * std::ldexp(1.0, trial % 5 - 2)).to(dtype);
      // Exact multiples of the bin width land on edges.
      w.narrow(0, 0, 64).copy_(torch::arange(-32, 32, torch::kDouble) / 8);
      const int64_t r = 1 + 17 * (trial % 9);
      const double lo = w.min().item<double>() * 0.75, hi = w.max().item<double>() * 0.75;  // some values beyond
      for (int64_t frac : {0, 1, 3, 7, 12, 31}) {
        for (int64_t bits : {int64_t{0}, frac + 1, frac + 3, int64_t{32}}) {
          if (bits > 32 || (bits != 0 && bits < 2)) continue;
          const auto fused = fxp::format_histogram(w, r, lo, hi, std::vector<int64_t>{bits, frac});
          const auto composed =
              at::histc(fa::round_to_format(w, bits, frac).clamp(lo, hi), r, lo, hi).to(torch::kLong);
          ASSERT_TRUE(torch::equal(fused, composed)) << "dtype " << dtype << " trial " << trial << " FxP(" << bits
                                                     << ", " << frac << ")";
          ++compared;
        }
      }
      ASSERT_TRUE(torch::equal(fxp::format_histogram(w, r, lo, hi),
                               at::histc(w.to(torch::kDouble).clamp(lo, hi), r, lo, hi).to(torch::kLong)));
    }
  }
  EXPECT_GT(compared, 1500);
  // NaN counts nowhere; infinities count in the end bins.
  const double inf = std::numeric_limits<double>::infinity();
  const auto special = torch::tensor({std::nan(""), -inf, inf, 0.5});
  EXPECT_TRUE(torch::equal(fxp::format_histogram(special, 2, 0, 1), torch::tensor({1, 2}, torch::kLong)));
  expect_error([] { fxp::format_histogram(torch::ones({3}), 0, 0, 1); }, "bins must be in [1, 2^24]");
  expect_error([] { fxp::format_histogram(torch::ones({3}), 4, 1, 1); }, "min < max");
  expect_error([] { fxp::format_histogram(torch::ones({3}), 4, 0, 1, std::vector<int64_t>{4, 4}); },
               "is not a format");
  expect_error([] { fxp::format_histogram(torch::ones({3}, torch::kInt), 4, 0, 1); }, "must be floating point");
}

// The brute-force minimum: the smallest FL whose rounding is lossless, then the
// smallest BW at that FL; `monotone` says whether losslessness never fails
// again at a finer FL (where bisection must agree).
struct BruteForce {
  fa::Format format;
  bool monotone;
};
BruteForce brute_force(const torch::Tensor& w, int64_t r) {
  std::vector<bool> ok(32);
  for (int64_t f = 0; f < 32; ++f) ok[f] = fa::quantization_kl(w, {0, f}, r) == 0.0;
  int64_t frac = 31;
  for (int64_t f = 0; f < 32; ++f) {
    if (ok[f]) {
      frac = f;
      break;
    }
  }
  bool monotone = true;
  for (int64_t f = frac; f < 32; ++f) monotone = monotone && ok[f];
  int64_t bits = 32;
  for (int64_t b = std::max<int64_t>(frac + 1, 2); b <= 32; ++b) {
    if (fa::quantization_kl(w, {b, frac}, r) == 0.0) {
      bits = b;
      break;
    }
  }
  return {{bits, frac}, monotone};
}

TEST(AdaptPushDown, BisectionEqualsBruteForce) {
  torch::manual_seed(0);
  int compared = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const double scale = std::ldexp(1.0, trial % 7 - 3);
    const auto w = torch::randn({5 + trial % 23}, torch::kDouble) * scale;
    const int64_t r = 5 + 13 * (trial % 11);
    const BruteForce expected = brute_force(w, r);
    if (!expected.monotone) continue;
    const fa::Format got = fa::push_down(w, r);
    EXPECT_EQ(got.frac, expected.format.frac) << trial;
    EXPECT_EQ(got.bits, expected.format.bits) << trial;
    ++compared;
  }
  EXPECT_GE(compared, 40) << "too few monotone cases to compare";
  // Integers: FL_min 0, where BW's search starts at 2, not FL + 1 = 1.
  const auto integers = torch::arange(-3, 4, torch::kDouble);
  const BruteForce expected = brute_force(integers, 7);
  EXPECT_EQ(expected.format, (fa::Format{3, 0}));
  EXPECT_EQ(fa::push_down(integers, 7), expected.format);
}

TEST(AdaptPushDown, GridValuesNeedTheirOwnBits) {
  // Multiples of 1/16 spanning [-3, 3]: FL_min 4; 3 needs 2 integer bits and a sign: BW_min 7.
  const auto w = torch::arange(-48, 49, torch::kDouble) / 16;
  const fa::Format f = fa::push_down(w, 97);
  EXPECT_EQ(f.frac, 4);
  EXPECT_EQ(f.bits, 7);
  // A constant 2: exact at FL 0, and BW 3 holds it (FxP(2, 0) saturates it to 1).
  EXPECT_EQ(fa::push_down(torch::full({4}, 2.0), 50), (fa::Format{3, 0}));
  expect_error([] { fa::push_down(torch::tensor({1.0, std::nan("")}), 10); }, "NaN or infinite");
  expect_error([] { fa::push_down(torch::empty({0}), 10); }, "empty");
  expect_error([] { fa::push_down(torch::ones({3}), 0); }, "at least 1 bin");
}

TEST(AdaptGradientDiversity, Eq35EqualsEq33OnStoredNormalizedGradients) {
  torch::manual_seed(1);
  for (int64_t lb : {1, 3, 25}) {
    std::vector<torch::Tensor> grads;
    torch::Tensor accumulated = torch::zeros({40}, torch::kDouble);
    for (int64_t k = 0; k < lb; ++k) {
      auto g = torch::randn({40}, torch::kDouble) + 0.5;
      g = g / g.norm();  // Eq. 3.4
      grads.push_back(g);
      accumulated += g;
    }
    double sum_of_norms = 0;
    for (const auto& g : grads) sum_of_norms += g.norm().item<double>();
    const double eq33 = sum_of_norms / torch::stack(grads).sum(0).norm().item<double>();
    EXPECT_NEAR(fa::gradient_diversity(lb, accumulated), eq33, 1e-12 * eq33) << lb;
    EXPECT_GE(fa::gradient_diversity(lb, accumulated), 1.0 - 1e-12);
  }
  EXPECT_EQ(fa::gradient_diversity(2, torch::zeros({3})), std::numeric_limits<double>::infinity());
}

TEST(AdaptPushUp, SuggestionsByHand) {
  // GD 16: log2 16 - 1 = 3: s1 = ceil(1/3) = 1, s2 = ceil(min(96, 32)) - FL_min = 32 - 5 = 27.
  auto s = fa::push_up_suggestions(16.0, 5, fa::LogForm::Log2);
  EXPECT_EQ(s.s1, 1);
  EXPECT_EQ(s.s2, 27);
  EXPECT_EQ(fa::push_up_step(s, fa::Strategy::Min), 1);
  EXPECT_EQ(fa::push_up_step(s, fa::Strategy::Mean), 14);
  EXPECT_EQ(fa::push_up_step(s, fa::Strategy::Max), 27);
  // GD 2.5: X = log2 2.5 - 1 = 0.3219: s1 = ceil(3.106) = 4, s2 = ceil(10.30) - 8 = 3.
  s = fa::push_up_suggestions(2.5, 8, fa::LogForm::Log2);
  EXPECT_EQ(s.s1, 4);
  EXPECT_EQ(s.s2, 3);
  EXPECT_EQ(fa::push_up_step(s, fa::Strategy::Mean), 4);  // ceil(3.5)
  // The authors' reading: X = (ln 10 - 1)^2 = 1.6957: s1 = 1, s2 = 32 - 4.
  s = fa::push_up_suggestions(10.0, 4, fa::LogForm::SquaredLn);
  EXPECT_EQ(s.s1, 1);
  EXPECT_EQ(s.s2, 28);
  // ... where ln GD - 1 <= 0 (GD = 2 < e) is one bit, before any squaring.
  s = fa::push_up_suggestions(2.0, 4, fa::LogForm::SquaredLn);
  EXPECT_EQ(s.s1, 1);
  EXPECT_EQ(s.s2, 1);
  // GD = e * 1.0001: X = 1e-8: s1 capped at 32 (no overflow), s2 = 1.
  s = fa::push_up_suggestions(std::exp(1.0) * 1.0001, 4, fa::LogForm::SquaredLn);
  EXPECT_EQ(s.s1, 32);
  EXPECT_EQ(s.s2, 1);
  // Aligned gradients (GD <= 2 with log2; GD = 1 for identical ones): one bit.
  s = fa::push_up_suggestions(1.5, 3, fa::LogForm::Log2);
  EXPECT_EQ(s.s1, 1);
  EXPECT_EQ(s.s2, 1);
  // Gradients that cancel (GD infinite).
  s = fa::push_up_suggestions(std::numeric_limits<double>::infinity(), 6, fa::LogForm::Log2);
  EXPECT_EQ(s.s1, 1);
  EXPECT_EQ(s.s2, 26);
}

TEST(AdaptPushUp, NewFormatAndRangeBuffer) {
  // PD found <6, 3>; PU by 2: FL 5, BW max(6, 5) + 1 = 7; buffer 4: FL min(5, 28) = 5, BW max(min(9, 32), 7) = 9.
  EXPECT_EQ(fa::push_up({6, 3}, 2, 4), (fa::Format{9, 5}));
  // Near the top: FL min(30 + 5, 32) = 32, BW 32; buffer 8: FL 24, BW max(32, 32) = 32.
  EXPECT_EQ(fa::push_up({31, 30}, 5, 8), (fa::Format{32, 24}));
  // A wide range: BW = BW_min + 1 = 21 stays above FL + buffer = 7.
  EXPECT_EQ(fa::push_up({20, 2}, 1, 4), (fa::Format{21, 3}));
  expect_error([] { fa::push_up({8, 4}, 1, 0); }, "buffer bits must be in [1, 31]");
}

TEST(AdaptStrategy, LossHeuristicByHand) {
  using S = fa::Strategy;
  EXPECT_EQ(fa::adapt_strategy(S::Min, 1.0, 1.2), S::Mean);   // no better than the average
  EXPECT_EQ(fa::adapt_strategy(S::Mean, 1.0, 1.0), S::Max);
  EXPECT_EQ(fa::adapt_strategy(S::Max, 1.0, 1.5), S::Max);
  EXPECT_EQ(fa::adapt_strategy(S::Max, 1.0, 0.9), S::Min);    // better: back to min
  EXPECT_EQ(fa::adapt_strategy(S::Mean, -2.0, 1.0), S::Min);  // magnitudes are compared
  EXPECT_EQ(fa::strategy_from_string("mean"), S::Mean);
  expect_error([] { fa::strategy_from_string("median"); }, "strategy must be min, mean or max");
}

TEST(AdaptLookbackAndResolution, ByHand) {
  const fa::Bounds lb{25, 100}, r{50, 150};
  // GD 2: lb_new = ceil(100 / 2) = 50; lb = ceil(0.33 * 50 + 0.67 * 25) = ceil(33.25) = 34.
  EXPECT_EQ(fa::adapt_lookback(25, 2.0, lb, 0.33), 34);
  // GD 1 (identical gradients): lb_new = 100; from 100 it stays 100 (no rounding up past it).
  EXPECT_EQ(fa::adapt_lookback(100, 1.0, lb, 0.33), 100);
  // GD 8: lb_new = max(ceil(12.5), 25) = 25; from 25 it stays 25.
  EXPECT_EQ(fa::adapt_lookback(25, 8.0, lb, 0.33), 25);
  EXPECT_EQ(fa::adapt_lookback(60, std::numeric_limits<double>::infinity(), lb, 1.0), 25);  // cancelling gradients
  // No diversity (or none measured): the longest lookback, where an infinite ratio's int64 was undefined.
  EXPECT_EQ(fa::adapt_lookback(60, 0.0, lb, 1.0), 100);
  EXPECT_EQ(fa::adapt_lookback(60, std::nan(""), lb, 1.0), 100);
  EXPECT_EQ(fa::adapt_resolution(70, 100, lb, r), 71);
  EXPECT_EQ(fa::adapt_resolution(70, 25, lb, r), 69);
  EXPECT_EQ(fa::adapt_resolution(70, 60, lb, r), 70);
  EXPECT_EQ(fa::adapt_resolution(150, 100, lb, r), 150);
  EXPECT_EQ(fa::adapt_resolution(50, 25, lb, r), 50);
  expect_error([] { fa::adapt_lookback(10, 2.0, {0, 5}, 0.3); }, "lookback bounds [0, 5]");
}

}  // namespace

// ---- the controller ------------------------------------------------------------

namespace {

fxp::nn::QuantConfig ste() {
  fxp::nn::QuantConfig c;
  c.weight_mode = fxp::nn::WeightMode::Ste;
  return c;
}

// One training step's backward on random data.
double backward(fxp::nn::NetworkImpl& net, int64_t seed) {
  torch::manual_seed(seed);
  net.zero_grad();
  const auto x = torch::randn({8, 1, 32, 32});
  const auto y = torch::randint(0, 10, {8}, torch::kLong);
  const auto loss = torch::nn::functional::cross_entropy(net.forward(x), y);
  loss.backward();
  return loss.item<double>();
}

TEST(AdaptController, StartsEveryLayerAtTheStartFormat) {
  auto net = fxp::nn::make_network("resnet20", ste(), 3, 10);
  fa::AdaptOptions o;
  o.start = {10, 6};
  fa::Controller controller(*net, o);
  EXPECT_EQ(controller.layers().size(), 21u + 21u + 1u);  // convs, batch norms, the linear layer
  for (const auto& [name, layer] : net->quantized_layers()) {
    EXPECT_EQ(layer->config.param_total_bits, 10) << name;
    EXPECT_EQ(layer->config.act_frac_bits, 6) << name;  // activations at the weights' format, adds included
  }
}

// The switch a layer makes equals the rules applied by hand to the normalized
// gradients stored here (Eq. 3.3 directly, not the accumulator).
TEST(AdaptController, SwitchEqualsTheRulesAppliedByHand) {
  auto net = fxp::nn::make_network("lenet5", ste(), 1, 10);
  fa::AdaptOptions o;
  o.lookback = {2, 4};
  o.resolution = {20, 30};
  o.buffer_bits = 3;
  fa::Controller controller(*net, o);
  const size_t n_layers = controller.layers().size();
  std::vector<std::vector<torch::Tensor>> normalized(n_layers);  // per layer, per step: the flat gradient
  double losses[2];
  for (int step = 0; step < 2; ++step) {
    losses[step] = backward(*net, 10 + step);
    controller.after_backward(losses[step], 8);
    for (size_t i = 0; i < n_layers; ++i) {
      std::vector<torch::Tensor> flat;
      for (const auto& p : controller.layers()[i].parameters) flat.push_back(p.grad().flatten().to(torch::kDouble));
      normalized[i].push_back(torch::cat(flat));
      EXPECT_NEAR(normalized[i].back().norm().item<double>(), 1.0, 1e-6) << "Eq. 3.4";
    }
  }
  for (size_t i = 0; i < n_layers; ++i) {
    const auto& l = controller.layers()[i];
    ASSERT_EQ(l.switches, 1) << l.name;
    EXPECT_EQ(l.count, 0);
    const double eq33 = (normalized[i][0].norm() + normalized[i][1].norm()).item<double>() /
                        (normalized[i][0] + normalized[i][1]).norm().item<double>();
    EXPECT_NEAR(l.gradient_diversity, eq33, 1e-5 * eq33) << l.name;
    const int64_t lookback = fa::adapt_lookback(2, l.gradient_diversity, o.lookback, o.lookback_momentum);
    EXPECT_EQ(l.lookback, lookback);
    EXPECT_EQ(l.resolution, fa::adapt_resolution(20, lookback, o.lookback, o.resolution));
    std::vector<torch::Tensor> flat;
    for (const auto& p : l.parameters) flat.push_back(p.detach().flatten());
    EXPECT_EQ(l.minimum, fa::push_down(torch::cat(flat), l.resolution)) << l.name;
    // The strategy is still min: before step 2 the history held one loss, fewer than lb_avg = 2.
    EXPECT_EQ(controller.strategy(), fa::Strategy::Min);
    const auto step = fa::push_up_step(fa::push_up_suggestions(l.gradient_diversity, l.minimum.frac, o.log_form),
                                       controller.strategy());
    EXPECT_EQ(l.format, fa::push_up(l.minimum, step, 3)) << l.name;
    EXPECT_EQ(controller.quantized_layer(i).config.param_total_bits, l.format.bits);
    EXPECT_EQ(controller.quantized_layer(i).config.act_frac_bits, l.format.frac);
  }
}

// True where every element of t lies on FxP(bits, frac)'s grid and range.
bool on_grid(const torch::Tensor& t, fa::Format f) {
  return torch::equal(t.to(torch::kDouble), fa::round_to_format(t, f.bits, f.frac));
}

// Note [QPU format change]: a coarser format rounds parameters and momentum
// onto its grid (stochastically: some values up, some down, no others), a
// finer one of at least the same range changes nothing, packed storage refuses.
TEST(AdaptQuantizedUpdates, ChangeFormatRoundsParametersAndMomentum) {
  torch::manual_seed(0);
  auto w = fxp::quantize(torch::randn({4000}), 12, 8).requires_grad_();
  fxp::optim::QpuSgd opt({w}, fxp::optim::QpuSgdOptions(0.01).momentum(0.9).total_bits(12).frac_bits(8));
  w.mutable_grad() = torch::randn({4000});
  opt.step();
  const auto& state = static_cast<fxp::optim::QpuSgdParamState&>(*opt.state().at(w.unsafeGetTensorImpl()));
  const auto before = w.detach().clone();
  opt.change_format(0, 8, 4);
  EXPECT_TRUE(on_grid(w.detach(), {8, 4}));
  EXPECT_TRUE(on_grid(state.momentum_buffer(), {8, 4}));
  const auto moved = w.detach().to(torch::kDouble);
  const auto floor_grid = torch::floor(before.to(torch::kDouble) * 16) / 16;
  EXPECT_TRUE(torch::logical_or(moved == floor_grid, moved == floor_grid + 1.0 / 16).all().item<bool>())
      << "each value goes to one of its two neighbours on the new grid";
  EXPECT_TRUE((moved != floor_grid).any().item<bool>() && (moved == floor_grid).any().item<bool>())
      << "stochastic: some values down, some up";
  const auto& o = static_cast<const fxp::optim::QpuSgdOptions&>(opt.param_groups()[0].options());
  EXPECT_EQ(o.total_bits(), 8);
  EXPECT_EQ(o.frac_bits(), 4);
  // A finer grid with a wider range: nothing moves.
  const auto coarse = w.detach().clone(), coarse_momentum = state.momentum_buffer().clone();
  opt.change_format(0, 16, 10);
  EXPECT_TRUE(torch::equal(w.detach(), coarse));
  EXPECT_TRUE(torch::equal(state.momentum_buffer(), coarse_momentum));
  expect_error([&] { opt.change_format(1, 8, 4); }, "change_format of group 1, but there are 1");
  expect_error([&] { opt.change_format(0, 4, 4); }, "frac");
  // Packed storage keeps its codes' format: refused before anything changes.
  auto a = fxp::quantize(torch::randn({8}), 8, 4).requires_grad_(), b = fxp::quantize(torch::randn({8}), 8, 4);
  b.requires_grad_();
  fxp::optim::QpuSgd packed({a, b}, fxp::optim::QpuSgdOptions(0.01).total_bits(8).frac_bits(4));
  packed.set_packed_storage(b, fxp::pack(b.detach(), 8, 4), 8, 4);
  const auto a_before = a.detach().clone();
  expect_error([&] { packed.change_format(0, 6, 2); }, "cannot change the format of packed storage");
  EXPECT_TRUE(torch::equal(a.detach(), a_before)) << "the group changed before the refusal";
}

// The momentum follows a format change when its format is the parameters',
// unset or set to the same (as in fxp.optim.QPUSGD); another one stays.
TEST(AdaptQuantizedUpdates, MomentumFollowsAFormatChangeWhenItIsTheParameterFormat) {
  for (const bool same : {true, false}) {
    torch::manual_seed(1);
    auto w = fxp::quantize(torch::randn({512}), 12, 8).requires_grad_();
    fxp::optim::QpuSgd opt({w}, fxp::optim::QpuSgdOptions(0.01).momentum(0.9).total_bits(12).frac_bits(8)
                                    .momentum_total_bits(12).momentum_frac_bits(same ? 8 : 9));
    w.mutable_grad() = torch::randn({512});
    opt.step();
    const auto& state = static_cast<fxp::optim::QpuSgdParamState&>(*opt.state().at(w.unsafeGetTensorImpl()));
    const auto momentum = state.momentum_buffer().clone();
    const auto before = w.detach().clone();
    opt.change_format(0, 8, 4);
    EXPECT_TRUE(on_grid(w.detach(), {8, 4}));  // the parameters move either way
    EXPECT_FALSE(torch::equal(w.detach(), before));
    const auto& o = static_cast<const fxp::optim::QpuSgdOptions&>(opt.param_groups()[0].options());
    if (same) {
      EXPECT_TRUE(on_grid(state.momentum_buffer(), {8, 4}));
      EXPECT_FALSE(torch::equal(state.momentum_buffer(), momentum));
      EXPECT_EQ(o.momentum_total_bits(), 8);
      EXPECT_EQ(o.momentum_frac_bits(), 4);
    } else {
      EXPECT_TRUE(torch::equal(state.momentum_buffer(), momentum));
      EXPECT_EQ(o.momentum_total_bits(), 12);
      EXPECT_EQ(o.momentum_frac_bits(), 9);
    }
  }
}

// Note [AdaPT with QPU]: the optimizer's groups follow their layers' formats
// through the switches, and the parameters stay on their layer's grid.
TEST(AdaptQuantizedUpdates, GroupsFollowTheLayersAndParametersStayOnTheirGrid) {
  fxp::nn::QuantConfig qc;
  qc.weight_mode = fxp::nn::WeightMode::Qpu;
  qc.param_total_bits = qc.act_total_bits = 8;
  qc.param_frac_bits = qc.act_frac_bits = 4;
  auto net = fxp::nn::make_network("lenet5", qc, 1, 10);
  net->quantize_parameters_("stochastic", 0);
  fa::AdaptOptions o;
  o.lookback = {2, 3};
  o.resolution = {20, 30};
  fa::Controller controller(*net, o);
  const auto defaults = fxp::optim::QpuSgdOptions(0.05).momentum(0.9).seed(7);
  fxp::optim::QpuSgd opt(controller.parameter_groups(defaults), defaults);
  for (size_t i = 0; i < opt.param_groups().size(); ++i) {  // each layer's group its own key, as QpuSgd's groups
    EXPECT_EQ(static_cast<const fxp::optim::QpuSgdOptions&>(opt.param_groups()[i].options()).seed(),
              7 + static_cast<int64_t>(i));
  }
  controller.use_quantized_updates(opt);
  // A momentum format in the defaults is not the groups': theirs follows their layer's (as in Python).
  auto explicit_momentum = defaults;
  explicit_momentum.momentum_total_bits(16).momentum_frac_bits(10);
  for (const auto& g : controller.parameter_groups(explicit_momentum)) {
    EXPECT_EQ(static_cast<const fxp::optim::QpuSgdOptions&>(g.options()).momentum_total_bits(), -1);
  }
  int64_t changed = 0;
  for (int step = 0; step < 9; ++step) {
    const double loss = backward(*net, 20 + step);
    controller.step(loss, 8, opt);  // Note [AdaPT's fused QPU step]
    for (size_t i = 0; i < controller.layers().size(); ++i) {
      const auto& l = controller.layers()[i];
      const auto& g = static_cast<const fxp::optim::QpuSgdOptions&>(opt.param_groups()[i].options());
      ASSERT_EQ(g.total_bits(), l.format.bits) << l.name;
      ASSERT_EQ(g.frac_bits(), l.format.frac) << l.name;
      for (const auto& p : l.parameters) ASSERT_TRUE(on_grid(p.detach(), l.format)) << l.name << " step " << step;
      changed += !(l.format == fa::Format{8, 4});
    }
  }
  EXPECT_GT(changed, 0) << "no layer left the start format: the test shows nothing";
  // A plain optimizer over the model is refused.
  fxp::optim::QpuSgd whole(net->parameters(), defaults);
  expect_error([&] { controller.use_quantized_updates(whole); }, "one per adapted layer");
}

// Note [AdaPT's fused QPU step]: controller.step with the quantized-update
// optimizer equals after_backward followed by its plain step, bit for bit
// (parameters, momentum, accumulators, counts), while no layer switches; .grad stays raw.
TEST(AdaptQuantizedUpdates, FusedStepEqualsAfterBackwardThenQpuStep) {
  fxp::nn::QuantConfig qc;
  qc.weight_mode = fxp::nn::WeightMode::Qpu;
  qc.param_total_bits = qc.act_total_bits = 12;
  qc.param_frac_bits = qc.act_frac_bits = 8;
  fa::AdaptOptions o;
  o.start = {12, 8};
  o.lookback = {100, 100};  // no switch in these steps: the two forms switch at different points
  o.l1 = 1e-4;
  torch::manual_seed(0);
  auto fused_net = fxp::nn::make_network("lenet5", qc, 1, 10);
  auto plain_net = fxp::nn::make_network("lenet5", qc, 1, 10);
  fused_net->quantize_parameters_("stochastic", 0);
  {
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < fused_net->parameters().size(); ++k) {
      plain_net->parameters()[k].copy_(fused_net->parameters()[k]);
    }
  }
  fa::Controller fused(*fused_net, o), plain(*plain_net, o);
  const auto defaults = fxp::optim::QpuSgdOptions(0.05).momentum(0.9).weight_decay(5e-4).seed(7);
  fxp::optim::QpuSgd fused_opt(fused.parameter_groups(defaults), defaults);
  fxp::optim::QpuSgd plain_opt(plain.parameter_groups(defaults), defaults);
  fused.use_quantized_updates(fused_opt);
  int64_t moved = 0;
  for (int step = 0; step < 4; ++step) {
    const torch::Tensor before = fused_net->parameters().front().detach().clone();
    const double loss = backward(*fused_net, 80 + step);
    const torch::Tensor raw = fused_net->parameters().front().grad().clone();
    fused.step(loss, 8, fused_opt);
    EXPECT_TRUE(torch::equal(fused_net->parameters().front().grad(), raw)) << "the fused step writes no gradient";
    moved += !torch::equal(fused_net->parameters().front().detach(), before);
    plain.after_backward(backward(*plain_net, 80 + step), 8);
    plain_opt.step();
    for (size_t g = 0; g < fused_opt.last_counts().size(); ++g) {
      EXPECT_TRUE(torch::equal(fused_opt.last_counts()[g], plain_opt.last_counts()[g])) << "group " << g;
    }
  }
  EXPECT_GT(moved, 0) << "no update moved a parameter: the test shows nothing";
  for (size_t k = 0; k < fused_net->parameters().size(); ++k) {
    const torch::Tensor p = fused_net->parameters()[k], q = plain_net->parameters()[k];
    EXPECT_TRUE(torch::equal(p, q)) << "parameter " << k;
    const auto& pm = static_cast<const fxp::optim::QpuSgdParamState&>(*fused_opt.state().at(p.unsafeGetTensorImpl()));
    const auto& qm = static_cast<const fxp::optim::QpuSgdParamState&>(*plain_opt.state().at(q.unsafeGetTensorImpl()));
    EXPECT_TRUE(torch::equal(pm.momentum_buffer(), qm.momentum_buffer())) << "momentum " << k;
  }
  for (size_t l = 0; l < fused.layers().size(); ++l) {
    EXPECT_EQ(fused.layers()[l].count, 4);
    for (size_t j = 0; j < fused.layers()[l].accumulated.size(); ++j) {
      EXPECT_TRUE(torch::equal(fused.layers()[l].accumulated[j], plain.layers()[l].accumulated[j])) << l << "." << j;
    }
  }
  // A diverged step changes nothing: no update, accumulation, count or optimizer step.
  const torch::Tensor before = fused_net->parameters().front().detach().clone();
  backward(*fused_net, 90);
  fused.step(std::nan(""), 8, fused_opt);
  EXPECT_TRUE(torch::equal(fused_net->parameters().front(), before));
  EXPECT_EQ(fused.layers().front().count, 4);
  EXPECT_EQ(static_cast<const fxp::optim::QpuSgdOptions&>(fused_opt.param_groups()[0].options()).step(), 4);
  // The normalized step needs every group's accumulators, one per parameter; refused before any step.
  const torch::Tensor norms = torch::ones({static_cast<int64_t>(fused.layers().size())}, torch::kDouble);
  fxp::testing::expect_error([&] { fused_opt.step_normalized({norms, 0.0, {}}); }, "accumulators of every group");
  std::vector<std::vector<torch::Tensor>> short_lists(fused.layers().size());
  fxp::testing::expect_error([&] { fused_opt.step_normalized({norms, 0.0, short_lists}); }, "accumulators");
  EXPECT_EQ(static_cast<const fxp::optim::QpuSgdOptions&>(fused_opt.param_groups()[0].options()).step(), 4);
}

TEST(AdaptController, L1AddsItsGradientBeforeNormalization) {
  auto net = fxp::nn::make_network("lenet5", ste(), 1, 10);
  fa::AdaptOptions o;
  o.l1 = 0.5;
  fa::Controller controller(*net, o);
  backward(*net, 3);
  const auto& l = controller.layers().front();
  std::vector<torch::Tensor> expected;
  double squared = 0;
  for (const auto& p : l.parameters) {
    expected.push_back(p.grad() + 0.5 * p.detach().sign());
    squared += expected.back().to(torch::kDouble).square().sum().item<double>();
  }
  controller.after_backward(1.0, 8);
  for (size_t j = 0; j < l.parameters.size(); ++j) {
    EXPECT_TRUE(torch::allclose(l.parameters[j].grad(), expected[j] / std::sqrt(squared), 1e-6, 1e-7));
  }
}

// Note [AdaPT's fused step]: the fused step's parameters, momentum and
// accumulators equal after_backward followed by SGD in separate float32
// operations, bit for bit, while no layer switches; .grad stays raw.
TEST(AdaptController, FusedSgdStepEqualsAfterBackwardThenSgd) {
  fa::AdaptOptions o;
  o.lookback = {100, 100};  // no switch in these steps: the two forms switch at different points
  o.l1 = 1e-4;
  const double lr = 0.05, mu = 0.9, wd = 5e-4;
  torch::manual_seed(0);
  auto fused_net = fxp::nn::make_network("lenet5", ste(), 1, 10);
  auto plain_net = fxp::nn::make_network("lenet5", ste(), 1, 10);
  {
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < fused_net->parameters().size(); ++k) {
      plain_net->parameters()[k].copy_(fused_net->parameters()[k]);
    }
  }
  fa::Controller fused(*fused_net, o), plain(*plain_net, o);
  torch::optim::SGD sgd(fused_net->parameters(), torch::optim::SGDOptions(lr).momentum(mu).weight_decay(wd));
  fused.use_fused_sgd(sgd);
  std::vector<torch::Tensor> buffers;
  for (const auto& p : plain_net->parameters()) buffers.push_back(torch::zeros_like(p));
  for (int step = 0; step < 4; ++step) {
    const double loss = backward(*fused_net, 60 + step);
    const torch::Tensor raw = fused_net->parameters().front().grad().clone();
    fused.step(loss, 8, sgd);
    EXPECT_TRUE(torch::equal(fused_net->parameters().front().grad(), raw)) << "the fused step writes no gradient";
    plain.after_backward(backward(*plain_net, 60 + step), 8);
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < buffers.size(); ++k) {
      auto p = plain_net->parameters()[k];
      const torch::Tensor d = p.grad() + wd * p;
      buffers[k] = mu * buffers[k] + d;
      p.copy_(p - lr * buffers[k]);
    }
  }
  for (size_t k = 0; k < buffers.size(); ++k) {
    EXPECT_TRUE(torch::equal(fused_net->parameters()[k], plain_net->parameters()[k])) << "parameter " << k;
  }
  for (size_t l = 0; l < fused.layers().size(); ++l) {
    EXPECT_EQ(fused.layers()[l].count, 4);
    for (size_t j = 0; j < fused.layers()[l].accumulated.size(); ++j) {
      EXPECT_TRUE(torch::equal(fused.layers()[l].accumulated[j], plain.layers()[l].accumulated[j])) << l << "." << j;
    }
  }
  // A diverged step (non-finite loss) changes nothing in either form: no update, accumulation or count.
  {
    const torch::Tensor before = fused_net->parameters().front().clone();
    const torch::Tensor accumulated = fused.layers().front().accumulated.front().clone();
    backward(*fused_net, 70);
    fused.step(std::nan(""), 8, sgd);
    torch::optim::SGD unfused(plain_net->parameters(), torch::optim::SGDOptions(lr));
    backward(*plain_net, 70);
    plain.step(std::numeric_limits<double>::infinity(), 8, unfused);
    EXPECT_TRUE(torch::equal(fused_net->parameters().front(), before));
    EXPECT_TRUE(torch::equal(plain_net->parameters().front(), before));
    EXPECT_TRUE(torch::equal(fused.layers().front().accumulated.front(), accumulated));
    EXPECT_EQ(fused.layers().front().count, 4);
    EXPECT_EQ(plain.layers().front().count, 4);
  }
  // An optimizer over other parameters than the adapted layers' is refused.
  torch::optim::SGD partial(std::vector<torch::Tensor>{fused_net->parameters().front()}, torch::optim::SGDOptions(lr));
  fxp::testing::expect_error([&] { fused.use_fused_sgd(partial); }, "exactly the adapted layers' parameters");
}

TEST(AdaptController, SaveAndLoadContinueIdentically) {
  fa::AdaptOptions o;
  o.lookback = {2, 3};
  o.resolution = {10, 12};
  auto run = [&](bool reload) {
    torch::manual_seed(0);
    auto net = fxp::nn::make_network("lenet5", ste(), 1, 10);
    auto controller = std::make_unique<fa::Controller>(*net, o);
    // The weights move between switches, so each PD after the reload sees new weights.
    torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
    for (int step = 0; step < 7; ++step) {
      if (reload && step == 3) {
        torch::serialize::OutputArchive out;
        controller->save(out);
        std::ostringstream bytes;
        out.save_to(bytes);
        const std::string data = bytes.str();
        controller = std::make_unique<fa::Controller>(*net, o);
        torch::serialize::InputArchive in;
        in.load_from(data.data(), data.size());
        controller->load(in);
      }
      controller->after_backward(backward(*net, 100 + step), 8);
      sgd.step();
    }
    std::vector<int64_t> state;
    for (const auto& l : controller->layers()) {
      state.insert(state.end(), {l.format.bits, l.format.frac, l.lookback, l.resolution, l.count, l.switches,
                                 l.work.samples, l.work.pd_evaluations, static_cast<int64_t>(l.work.sparse_units * 1e6)});
    }
    state.push_back(static_cast<int64_t>(controller->strategy()));
    return state;
  };
  EXPECT_EQ(run(false), run(true));
}

}  // namespace

// ---- the performance model ----------------------------------------------------------

namespace {

// Two layers by hand: a conv of 100 MAdds per sample and 20 parameters, a
// linear layer of 30 MAdds and 31 parameters, trained 2 iterations at batch 4:
// the conv at 8 bits with density 0.5 then 16 bits with density 1, the linear
// layer at 16 bits with density 0.25 twice; the conv switched once, PD evaluating 10 candidates.
TEST(AdaptPerformance, TwoLayersByHand) {
  fa::LayerWork conv, fc;
  conv.madds = 100;
  conv.parameters = 20;
  conv.sparse_units = 4 * 8 / 32.0 * 0.5 + 4 * 16 / 32.0 * 1;  // 0.5 + 2 = 2.5
  conv.dense_units = 4 * 8 / 32.0 + 4 * 16 / 32.0;             // 1 + 2 = 3
  conv.samples = 8;
  conv.iterations = 2;
  conv.pd_evaluations = 10;
  conv.switches = 1;
  conv.bits = 16;
  conv.density = 1;
  fc.madds = 30;
  fc.parameters = 31;
  fc.sparse_units = 2 * (4 * 16 / 32.0 * 0.25);  // 1
  fc.dense_units = 2 * (4 * 16 / 32.0);          // 4
  fc.samples = 8;
  fc.iterations = 2;
  fc.bits = 16;
  fc.density = 0.25;
  // adapt: conv 100 * (2 * 2.5 + 3) + 2 * 20 * 4 + (10 + 1) * 2 * 20 = 800 + 160 + 440 = 1400
  //        fc  30 * (2 * 1 + 4) + 2 * 31 * 4 = 180 + 248 = 428
  // float32: conv 3 * 100 * 8 + 2 * 20 = 2440; fc 3 * 30 * 8 + 2 * 31 = 782
  const auto cost = fa::training_cost({conv, fc}, /*l1=*/false);
  EXPECT_DOUBLE_EQ(cost.adapt, 1400 + 428);
  EXPECT_DOUBLE_EQ(cost.float32, 2440 + 782);
  EXPECT_DOUBLE_EQ(cost.speedup(), 3222.0 / 1828.0);
  // L1 adds one operation per parameter and iteration: 2 * (20 + 31).
  EXPECT_DOUBLE_EQ(fa::training_cost({conv, fc}, true).adapt, 1828 + 102);
  // SZ: (20 * 16 * 1 + 31 * 16 * 0.25) / (51 * 32) = 444 / 1632.
  EXPECT_DOUBLE_EQ(fa::model_size_ratio({conv, fc}), 444.0 / 1632.0);
  // Inference: (100 + 30) * 32 / (100 * 16 + 30 * 16 * 0.25) = 4160 / 1720.
  EXPECT_DOUBLE_EQ(fa::inference_speedup({conv, fc}), 4160.0 / 1720.0);
}

// The controller's account: every step counts the batch at the layer's format,
// the MAdds come from the layer's last forward, and PD's candidates are counted.
// Note [Density at the first step]: parameters changed between construction and
// the first step (QPU's initialization, in Python) count as they are at the step.
TEST(AdaptController, TheFirstStepMeasuresTheDensityAgain) {
  torch::manual_seed(0);
  auto w = torch::randn({1000}), b = torch::randn({10});
  w.mutable_grad() = torch::randn({1000});
  b.mutable_grad() = torch::randn({10});
  fa::PrecisionController controller({{"layer", {w, b}}}, fa::AdaptOptions{});
  const auto& layer = controller.layers()[0];
  EXPECT_GT(fa::PrecisionController::density_at(layer, layer.format), 0.9);
  EXPECT_DOUBLE_EQ(layer.density, fa::PrecisionController::density_at(layer, layer.format));
  {
    torch::NoGradGuard no_grad;
    w.narrow(0, 0, 600).zero_();  // 600 of the 1010 values are now 0
  }
  EXPECT_GT(layer.density, 0.9);  // measured at construction
  controller.after_backward(1.0, 4);
  const double zeros = 1 - fa::PrecisionController::density_at(layer, layer.format);
  EXPECT_GE(zeros, 600.0 / 1010);
  EXPECT_DOUBLE_EQ(controller.sparsity(layer), zeros);  // measured at the step
  {
    torch::NoGradGuard no_grad;
    w.fill_(1);  // after the first step, only a switch measures it
  }
  controller.after_backward(1.0, 4);
  EXPECT_DOUBLE_EQ(controller.sparsity(layer), zeros);
}

TEST(AdaptPerformance, TheControllerCountsEachStep) {
  auto net = fxp::nn::make_network("lenet5", ste(), 1, 10);
  fa::AdaptOptions o;
  o.lookback = {2, 2};
  fa::Controller controller(*net, o);
  for (int step = 0; step < 2; ++step) controller.after_backward(backward(*net, 50 + step), 8);
  const auto work = controller.work();
  // conv1: 6 x 28 x 28 outputs, 25 MAdds each; 156 parameters.
  EXPECT_EQ(work[0].madds, 6 * 28 * 28 * 25);
  EXPECT_EQ(work[0].parameters, 156);
  EXPECT_EQ(work[0].samples, 16);
  EXPECT_EQ(work[0].iterations, 2);
  EXPECT_DOUBLE_EQ(work[0].dense_units, 2 * 8 * 8 / 32.0);  // both steps at the start format <8, 4>
  EXPECT_EQ(work[0].switches, 1);
  EXPECT_GE(work[0].pd_evaluations, 2);
  EXPECT_LE(work[0].pd_evaluations, 12);
  EXPECT_EQ(work[4].madds, 84 * 10);  // fc2
  EXPECT_EQ(work[0].bits, controller.layers()[0].format.bits);
}

}  // namespace
