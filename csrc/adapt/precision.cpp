#include "adapt/precision.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/ops.h"

namespace fxp::adapt {
namespace {

// ceil of a value computed in floating point, forgiving rounding noise below
// 1e-9 (0.33 * 25 + 0.67 * 25 must be 25, not 26).
int64_t ceil_int(double x) { return static_cast<int64_t>(std::ceil(x - 1e-9)); }

void check_resolution(int64_t resolution) {
  TORCH_CHECK(resolution >= 1, "fxp::adapt: resolution must be at least 1 bin, but got ", resolution);
}

// [min w, max w] of non-empty, finite weights, widened to [w - 1, w + 1] for
// a constant w (Note [AdaPT's KL test]).
std::pair<double, double> checked_range(const at::Tensor& w) {
  TORCH_CHECK(w.defined() && w.numel() > 0, "fxp::adapt: the weights are empty");
  const auto [lo_t, hi_t] = at::aminmax(w.detach());
  double lo = lo_t.item<double>(), hi = hi_t.item<double>();
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi), "fxp::adapt: the weights hold NaN or infinite values");
  if (!(hi > lo)) {
    lo -= 1;
    hi += 1;
  }
  return {lo, hi};
}

}  // namespace

// Note [AdaPT's KL test]
// Eq. 3.1 bins the empirical distribution at resolution r; fxp uses r equal
// bins over [min W, max W] for both W and its quantization Ŵ (the same edges,
// so the two histograms are comparable bin by bin), and Ŵ's values beyond
// W's range, which rounding can produce at the ends, count in the end bins.
// A constant W (min = max) is binned over [w - 1, w + 1] instead.
// Both histograms count the same n elements, so KL(P || Q) is exactly 0 iff
// every bin holds the same count: "no information lost at resolution r".
at::Tensor histogram(const at::Tensor& values, double lo, double hi, int64_t resolution) {
  check_resolution(resolution);
  if (!(hi > lo)) {  // a constant tensor: bins over [w - 1, w + 1], so a changed value shows
    lo -= 1;
    hi += 1;
  }
  return format_histogram(values.detach(), resolution, lo, hi);
}

double kl_divergence(const at::Tensor& p_counts, const at::Tensor& q_counts) {
  TORCH_CHECK(p_counts.sizes() == q_counts.sizes(), "fxp::adapt: KL needs histograms of the same bins");
  // A few hundred bins: on the host (one copy each from a device).
  const at::Tensor pc = p_counts.to(at::kCPU, at::kDouble), qc = q_counts.to(at::kCPU, at::kDouble);
  const at::Tensor p = pc / pc.sum(), q = qc / qc.sum();
  const at::Tensor support = p > 0;
  if ((support & (q == 0)).any().item<bool>()) return std::numeric_limits<double>::infinity();
  const at::Tensor ps = p.masked_select(support), qs = q.masked_select(support);
  return (ps * at::log(ps / qs)).sum().item<double>();
}

at::Tensor round_to_format(const at::Tensor& w, int64_t bits, int64_t frac) {
  TORCH_CHECK(frac >= 0 && frac <= 62, "fxp::adapt: fractional bits must be in [0, 62], but got ", frac);
  TORCH_CHECK(bits == 0 || (bits >= 2 && bits <= 32 && frac <= bits - 1), "fxp::adapt: FxP(", bits, ", ", frac,
              ") is not a format (2 <= bits <= 32, frac < bits)");
  at::Tensor codes = at::round(w.to(at::kDouble) * std::ldexp(1.0, static_cast<int>(frac)));  // half to even
  if (bits > 0) {
    const double top = std::ldexp(1.0, static_cast<int>(bits - 1));
    codes = codes.clamp(-top, top - 1);
  }
  return codes * std::ldexp(1.0, -static_cast<int>(frac));
}

double quantization_kl(const at::Tensor& w, Format format, int64_t resolution) {
  check_resolution(resolution);
  const auto [lo, hi] = checked_range(w);  // fxp::format_histogram checks the format
  const at::Tensor v = w.detach();
  return kl_divergence(format_histogram(v, resolution, lo, hi, std::vector<int64_t>{format.bits, format.frac}),
                       format_histogram(v, resolution, lo, hi));
}

