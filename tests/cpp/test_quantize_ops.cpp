// The fxp quantize ops through the dispatcher, as C++ users call them.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "ops/ops.h"

#include "test_util.h"

namespace {

using torch::Tensor;

Tensor values(std::vector<float> v) { return torch::tensor(v, torch::kFloat); }

using fxp::testing::expect_error;

TEST(QuantizeOp, TiesGoToEvenCode) {
  // FxP(8, 4): LSB 1/16. (k + 1/2) / 16 must become the even one of k, k + 1.
  auto k = torch::arange(-128, 127, torch::kFloat);
  const Tensor y = fxp::quantize((k + 0.5) / 16, 8, 4);
  const Tensor codes = y * 16;
  EXPECT_TRUE(torch::equal(torch::fmod(codes, 2), torch::zeros_like(codes)));
  EXPECT_TRUE(torch::equal((codes - k).abs(), torch::where(torch::fmod(k, 2) == 0, 0.0, 1.0).to(torch::kFloat)));
}

TEST(QuantizeOp, SaturateAndWrapAtBothEnds) {
  const Tensor x = values({100.f, 7.9375f, 8.0f, -8.0f, -8.0625f, -100.f});
  EXPECT_TRUE(torch::equal(fxp::quantize(x, 8, 4),
                           values({7.9375f, 7.9375f, 7.9375f, -8.f, -8.f, -8.f})));
  // 8.0 is code 128 -> -128; -8.0625 is code -129 -> 127; 100 is code 1600 -> 64.
  EXPECT_TRUE(torch::equal(fxp::quantize(x, 8, 4, "nearest_even", "wrap"),
                           values({4.f, 7.9375f, -8.f, -8.f, 7.9375f, -4.f})));
  auto [y, count] = fxp::quantize_stats(x, 8, 4);
  EXPECT_EQ(count.item<int64_t>(), 4);
  auto [y2, mask] = fxp::quantize_mask(x, 8, 4);
  EXPECT_TRUE(torch::equal(mask, torch::tensor({true, false, true, false, true, true})));
}

TEST(QuantizeOp, NanStaysNanInfSaturates) {
  const float inf = std::numeric_limits<float>::infinity();
  const Tensor x = values({std::nanf(""), inf, -inf});
  for (const char* overflow : {"saturate", "wrap"}) {
    for (const char* rounding : {"nearest_even", "stochastic", "floor", "nearest_away"}) {
      auto [y, count] = fxp::quantize_stats(x, 8, 4, rounding, overflow);
      EXPECT_TRUE(std::isnan(y[0].item<float>()));
      EXPECT_EQ(y[1].item<float>(), 7.9375f) << rounding << " " << overflow;
      EXPECT_EQ(y[2].item<float>(), -8.0f) << rounding << " " << overflow;
      EXPECT_EQ(count.item<int64_t>(), 2);
    }
  }
}

TEST(QuantizeOp, StochasticResultIndependentOfThreadCount) {
  const Tensor x = torch::randn({1 << 20}, torch::kDouble);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const Tensor one = fxp::quantize_seeded(x, 16, 10, "stochastic", 5, 3);
  at::set_num_threads(3);
  const Tensor three = fxp::quantize_seeded(x, 16, 10, "stochastic", 5, 3);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one, three));
  EXPECT_FALSE(torch::equal(one, fxp::quantize_seeded(x, 16, 10, "stochastic", 5, 4)));
}

TEST(QuantizeOp, InPlaceEqualsOutOfPlace) {
  Tensor x = torch::randn({37, 5}).t();  // non-contiguous
  const Tensor expected = fxp::quantize_seeded(x, 12, 6, "stochastic", 11, 0);
  fxp::quantize_seeded_(x, 12, 6, "stochastic", 11, 0);
  EXPECT_TRUE(torch::equal(x, expected));
}

TEST(QuantizeOp, StraightThroughGradient) {
  const Tensor x = values({0.3f, 100.f, -100.f, 1.0f}).requires_grad_();
  const Tensor g = values({1.f, 2.f, 3.f, 4.f});
  fxp::quantize_ste(x, 8, 4).backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), g));
  x.mutable_grad() = Tensor();
  fxp::quantize_ste(x, 8, 4, "stochastic", "saturate", std::nullopt, true).backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), values({1.f, 0.f, 0.f, 4.f})));
}

TEST(QuantizeOp, BadArgumentsGiveClearErrors) {
  const Tensor x = torch::randn({4});
  expect_error([&] { fxp::quantize(x, 33, 4); }, "total_bits must be in [2, 32], but got 33");
  expect_error([&] { fxp::quantize(x, 1, 0); }, "total_bits must be in [2, 32], but got 1");
  expect_error([&] { fxp::quantize(x, 8, 8); }, "frac_bits must be in [0, total_bits - 1] = [0, 7], but got 8");
  expect_error([&] { fxp::quantize(x, 8, -1); }, "frac_bits must be in");
  expect_error([&] { fxp::quantize(x, 8, 4, "round"); }, "unknown rounding 'round'");
  expect_error([&] { fxp::quantize(x, 8, 4, "nearest_even", "clip"); }, "unknown overflow 'clip'");
  expect_error([&] { fxp::quantize(torch::ones({3}, torch::kInt), 8, 4); },
               "x must be float32, float64, float16 or bfloat16, but got Int");
  expect_error([&] { fxp::quantize_seeded(x, 8, 4, "stochastic", 0, -1); },
               "offset must be non-negative");
}

