// Packed integer storage in C++ (issue 6): the ops, the packed QPU step, the
// layer ops' gradients, packed layers with fxp::optim::QpuSgd, CPU == CUDA.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <limits>
#include <utility>

#include "nn/models.h"
#include "ops/ops.h"
#include "optim/qpu_sgd.h"
#include "test_util.h"

namespace {

using fxp::testing::expect_error;

torch::Tensor every_code(int64_t bits) {
  return torch::arange(-(int64_t{1} << (bits - 1)), int64_t{1} << (bits - 1), torch::kLong);
}

TEST(Packed, PackThenUnpackIsExactForEveryCode) {
  for (int64_t bits = 2; bits <= 10; ++bits) {
    for (int64_t frac : {int64_t{0}, bits / 2, bits - 1}) {
      const torch::Tensor codes = every_code(bits);
      const torch::Tensor values = codes.to(torch::kDouble) * std::ldexp(1.0, -static_cast<int>(frac));
      for (const char* rounding : {"nearest_even", "stochastic"}) {
        const torch::Tensor packed = fxp::pack(values.to(torch::kFloat), bits, frac, rounding);
        EXPECT_EQ(packed.scalar_type(), bits <= 8 ? torch::kChar : torch::kShort);
        EXPECT_TRUE(torch::equal(packed.to(torch::kLong), codes)) << bits << "." << frac << " " << rounding;
        EXPECT_TRUE(torch::equal(fxp::unpack(packed, bits, frac, torch::kDouble), values));
      }
    }
  }
  EXPECT_EQ(fxp::pack(torch::zeros({2}), 17, 3).scalar_type(), torch::kInt);
}

TEST(Packed, PackingNanIsAnErrorWithTheCount) {
  const torch::Tensor x = torch::tensor({1.0f, NAN, NAN, 0.5f});
  expect_error([&] { fxp::pack(x, 8, 4); }, "fxp::pack: cannot pack NaN into integer codes: 2 of 4 elements are NaN");
  expect_error([&] { fxp::pack_seeded(x, 8, 4, "stochastic", 1, 0); }, "2 of 4 elements are NaN");
  expect_error([&] { fxp::unpack(torch::zeros({2}, torch::kInt), 8, 4); }, "codes of FxP(8,4) must be Char");
}

TEST(Packed, StepOnCodesEqualsStepOnFloats) {
  torch::manual_seed(3);
  for (const char* rounding : {"stochastic", "nearest_even"}) {
    torch::Tensor w = fxp::quantize(torch::randn({5000}), 16, 10), v = torch::zeros({5000});
    torch::Tensor w_codes = fxp::pack(w, 16, 10), v_codes = torch::zeros({5000}, torch::kShort);
    for (int64_t step = 0; step < 4; ++step) {
      const torch::Tensor g = torch::randn({5000});
      const auto a = fxp::qpu_sgd_step_({w}, {g}, {v}, 0.05, 0.9, 1e-4, false, 16, 10, 16, 10, rounding, 7, step);
      const auto b =
          fxp::qpu_sgd_step_({w_codes}, {g}, {v_codes}, 0.05, 0.9, 1e-4, false, 16, 10, 16, 10, rounding, 7, step);
      EXPECT_TRUE(torch::equal(a, b));
    }
    EXPECT_TRUE(torch::equal(fxp::unpack(w_codes, 16, 10), w)) << rounding;
    EXPECT_TRUE(torch::equal(fxp::unpack(v_codes, 16, 10), v)) << rounding;
  }
}

TEST(Packed, LayerOpsSavePackedInputsWithTorchsGradients) {
  torch::manual_seed(4);
  const torch::Tensor x = fxp::quantize(torch::randn({6, 3, 10, 10}), 12, 6).requires_grad_();
  const torch::Tensor w = torch::randn({5, 3, 3, 3}, torch::requires_grad());
  const torch::Tensor g = torch::randn({6, 5, 8, 8});
  torch::conv2d(x, w).backward(g);
  const torch::Tensor gx = x.grad().clone(), gw = w.grad().clone();
  x.mutable_grad().reset();
  w.mutable_grad().reset();
  const std::vector<int64_t> in_format{12, 6};
  fxp::conv2d(x, w, std::nullopt, {1, 1}, {0, 0}, {1, 1}, 1, in_format).backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), gx));
  EXPECT_TRUE(torch::equal(w.grad(), gw));

  const torch::Tensor xl = fxp::quantize(torch::randn({7, 12}), 8, 4).requires_grad_();
  const torch::Tensor wl = fxp::quantize(torch::randn({4, 12}), 16, 10);
  const torch::Tensor bl = fxp::quantize(torch::randn({4}), 16, 10);
  const torch::Tensor gl = torch::randn({7, 4});
  const torch::Tensor wr = wl.clone().requires_grad_(), br = bl.clone().requires_grad_();
  torch::nn::functional::linear(xl, wr, br).backward(gl);
  const torch::Tensor gxl = xl.grad().clone();
  xl.mutable_grad().reset();
  const torch::Tensor stand_w = torch::zeros({}).expand({4, 12}).requires_grad_();
  const torch::Tensor stand_b = torch::zeros({}).expand({4}).requires_grad_();
  const std::vector<int64_t> in8{8, 4}, p16{16, 10};
  fxp::linear(xl, stand_w, stand_b, in8, fxp::pack(wl, 16, 10), fxp::pack(bl, 16, 10), p16).backward(gl);
  EXPECT_TRUE(torch::equal(xl.grad(), gxl));
  EXPECT_TRUE(torch::equal(stand_w.grad(), wr.grad()));
  EXPECT_TRUE(torch::equal(stand_b.grad(), br.grad()));
}