// Note [AdaPT's push-down]
// PD searches FL first, then BW, each by bisection over an integer range, as
// the paper's "bisection approach" (and the authors' code) do:
// - FL_min: the smallest FL in [0, 31] for which rounding W (half to even,
//   deterministic, so PD depends on W alone; no saturation, so that FL is
//   judged apart from the range) keeps KL = 0 at resolution r.
// - BW_min: the smallest BW in [max(FL_min + 1, 2), 32] for which FxP(BW, FL_min),
//   saturating, keeps KL = 0.
// Bisection assumes losslessness is monotone in FL; it is for BW (more bits
// only saturate less), and nearly so for FL (a finer grid rounds each value no
// farther, but may round it to the other side of a bin edge). Where it is not,
// bisection returns one lossless FL, not always the smallest; the test
// compares with a brute-force scan where the scan's answer is monotone.
// Each candidate costs one fused pass over W that rounds and bins (Note [Fused
// quantize and histogram]): log2(32) + log2(32) candidates per PD, and no
// quantized copy of W. The histogram of W itself is computed once. Both
// histograms count all n (finite) elements, so KL = 0 exactly when the counts
// are equal (Note [AdaPT's KL test]): a candidate is judged by comparing the
// counts, with no KL to evaluate (the brute-force test computes the KL).
Format push_down(const at::Tensor& w, int64_t resolution, int64_t* evaluations) {
  check_resolution(resolution);
  const auto [lo, hi] = checked_range(w);
  const at::Tensor v = w.detach();
  const at::Tensor reference = format_histogram(v, resolution, lo, hi);
  auto lossless = [&](int64_t bits, int64_t frac) {
    if (evaluations) ++*evaluations;
    return at::equal(format_histogram(v, resolution, lo, hi, std::vector<int64_t>{bits, frac}), reference);
  };
  // The smallest x in [first, last] with pred(x), given pred(last); `last` when none.
  auto smallest = [](int64_t first, int64_t last, auto pred) {
    if (!pred(last)) return last;
    while (first < last) {
      const int64_t mid = first + (last - first) / 2;
      if (pred(mid)) {
        last = mid;
      } else {
        first = mid + 1;
      }
    }
    return first;
  };
  const int64_t frac = smallest(0, 31, [&](int64_t f) { return lossless(0, f); });
  const int64_t bits = smallest(std::max<int64_t>(frac + 1, 2), 32, [&](int64_t b) { return lossless(b, frac); });
  return {bits, frac};
}

double gradient_diversity(int64_t count, const at::Tensor& accumulated) {
  TORCH_CHECK(count >= 1, "fxp::adapt: gradient diversity needs at least one gradient, but got ", count);
  const double norm = accumulated.detach().to(at::kDouble).norm().item<double>();
  TORCH_CHECK(std::isfinite(norm), "fxp::adapt: the accumulated gradient holds NaN or infinite values");
  return norm > 0 ? static_cast<double>(count) / norm : std::numeric_limits<double>::infinity();
}

Strategy strategy_from_string(const std::string& name) {
  if (name == "min") return Strategy::Min;
  if (name == "mean") return Strategy::Mean;
  if (name == "max") return Strategy::Max;
  TORCH_CHECK(false, "fxp::adapt: strategy must be min, mean or max, but got '", name, "'");
}

std::string to_string(Strategy strategy) {
  switch (strategy) {
    case Strategy::Min: return "min";
    case Strategy::Mean: return "mean";
    case Strategy::Max: return "max";
  }
  return "?";
}

LogForm log_form_from_string(const std::string& name) {
  if (name == "log2") return LogForm::Log2;
  if (name == "squared_ln") return LogForm::SquaredLn;
  TORCH_CHECK(false, "fxp::adapt: log form must be log2 or squared_ln, but got '", name, "'");
}