// --- CUDA: compiled everywhere, run where a GPU is present ------------------
class QuantizeCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  }
};

TEST_F(QuantizeCuda, BitIdenticalToCpu) {
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    const Tensor x = (torch::randn({1000003}) * 50).to(dtype);
    for (const char* rounding : {"nearest_even", "stochastic", "floor", "nearest_away"}) {
      for (const char* overflow : {"saturate", "wrap"}) {
        auto [cpu, cpu_count] = fxp::quantize_seeded_stats(x, 10, 3, rounding, 99, 7, overflow);
        auto [gpu, gpu_count] =
            fxp::quantize_seeded_stats(x.cuda(), 10, 3, rounding, 99, 7, overflow);
        EXPECT_TRUE(torch::equal(cpu.view(torch::kByte), gpu.cpu().view(torch::kByte)))
            << dtype << " " << rounding << " " << overflow;
        EXPECT_EQ(cpu_count.item<int64_t>(), gpu_count.item<int64_t>());
      }
    }
  }
}

// The errors raised after a count is read back from the device, in C++ (the
// first GPU runs saw the same errors crash their pytest worker; see
// scripts/diagnose/error_paths.py): with CUDA tensors alive while they unwind.
TEST_F(QuantizeCuda, ErrorsRaisedAfterADeviceReadAreCaught) {
  Tensor bad = torch::zeros({100003}, torch::kLong);
  bad.slice(0, 0, 100003, 1000).fill_(-33);
  expect_error([&] { fxp::pack_bits(bad.cuda(), 6); }, "101 codes lie outside [-32, 31]");
  expect_error([] { fxp::pack(torch::tensor({1.0F, NAN}, torch::kCUDA), 8, 4); },
               "cannot pack NaN into integer codes: 1 of 2 elements are NaN");
  std::vector<Tensor> w{torch::tensor({16, 32, -8}, torch::dtype(torch::kChar).device(torch::kCUDA))};
  std::vector<Tensor> g{torch::tensor({1.0F, NAN, 2.0F}, torch::kCUDA)};
  std::vector<Tensor> v{torch::zeros({3}, torch::dtype(torch::kChar).device(torch::kCUDA))};
  expect_error([&] { fxp::qpu_sgd_step_(w, g, v, 0.5, 0.9, 0.0, false, 8, 4, 8, 4, "nearest_even", 0, 0); },
               "updated values are NaN");
}

TEST_F(QuantizeCuda, MixedDevicesAreRejected) {
  const Tensor x = torch::randn({4});
  Tensor out = torch::empty({4}, torch::kCUDA);
  const auto quantize_out = c10::Dispatcher::singleton().findSchemaOrThrow("fxp::quantize", "out").typed<void(
      const at::Tensor&, int64_t, int64_t, c10::string_view, c10::string_view,
      const std::optional<at::Generator>&, const at::Tensor&)>();
  expect_error([&] { quantize_out.call(x, 8, 4, "nearest_even", "saturate", std::nullopt, out); },
               "expected out on the same device as x");
}

}  // namespace

namespace {

// Note [Per-member quantization], from C++: each member as quantize_seeded alone.
TEST(QuantizeMembersOp, EachMemberAsItsSoloCall) {
  const Tensor x = torch::randn({4, 3, 50}, torch::TensorOptions().dtype(torch::kFloat)) * 10;
  const std::vector<int64_t> bits{16, 8, 6, 12}, frac{10, 4, 2, 6}, seed{7, 7, -1, 3}, offset{0, 4, 0, 8};
  const c10::List<std::string> rounding({"stochastic", "stochastic", "nearest_even", "floor"});
  // Members along a middle dimension, one format for all.
  const c10::List<std::string> stochastic({"stochastic", "stochastic", "stochastic"});
  const Tensor out = fxp::quantize_members(x, 1, {6, 6, 6}, {1, 2, 3}, stochastic, {1, 2, 3}, {0, 0, 0});
  for (int64_t m = 0; m < 3; ++m) {
    const Tensor alone = fxp::quantize_seeded(x.select(1, m), 6, m + 1, "stochastic", m + 1, 0);
    EXPECT_TRUE(torch::equal(out.select(1, m), alone));
  }
  const Tensor first = fxp::quantize_members(x.transpose(0, 1), 1, bits, frac, rounding, seed, offset, "wrap");
  for (int64_t m = 0; m < 4; ++m) {
    const Tensor alone = fxp::quantize_seeded(x[m], bits[m], frac[m], rounding.get(m), seed[m], offset[m], "wrap");
    EXPECT_TRUE(torch::equal(first.select(1, m), alone));
  }
  expect_error([&] { fxp::quantize_members(x, 0, bits, frac, rounding, seed, {0, 0, 0}); },
               "expected one offset per member (x has 4 members along dim 0), but got 3");
  // A member dimension out of range names the op (at::maybe_wrap_dim's IndexError did not).
  for (const int64_t dim : {3, -4, 5}) {
    expect_error([&] { fxp::quantize_members(x, dim, bits, frac, rounding, seed, offset); },
                 "fxp::quantize_members: member_dim must be in [-3, 2] for x of shape [4, 3, 50], but got " +
                     std::to_string(dim));
  }
}

}  // namespace