TEST(Packed, FusedReluMaxPoolEqualsTorch) {
  torch::manual_seed(6);
  // Coarse codes: ties, zeros and negative zeros in the windows; 11 columns leave one unused.
  const torch::Tensor x = fxp::quantize(torch::randn({2, 3, 10, 11}), 4, 1).requires_grad_();
  const torch::Tensor g = torch::randn({2, 3, 5, 5});
  const torch::Tensor ref = torch::max_pool2d(torch::relu(x), 2);
  ref.backward(g);
  const torch::Tensor ref_grad = x.grad().clone();
  x.mutable_grad().reset();
  const torch::Tensor out = fxp::relu_max_pool2d(x, {2, 2});
  out.backward(g);
  EXPECT_TRUE(torch::equal(out, ref));
  EXPECT_TRUE(torch::equal(x.grad().view(torch::kInt), ref_grad.view(torch::kInt)));  // the bits, signed zeros too
  auto [pooled, positions] = fxp::relu_max_pool2d_with_positions(x.detach(), {2, 2});
  EXPECT_EQ(positions.scalar_type(), torch::kByte);
  EXPECT_TRUE(torch::equal(positions == 255, pooled <= 0));
  expect_error([&] { fxp::relu_max_pool2d(torch::randn({3, 4, 4}), {2, 2}); }, "expected a 4-D x");
}

// The value a packed parameter stores, from integer codes or a bit stream.
torch::Tensor stored_value(const fxp::nn::PackedStorage& p) {
  const torch::Tensor codes = p.codes.scalar_type() == torch::kByte
                                  ? fxp::unpack_bits(p.codes, p.total_bits, p.parameter.sizes())
                                  : p.codes;
  return fxp::unpack(codes, p.total_bits, p.frac_bits);
}

