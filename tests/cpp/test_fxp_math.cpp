// The scalar fixed-point math of kernels/common/fxp_math.h against libm and by hand.
#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <limits>
#include <random>

#include "common/fxp_math.h"

namespace {

template <typename T>
std::vector<T> probe_values() {
  std::vector<T> v = {T(0), T(-0.0), T(0.5), T(1.5), T(2.5), T(-0.5), T(-1.5), T(-2.5),
                      T(0.49999997), T(8388607.5), T(-8388607.5), T(8388608), T(1e30), T(-1e30),
                      std::numeric_limits<T>::denorm_min(), std::numeric_limits<T>::max(),
                      std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> k(-(1 << 22), 1 << 22);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int i = 0; i < 20000; ++i) {
    v.push_back(static_cast<T>(k(rng)) + T(0.5));                         // ties
    v.push_back(static_cast<T>(std::ldexp(u(rng), (i % 80) - 20)));      // all magnitudes
  }
  return v;
}

template <typename T>
void expect_roundings_match_libm() {
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  for (const T t : probe_values<T>()) {
    EXPECT_EQ(fxp::round_half_even(t), std::nearbyint(t)) << t;
    EXPECT_EQ(std::signbit(fxp::round_half_even(t)), std::signbit(std::nearbyint(t))) << t;
    EXPECT_EQ(fxp::round_floor(t), std::floor(t)) << t;
    EXPECT_EQ(fxp::round_to_code<fxp::Rounding::NearestAway>(t, 0u), std::round(t)) << t;
  }
  EXPECT_TRUE(std::isnan(fxp::round_half_even(std::numeric_limits<T>::quiet_NaN())));
}

TEST(FxpMath, RoundingsMatchLibmFloat) { expect_roundings_match_libm<float>(); }
TEST(FxpMath, RoundingsMatchLibmDouble) { expect_roundings_match_libm<double>(); }

TEST(FxpMath, SpecBounds) {
  const auto s8 = fxp::make_fxp_spec<float>(8, 4);
  EXPECT_EQ(s8.code_min, -128.0f);
  EXPECT_EQ(s8.code_max, 127.0f);
  EXPECT_EQ(s8.scale, 16.0f);
  EXPECT_EQ(s8.inv_scale, 0.0625f);
  // Note [Saturation bound in float32]
  EXPECT_EQ(fxp::make_fxp_spec<float>(25, 0).code_max, 16777215.0f);
  EXPECT_EQ(fxp::make_fxp_spec<float>(26, 0).code_max, 33554430.0f);
  EXPECT_EQ(fxp::make_fxp_spec<float>(32, 24).code_max, 2147483520.0f);
  EXPECT_EQ(fxp::make_fxp_spec<double>(32, 24).code_max, 2147483647.0);
  EXPECT_EQ(fxp::make_fxp_spec<double>(32, 31).inv_scale, std::ldexp(1.0, -31));
}

TEST(FxpMath, WrapIsTwosComplement) {
  EXPECT_EQ(fxp::wrap_code(128.0f, 128.0f), -128.0f);
  EXPECT_EQ(fxp::wrap_code(-129.0f, 128.0f), 127.0f);
  EXPECT_EQ(fxp::wrap_code(300.0, 128.0), 44.0);
  EXPECT_EQ(fxp::wrap_code(2147483648.0f, 2147483648.0f), -2147483648.0f);
  EXPECT_EQ(fxp::wrap_code(std::ldexp(1.0, 70) + std::ldexp(1.0, 20), std::ldexp(1.0, 31)), std::ldexp(1.0, 20));
  EXPECT_EQ(fxp::wrap_code(1e30f, 128.0f), 0.0f);  // a multiple of 2^8
}

// SR's decision is exactly r < p * 2^32.
TEST(FxpMath, StochasticThresholdIsExact) {
  using fxp::Rounding;
  const float t = 5.25f;  // p = 0.25: round up iff r < 2^30
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(t, (1u << 30) - 1), 6.0f);
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(t, 1u << 30), 5.0f);
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(5.0f, 0u), 5.0f);  // p = 0 never rounds up
  const float big = 1048576.25f;  // 2^20 + 0.25, where float noise addition is biased
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(big, (1u << 30) - 1), 1048577.0f);
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(big, 1u << 30), 1048576.0f);
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(-0.75f, (1u << 30) - 1), 0.0f);
  EXPECT_EQ(fxp::round_to_code<Rounding::Stochastic>(-0.75f, 1u << 30), -1.0f);
}

// Exhaustive FxP(B, F) for B <= 12 against an integer reference: every code
// +-1/4 and +-1/2 LSB, and a little beyond both ends.
TEST(FxpMath, ExhaustiveNearestEvenSmallFormats) {
  for (int B = 2; B <= 12; ++B) {
    for (int F : {0, 1, B / 2, B - 1}) {
      const auto spec = fxp::make_fxp_spec<float>(B, F);
      const int64_t qmin = -(int64_t{1} << (B - 1)), qmax = (int64_t{1} << (B - 1)) - 1;
      for (int64_t q = qmin - 3; q <= qmax + 3; ++q) {
        for (int quarter = -2; quarter <= 2; ++quarter) {
          const int64_t num = 4 * q + quarter;  // t = num / 4
          int64_t expect = q;                   // |quarter| < 2: nearest is q
          if (quarter == 2 || quarter == -2) {  // tie between q and q +- 1
            const int64_t other = q + quarter / 2;
            expect = (q % 2 == 0) ? q : other;
          }
          const bool sat = expect > qmax || expect < qmin;
          expect = std::clamp(expect, qmin, qmax);
          const float x = std::ldexp(static_cast<float>(num), -F - 2);
          bool got_sat = false;
          const float y = fxp::quantize_value<fxp::Rounding::NearestEven, fxp::Overflow::Saturate>(
              x, spec, 0u, &got_sat);
          ASSERT_EQ(y, std::ldexp(static_cast<float>(expect), -F))
              << "B=" << B << " F=" << F << " t=" << num << "/4";
          ASSERT_EQ(got_sat, sat) << "B=" << B << " F=" << F << " t=" << num << "/4";
        }
      }
    }
  }
}

}  // namespace