// Note [AdaPT's push-up]
// The paper writes s1 = max(ceil(1 / (log² Δs - 1)), 1) and
// s2 = max(min(32 · log² Δs - 1, 32) - FL_min, 1). Both use one term
// X = "log² Δs - 1", read here as log2(Δs) - 1 (base-2 logarithm; the issue's
// reading of the text), or, with LogForm::SquaredLn, as (ln Δs - 1)², the
// authors' code. Then s1 = max(ceil(1 / X), 1), capped at 32 (X -> 0+), and
// s2 = max(ceil(min(32 X, 32)) - FL_min, 1). Where the term before squaring,
// log Δs - 1, is not positive (aligned gradients: Δs <= 2 with log2, <= e
// with ln; Δs = 1 for identical ones) both are 1: a push-up by one bit. An
// infinite Δs (gradients that cancel to zero) gives s1 = 1, s2 = 32 - FL_min.
Suggestions push_up_suggestions(double gradient_diversity, int64_t fl_min, LogForm log_form) {
  TORCH_CHECK(gradient_diversity > 0 && !std::isnan(gradient_diversity),
              "fxp::adapt: gradient diversity must be positive, but got ", gradient_diversity);
  // The term before any squaring decides whether to push up by more than one
  // bit (the authors' code tests ln(GD) - 1 > 0 before squaring it).
  const double d = log_form == LogForm::Log2 ? std::log2(gradient_diversity) - 1.0 : std::log(gradient_diversity) - 1.0;
  if (!(d > 0)) return {1, 1};
  const double x = log_form == LogForm::Log2 ? d : d * d;
  const int64_t s1 = ceil_int(std::clamp(1.0 / x, 1.0, 32.0));  // clamped before the conversion: 1/x may be huge
  const int64_t s2 = std::max<int64_t>(ceil_int(std::min(32.0 * x, 32.0)) - fl_min, 1);
  return {s1, s2};
}

int64_t push_up_step(const Suggestions& s, Strategy strategy) {
  switch (strategy) {
    case Strategy::Min: return std::min(s.s1, s.s2);
    case Strategy::Mean: return ceil_int(0.5 * static_cast<double>(s.s1 + s.s2));
    case Strategy::Max: return std::max(s.s1, s.s2);
  }
  return 1;
}

Format push_up(Format minimum, int64_t step, int64_t buffer_bits) {
  TORCH_CHECK(buffer_bits >= 1 && buffer_bits <= 31, "fxp::adapt: buffer bits must be in [1, 31], but got ",
              buffer_bits);
  TORCH_CHECK(step >= 0, "fxp::adapt: the push-up step must not be negative, but got ", step);
  int64_t frac = std::min<int64_t>(minimum.frac + step, 32);
  int64_t bits = std::min<int64_t>(std::max(minimum.bits, frac) + 1, 32);
  frac = std::min<int64_t>(frac, 32 - buffer_bits);
  bits = std::max<int64_t>(std::min<int64_t>(frac + buffer_bits, 32), bits);
  return {bits, frac};
}

Strategy adapt_strategy(Strategy current, double average_loss, double loss) {
  if (std::abs(average_loss) > std::abs(loss)) return Strategy::Min;
  return current == Strategy::Min ? Strategy::Mean : Strategy::Max;
}

int64_t adapt_lookback(int64_t lookback, double gradient_diversity, Bounds bounds, double gamma) {
  TORCH_CHECK(bounds.lower >= 1 && bounds.lower <= bounds.upper, "fxp::adapt: lookback bounds [", bounds.lower,
              ", ", bounds.upper, "] are not 1 <= lower <= upper");
  TORCH_CHECK(gamma >= 0 && gamma <= 1, "fxp::adapt: lookback momentum must be in [0, 1], but got ", gamma);
  // Clamped before the conversion: a diversity of 0 (or NaN) gives an infinite (NaN) ratio, whose int64 is
  // undefined; either asks for the longest lookback.
  double ratio = static_cast<double>(bounds.upper) / gradient_diversity;
  if (!(ratio <= static_cast<double>(bounds.upper))) ratio = static_cast<double>(bounds.upper);
  const int64_t proposed = std::clamp(ceil_int(ratio), bounds.lower, bounds.upper);
  return ceil_int(gamma * static_cast<double>(proposed) + (1.0 - gamma) * static_cast<double>(lookback));
}

int64_t adapt_resolution(int64_t resolution, int64_t lookback, Bounds lookback_bounds, Bounds resolution_bounds) {
  TORCH_CHECK(resolution_bounds.lower >= 1 && resolution_bounds.lower <= resolution_bounds.upper,
              "fxp::adapt: resolution bounds [", resolution_bounds.lower, ", ", resolution_bounds.upper,
              "] are not 1 <= lower <= upper");
  if (lookback == lookback_bounds.upper) ++resolution;
  else if (lookback == lookback_bounds.lower) --resolution;
  else return resolution;
  return std::clamp(resolution, resolution_bounds.lower, resolution_bounds.upper);
}

}  // namespace fxp::adapt