// Three SQPU steps of the paper's network, float storage against packed
// storage: int16 codes at 16 bits, bit streams at 12 (Note [Bit-stream storage]).
class PackedPaperCnn : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(PackedPaperCnn, TrainsBitIdentically) {
  const auto [bits, frac] = GetParam();
  auto train = [bits = bits, frac = frac](bool packed) {
    torch::manual_seed(0);
    fxp::nn::QuantConfig qc;
    qc.weight_mode = fxp::nn::WeightMode::Qpu;
    qc.param_total_bits = bits;
    qc.param_frac_bits = frac;
    fxp::nn::PaperCNN model(qc);
    model->quantize_parameters_("stochastic", 0);
    if (packed) model->pack_(true, true);
    fxp::optim::QpuSgd opt(model->parameters(),
                           fxp::optim::QpuSgdOptions(0.05).momentum(0.9).seed(2).total_bits(bits).frac_bits(frac));
    for (const auto& p : model->packed_storage()) {
      opt.set_packed_storage(p.parameter, p.codes, p.total_bits, p.frac_bits);
    }
    auto data = at::make_generator<at::CPUGeneratorImpl>(9);
    std::vector<double> losses;
    for (int step = 0; step < 3; ++step) {
      const torch::Tensor x = torch::randn({8, 1, 28, 28}, data), y = torch::randint(0, 10, {8}, data);
      torch::manual_seed(100 + step);  // the output rounding's draws
      opt.zero_grad();
      const torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(x), y);
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    std::vector<torch::Tensor> values;
    if (packed) {
      for (const auto& p : model->packed_storage()) {
        // Codes at B bits: int16 at 16, a stream of ceil(numel * 12 / 8) bytes at 12.
        EXPECT_EQ(p.codes.scalar_type(), bits == 16 ? torch::kShort : torch::kByte);
        EXPECT_EQ(p.codes.nbytes(), (p.parameter.numel() * bits + 7) / 8);
        values.push_back(stored_value(p));
      }
    } else {
      values = model->parameters();
    }
    return std::make_pair(losses, values);
  };
  const auto [losses_float, values_float] = train(false);
  const auto [losses_packed, values_packed] = train(true);
  EXPECT_EQ(losses_float, losses_packed);
  ASSERT_EQ(values_float.size(), values_packed.size());
  for (size_t i = 0; i < values_float.size(); ++i) EXPECT_TRUE(torch::equal(values_float[i], values_packed[i])) << i;
}

INSTANTIATE_TEST_SUITE_P(Widths, PackedPaperCnn,
                         ::testing::Values(std::make_pair(int64_t{16}, int64_t{10}),
                                           std::make_pair(int64_t{12}, int64_t{8})));

// Note [Bit-stream storage]: the ops take a stream wherever they take codes,
// and give what they give on integer codes.
TEST(Packed, OpsOnBitStreamsEqualOpsOnIntegerCodes) {
  torch::manual_seed(8);
  for (const char* rounding : {"stochastic", "nearest_even"}) {
    // 1001 parameters of 12 bits: the last of 1502 bytes is half used. Momentum in FxP(10,8).
    torch::Tensor w = fxp::pack(torch::randn({7, 143}), 12, 8), v = torch::zeros({7, 143}, torch::kShort);
    torch::Tensor w_stream = fxp::pack_bits(w, 12), v_stream = torch::zeros({(1001 * 10 + 7) / 8}, torch::kByte);
    ASSERT_EQ(w_stream.numel(), 1502);
    for (int64_t step = 0; step < 3; ++step) {
      const torch::Tensor g = torch::randn({7, 143}) * 3;  // saturates some
      const auto a = fxp::qpu_sgd_step_({w}, {g}, {v}, 0.1, 0.9, 1e-3, false, 12, 8, 10, 8, rounding, 7, step);
      const auto b =
          fxp::qpu_sgd_step_({w_stream}, {g}, {v_stream}, 0.1, 0.9, 1e-3, false, 12, 8, 10, 8, rounding, 7, step);
      EXPECT_TRUE(torch::equal(a, b)) << rounding << " step " << step;
    }
    EXPECT_TRUE(torch::equal(fxp::unpack_bits(w_stream, 12, {7, 143}), w)) << rounding;
    EXPECT_TRUE(torch::equal(fxp::unpack_bits(v_stream, 10, {7, 143}), v)) << rounding;
  }
  // The layer ops: stream weights and a 12-bit input saved as a stream give torch's gradients.
  const torch::Tensor x = fxp::quantize(torch::randn({5, 12}), 12, 6).requires_grad_();
  const torch::Tensor wl = fxp::quantize(torch::randn({4, 12}), 12, 8), bl = fxp::quantize(torch::randn({4}), 12, 8);
  const torch::Tensor g = torch::randn({5, 4});
  const torch::Tensor wr = wl.clone().requires_grad_(), br = bl.clone().requires_grad_();
  torch::nn::functional::linear(x, wr, br).backward(g);
  const torch::Tensor gx = x.grad().clone();
  x.mutable_grad().reset();
  const torch::Tensor stand_w = torch::zeros({}).expand({4, 12}).requires_grad_();
  const torch::Tensor stand_b = torch::zeros({}).expand({4}).requires_grad_();
  const std::vector<int64_t> in12{12, 6}, p12{12, 8};
  const torch::Tensor w_codes = fxp::pack_bits(fxp::pack(wl, 12, 8), 12), b_codes = fxp::pack_bits(fxp::pack(bl, 12, 8), 12);
  const torch::Tensor y = fxp::linear(x, stand_w, stand_b, in12, w_codes, b_codes, p12);
  EXPECT_TRUE(torch::equal(y, torch::nn::functional::linear(x, wl, bl)));
  y.backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), gx));
  EXPECT_TRUE(torch::equal(stand_w.grad(), wr.grad()));
  EXPECT_TRUE(torch::equal(stand_b.grad(), br.grad()));
  // A stream of the wrong length, or of a width streams cannot hold, is refused with the argument's name.
  expect_error([&] { fxp::linear(x, stand_w, stand_b, in12, w_codes.narrow(0, 0, 71), b_codes, p12); },
               "fxp::linear: weight_codes is a bit stream (uint8) of 12-bit codes for shape [4, 12], so it must be "
               "1-D with 72 bytes, but it has shape [71]");
  torch::Tensor wrong = torch::zeros({10}, torch::kByte);
  expect_error([&] { fxp::qpu_sgd_step_({wrong}, {torch::zeros({7})}, {}, 0.1, 0, 0, false, 12, 8, 12, 8,
                                        "stochastic", 0, 0); },
               "params[0] is a bit stream (uint8) of 12-bit codes for shape [7], so it must be 1-D with 11 bytes");
  expect_error([&] { fxp::qpu_sgd_step_({wrong}, {torch::zeros({4})}, {}, 0.1, 0, 0, false, 20, 8, 20, 8,
                                        "stochastic", 0, 0); },
               "codes of 20 bits are stored as Int (streams hold at most 16 bits)");
}

