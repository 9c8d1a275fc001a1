// AdaPT's precision-switching rules (Kummer et al., docs/adapt.md), each a
// small function of its inputs so that each can be checked by hand: the
// discrete KL test of a quantization (Eq. 3.1-3.2), push-down (PD) by
// bisection, gradient diversity from the accumulated normalized gradient
// (Eq. 3.5), push-up (PU, Eq. 3.6) with the range buffer, and the adaptation
// of strategy, lookback and resolution. The controller that applies them to a
// network during training builds on these.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace fxp::adapt {

// A layer's fixed-point format <BW, FL>: total bits and fractional bits.
struct Format {
  int64_t bits = 8, frac = 4;
  bool operator==(const Format& o) const { return bits == o.bits && frac == o.frac; }
};

// The histograms KL compares (Note [AdaPT's KL test]): `resolution` equal bins
// over [lo, hi] (int64 counts, on values' device; fxp::format_histogram). Values
// outside the range (a quantization may round past an end) count in the end bins.
at::Tensor histogram(const at::Tensor& values, double lo, double hi, int64_t resolution);

// Discrete KL(P || Q) of two histograms (counts; each is normalized by its
// total, so the empirical distribution's 1/(r + 1) cancels): the sum over bins
// with P > 0 of P log(P / Q), +infinity where Q = 0 < P. Exactly 0 iff the
// normalized histograms are equal.
double kl_divergence(const at::Tensor& p_counts, const at::Tensor& q_counts);

// w rounded half to even at `frac` fractional bits; with `bits` > 0 also
// saturated to FxP(bits, frac)'s range, with bits = 0 not (float64 result).
at::Tensor round_to_format(const at::Tensor& w, int64_t bits, int64_t frac);

// KL(P || Q) with Q the histogram of w and P that of w rounded to `format`
// (bits = 0: no saturation), both at `resolution` bins over w's range.
double quantization_kl(const at::Tensor& w, Format format, int64_t resolution);

// PD (Note [AdaPT's push-down]): FL_min is the smallest FL in [0, 31] whose
// rounding (without saturation) leaves KL = 0, found by bisection; BW_min the
// smallest BW in [max(FL_min + 1, 2), 32] whose saturation at FL_min leaves KL = 0,
// also by bisection. Where no FL is lossless, FL_min = 31 (and BW_min 32).
// `evaluations`, when given, is increased by the number of candidate formats
// rounded and binned (the performance model's PD cost).
Format push_down(const at::Tensor& w, int64_t resolution, int64_t* evaluations = nullptr);

// Eq. 3.5: the gradient diversity of `count` normalized gradients whose sum is
// `accumulated`: count / ||accumulated||_2 (>= 1; +infinity for a zero sum).
double gradient_diversity(int64_t count, const at::Tensor& accumulated);

enum class Strategy { Min, Mean, Max };
Strategy strategy_from_string(const std::string& name);  // "min", "mean", "max"
std::string to_string(Strategy strategy);

// How "log²" in s1 and s2 is read (Note [AdaPT's push-up]): log2 (base-2
// logarithm, the default) or squared_ln ((ln x - 1)^2, the authors' code).
enum class LogForm { Log2, SquaredLn };  // Note [AdaPT's push-up]
LogForm log_form_from_string(const std::string& name);  // "log2", "squared_ln"

// PU's two suggestions and the step the strategy picks (Eq. 3.6).
struct Suggestions {
  int64_t s1, s2;
};
Suggestions push_up_suggestions(double gradient_diversity, int64_t fl_min, LogForm log_form);
int64_t push_up_step(const Suggestions& s, Strategy strategy);

// The new format after PU by `step` from PD's minimum, then the range buffer
// of `buffer_bits` (>= 1): FL = min(FL_min + step, 32), BW = min(max(BW_min,
// FL) + 1, 32); then FL = min(FL, 32 - buffer), BW = max(min(FL + buffer,
// 32), BW).
Format push_up(Format minimum, int64_t step, int64_t buffer_bits);

// The loss heuristic for the strategy: with the mean |loss| of the last
// lb_avg batches, `average_loss`, and this batch's `loss`: no better than
// the average moves min -> mean -> max; better goes back to min.
Strategy adapt_strategy(Strategy current, double average_loss, double loss);

struct Bounds {
  int64_t lower, upper;
};
// lb_new = min(max(ceil(lb_upr / GD), lb_lwr), lb_upr), then the momentum
// lb = ceil(gamma * lb_new + (1 - gamma) * lb).
int64_t adapt_lookback(int64_t lookback, double gradient_diversity, Bounds bounds, double gamma);
// r + 1 when the lookback sits at its upper bound, r - 1 at its lower bound,
// clamped to the resolution bounds; otherwise unchanged.
int64_t adapt_resolution(int64_t resolution, int64_t lookback, Bounds lookback_bounds, Bounds resolution_bounds);

}  // namespace fxp::adapt