TEST(Packed, ClearErrorsForMisuse) {
  fxp::nn::QuantConfig ste;
  ste.weight_mode = fxp::nn::WeightMode::Ste;
  fxp::nn::PaperCNN model(ste);
  expect_error([&] { model->pack_(true, false); }, "only QPU layers (sqpu, hteqpu) can pack their weights");
  fxp::nn::QuantConfig qpu;
  qpu.weight_mode = fxp::nn::WeightMode::Qpu;
  fxp::nn::PaperCNN packed(qpu);
  // Weights off the grid would be rounded: refused, and nothing is packed.
  expect_error([&] { packed->pack_(true, true); }, "fxp::nn: packing the weight needs it on the parameter grid, FxP(16,10)");
  EXPECT_TRUE(packed->packed_storage().empty());
  packed->quantize_parameters_("stochastic", 0);
  packed->pack_(true, true);
  expect_error([&] { packed->quantize_parameters_("stochastic", 0); }, "must come before pack_");
  fxp::optim::QpuSgd opt(packed->parameters(), fxp::optim::QpuSgdOptions(0.1).total_bits(8).frac_bits(4));
  const auto p = packed->packed_storage().at(0);
  // The model's codes are FxP(16,10); the optimizer's group updates FxP(8,4).
  expect_error([&] { opt.set_packed_storage(p.parameter, p.codes, p.total_bits, p.frac_bits); },
               "the codes are of FxP(16,10), but the parameter's group updates FxP(8,4)");
  expect_error([&] { opt.set_packed_storage(p.parameter, p.codes, 8, 4); }, "codes of FxP(8,4) must be Char");
  expect_error([&] { opt.set_packed_storage(torch::zeros(p.parameter.sizes()), p.codes, 8, 4); },
               "a parameter this optimizer does not hold");
}

// Note [Packed QPU step]: a step that raises (a NaN packed storage cannot
// hold) has happened, and counts, so the next one draws fresh numbers.
TEST(Packed, AStepThatRaisesHasStepped) {
  fxp::nn::QuantConfig qpu;
  qpu.weight_mode = fxp::nn::WeightMode::Qpu;
  fxp::nn::PaperCNN model(qpu);
  model->quantize_parameters_("stochastic", 0);
  model->pack_(true, false);
  fxp::optim::QpuSgd opt(model->parameters(), fxp::optim::QpuSgdOptions(0.1).momentum(0.9));
  for (const auto& p : model->packed_storage()) opt.set_packed_storage(p.parameter, p.codes, p.total_bits, p.frac_bits);
  const auto packed = model->packed_storage();
  const torch::Tensor before = packed.back().codes.clone();
  for (const auto& p : model->parameters()) p.mutable_grad() = torch::full(p.sizes(), 0.01);
  packed.back().parameter.mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(opt.step(), c10::ValueError);
  EXPECT_EQ(static_cast<fxp::optim::QpuSgdOptions&>(opt.param_groups()[0].options()).step(), 1);
  EXPECT_EQ(packed.back().codes[0].item<int>(), before[0].item<int>());    // the NaN element kept its code
  EXPECT_FALSE(torch::equal(packed.back().codes.narrow(0, 1, 9), before.narrow(0, 1, 9)));  // the others moved
}

// A forgotten set_packed_storage would write into a stand-in; the step refuses
// before it touches any group.
TEST(Packed, AStepWithoutThePackedStorageIsRefused) {
  fxp::nn::QuantConfig qpu;
  qpu.weight_mode = fxp::nn::WeightMode::Qpu;
  fxp::nn::PaperCNN model(qpu);
  model->quantize_parameters_("stochastic", 0);
  model->pack_(true, false);
  fxp::optim::QpuSgd opt(model->parameters(), fxp::optim::QpuSgdOptions(0.1).momentum(0.9));
  for (const auto& p : model->parameters()) p.mutable_grad() = torch::full(p.sizes(), 0.01);
  const torch::Tensor before = model->packed_storage().at(0).codes.clone();
  expect_error([&] { opt.step(); }, "parameter 0 of group 0 is expanded (a stride is 0)");
  EXPECT_EQ(static_cast<fxp::optim::QpuSgdOptions&>(opt.param_groups()[0].options()).step(), 0);
  EXPECT_TRUE(torch::equal(model->packed_storage().at(0).codes, before));
}

TEST(Packed, CudaPackAndStepEqualCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  torch::manual_seed(5);
  const torch::Tensor x = torch::randn({100003}) * 30;
  for (const char* rounding : {"nearest_even", "stochastic"}) {
    const torch::Tensor cpu = fxp::pack_seeded(x, 16, 10, rounding, 3, 1);
    const torch::Tensor cuda = fxp::pack_seeded(x.cuda(), 16, 10, rounding, 3, 1);
    EXPECT_TRUE(torch::equal(cpu, cuda.cpu())) << rounding;
    EXPECT_TRUE(torch::equal(fxp::unpack(cpu, 16, 10), fxp::unpack(cuda, 16, 10).cpu()));
  }
  torch::Tensor w = fxp::pack(torch::randn({70000}), 12, 8), v = torch::zeros({70000}, torch::kShort);
  torch::Tensor wc = w.cuda(), vc = v.cuda();
  const torch::Tensor g = torch::randn({70000});
  fxp::qpu_sgd_step_({w}, {g}, {v}, 0.1, 0.9, 0, false, 12, 8, 12, 8, "stochastic", 4, 0);
  fxp::qpu_sgd_step_({wc}, {g.cuda()}, {vc}, 0.1, 0.9, 0, false, 12, 8, 12, 8, "stochastic", 4, 0);
  EXPECT_TRUE(torch::equal(w, wc.cpu()));
  EXPECT_TRUE(torch::equal(v, vc.cpu()));
  // Bit streams (Note [Bit-stream storage]): decoded and re-encoded on the device.
  torch::Tensor ws = fxp::pack_bits(w, 12), vs = fxp::pack_bits(v, 12);
  torch::Tensor wsc = ws.cuda(), vsc = vs.cuda();
  fxp::qpu_sgd_step_({ws}, {g}, {vs}, 0.1, 0.9, 0, false, 12, 8, 12, 8, "stochastic", 4, 1);
  fxp::qpu_sgd_step_({wsc}, {g.cuda()}, {vsc}, 0.1, 0.9, 0, false, 12, 8, 12, 8, "stochastic", 4, 1);
  EXPECT_TRUE(torch::equal(ws, wsc.cpu()));
  EXPECT_TRUE(torch::equal(vs, vsc.cpu()));
}

}  // namespace
