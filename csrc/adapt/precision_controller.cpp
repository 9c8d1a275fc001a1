#include "adapt/precision_controller.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

#include "ops/ops.h"

namespace fxp::adapt {
namespace {

at::Tensor flat_cat(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.detach().flatten());
  return at::cat(flat);
}

void check_options(const AdaptOptions& o) {
  TORCH_CHECK(o.start.bits >= 2 && o.start.bits <= 32 && o.start.frac >= 0 && o.start.frac < o.start.bits,
              "fxp::adapt: the start format FxP(", o.start.bits, ", ", o.start.frac, ") is not a format");
  TORCH_CHECK(o.resolution.lower >= 1 && o.resolution.lower <= o.resolution.upper,
              "fxp::adapt: resolution bounds must satisfy 1 <= lower <= upper");
  TORCH_CHECK(o.lookback.lower >= 1 && o.lookback.lower <= o.lookback.upper,
              "fxp::adapt: lookback bounds must satisfy 1 <= lower <= upper");
  TORCH_CHECK(o.lookback_momentum >= 0 && o.lookback_momentum <= 1,
              "fxp::adapt: the lookback momentum must be in [0, 1]");
  TORCH_CHECK(o.buffer_bits >= 1 && o.buffer_bits <= 31, "fxp::adapt: buffer bits must be in [1, 31]");
  TORCH_CHECK(o.l1 >= 0 && std::isfinite(o.l1), "fxp::adapt: the L1 decay must be a non-negative number");
}

}  // namespace

PrecisionController::PrecisionController(std::vector<LayerSpec> layers, AdaptOptions options)
    : options_(options), strategy_(options.strategy) {
  check_options(options_);
  // A parameter in two layers would be normalized twice in place and have two formats.
  std::unordered_map<const c10::TensorImpl*, std::string> owner;
  for (const auto& spec : layers) {
    for (const auto& p : spec.parameters) {
      TORCH_CHECK(p.defined(), "fxp::adapt: layer ", spec.name, " has an undefined parameter");
      const auto [it, inserted] = owner.emplace(p.unsafeGetTensorImpl(), spec.name);
      TORCH_CHECK(inserted || it->second == spec.name, "fxp::adapt: layers ", it->second, " and ", spec.name,
                  " share a parameter; a shared (tied) parameter cannot have two formats");
      TORCH_CHECK(inserted, "fxp::adapt: layer ", spec.name, " lists a parameter twice");
    }
  }
  for (auto& spec : layers) {
    TORCH_CHECK(!spec.parameters.empty(), "fxp::adapt: layer ", spec.name, " has no parameters");
    AdaptedLayer l;
    l.name = std::move(spec.name);
    l.parameters = std::move(spec.parameters);
    l.format = options_.start;
    l.lookback = options_.lookback.lower;
    l.resolution = options_.resolution.lower;
    for (const auto& p : l.parameters) {
      TORCH_CHECK(p.defined() && at::isFloatingType(p.scalar_type()), "fxp::adapt: the parameters of layer ", l.name,
                  " must be floating-point tensors");
      l.accumulated.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
      l.work.parameters += p.numel();
    }
    l.density = density_at(l, l.format);
    layers_.push_back(std::move(l));
  }
  TORCH_CHECK(!layers_.empty(), "fxp::adapt: no layers with parameters to adapt");
}

void PrecisionController::set_madds(size_t layer, int64_t madds_per_sample) {
  TORCH_CHECK(layer < layers_.size(), "fxp::adapt: set_madds of layer ", layer, ", but there are ", layers_.size());
  TORCH_CHECK(madds_per_sample >= 0, "fxp::adapt: multiply-adds must not be negative, but got ", madds_per_sample);
  layers_[layer].work.madds = madds_per_sample;
}

std::vector<Format> PrecisionController::formats() const {
  std::vector<Format> out;
  for (const auto& l : layers_) out.push_back(l.format);
  return out;
}

// Note [AdaPT's schedule]
// After each backward pass, for every layer l: the gradient gets L1's term,
// is divided by its norm over all of l's parameters (Eq. 3.4), and is added
// to l's accumulator. The strategy is adapted from the loss (the mean of the
// last lb_avg losses against this one). Then each layer whose accumulator
// holds lb^l gradients switches: GD = lb^l / ||accumulated|| (Eq. 3.5), then
// lb^l and r^l are adapted, PD finds <BW_min, FL_min> on l's parameters at
// resolution r^l, and PU sets the new format from GD and the strategy; the
// accumulator starts over. The optimizer's step updates the parameters with
// the normalized gradients, and the next forward reads them at the new
// formats. "Every lb^l batches" is counted from the layer's last switch, so a
// lookback that changes never skips or repeats a switch.

// Note [AdaPT's fused step]
// after_backward serves any optimizer: it writes the normalized gradients
// into .grad, so it reads every gradient twice (the norm, then the division
// and the accumulation: fxp::layer_gradient_norms, fxp::normalize_accumulate_)
// before the optimizer reads them a third time. sgd_step fuses the second
// pass into the update: fxp::adapt_sgd_step_ normalizes each element, adds it
// to the accumulator and applies SGD to it in one pass, leaving .grad as
// backward wrote it. The arithmetic is the same element for element (one
// header, kernels/adapt_step/adapt_step_math.h), so sgd_step's parameters,
// momentum and accumulators equal after_backward followed by SGD in that
// arithmetic, bit for bit (tested). One thing differs: sgd_step switches
// after the update, so PD reads the parameters the next forward will
// quantize; after_backward switches before the optimizer's step. fused_step
// is the same for any update that takes the norms: AdaPT without a master
// copy fuses the normalization into the QPU step the same way
// (fxp::qpu_sgd_step_adapt_, Note [AdaPT's fused QPU step]).
PrecisionController::StepGradients PrecisionController::step_tensors() {
  // Note [Density at the first step]: the parameters the first step starts
  // from are the ones training starts from. A caller that puts them on their
  // grids after building the controller (fxp.adapt: QPU's initialization needs
  // the layers' start formats, which the controller gives) would otherwise
  // leave the performance model with the density of the values before. Before
  // any step, the density is the one measured at construction; a controller
  // that has taken a step (or loaded a state that has) keeps its own.
  const bool first_step = std::all_of(layers_.begin(), layers_.end(),
                                      [](const AdaptedLayer& l) { return l.work.iterations == 0; });
  if (first_step) {
    for (auto& l : layers_) l.density = density_at(l, l.format);
  }
  StepGradients s;
  for (size_t l = 0; l < layers_.size(); ++l) {
    auto& layer = layers_[l];
    for (size_t i = 0; i < layer.parameters.size(); ++i) {
      auto& p = layer.parameters[i];
      if (!p.grad().defined()) continue;
      // The ops take contiguous tensors; a strided gradient (channels_last) is replaced by a contiguous copy,
      // and a strided parameter is read from one (an update writes the copy back: StepGradients::strided).
      if (!p.grad().is_contiguous()) p.mutable_grad() = p.grad().contiguous();
      if (p.is_contiguous()) {
        s.params.push_back(p);  // in place under NoGradGuard, as torch's optimizers step
      } else {
        s.params.push_back(p.contiguous());
        s.strided.emplace_back(p, s.params.back());
      }
      s.grads.push_back(p.grad());
      s.accumulated.push_back(layer.accumulated[i]);
      s.layers.push_back(static_cast<int64_t>(l));
    }
  }
  return s;
}

bool PrecisionController::after_backward(double loss, int64_t batch_size) {
  TORCH_CHECK(batch_size >= 1, "fxp::adapt: the batch size must be positive, but got ", batch_size);
  // A diverged step (NaN or infinite loss) changes nothing here; the training
  // loop stops the run on its non-finite loss.
  if (!std::isfinite(loss)) return false;
  c10::NoGradGuard no_grad;
  const StepGradients s = step_tensors();
  if (!s.params.empty()) {
    const at::Tensor norms = fxp::layer_gradient_norms(s.params, s.grads, s.layers,
                                                       static_cast<int64_t>(layers_.size()), options_.l1);
    fxp::normalize_accumulate_(s.grads, s.accumulated, s.params, norms, s.layers, options_.l1);
  }
  return finish_step(loss, batch_size, s.layers);
}

bool PrecisionController::sgd_step(double loss, int64_t batch_size, const SgdSettings& sgd,
                                   const std::function<at::Tensor(const at::Tensor&)>& momentum_buffer) {
  return fused_step(loss, batch_size, [&](const StepGradients& s) {
    if (s.params.empty()) return;
    std::vector<at::Tensor> momentum;
    if (sgd.momentum != 0) {
      for (const auto& p : s.params) {  // the buffer of the parameter, not of its contiguous copy
        const auto it = std::find_if(s.strided.begin(), s.strided.end(),
                                     [&p](const auto& pair) { return pair.second.is_same(p); });
        momentum.push_back(momentum_buffer(it == s.strided.end() ? p : it->first));
      }
    }
    fxp::adapt_sgd_step_(s.params, s.grads, momentum, s.accumulated, s.norms, s.layers, options_.l1, sgd.lr,
                         sgd.momentum, sgd.weight_decay, sgd.nesterov);
    for (const auto& [param, copy] : s.strided) param.copy_(copy);
  });
}

bool PrecisionController::fused_step(double loss, int64_t batch_size,
                                     const std::function<void(const StepGradients&)>& update) {
  TORCH_CHECK(batch_size >= 1, "fxp::adapt: the batch size must be positive, but got ", batch_size);
  // As in after_backward, a diverged step changes nothing: no update either.
  if (!std::isfinite(loss)) return false;
  c10::NoGradGuard no_grad;
  const StepGradients s = step_gradients();
  update(s);
  return finish_step(loss, batch_size, s.layers);
}

PrecisionController::StepGradients PrecisionController::step_gradients() {
  c10::NoGradGuard no_grad;
  StepGradients s = step_tensors();
  if (!s.params.empty()) {
    s.norms = fxp::layer_gradient_norms(s.params, s.grads, s.layers, static_cast<int64_t>(layers_.size()),
                                        options_.l1);
  }
  return s;
}

void PrecisionController::measure_density(size_t layer) {
  TORCH_CHECK(layer < layers_.size(), "fxp::adapt: layer ", layer, " of ", layers_.size());
  layers_[layer].density = density_at(layers_[layer], layers_[layer].format);
}

// After the accumulation: counts, the strategy, the switches that are due.
// stepped_layers: the layer of each tensor that had a gradient (StepGradients::layers).
bool PrecisionController::finish_step(double loss, int64_t batch_size, const std::vector<int64_t>& stepped_layers) {
  TORCH_CHECK(batch_size >= 1, "fxp::adapt: the batch size must be positive, but got ", batch_size);
  TORCH_CHECK(std::isfinite(loss), "fxp::adapt: finish_step needs a finite loss, but got ", loss,
              " (a diverged step takes no step at all)");
  for (int64_t l : stepped_layers) {
    TORCH_CHECK(l >= 0 && static_cast<size_t>(l) < layers_.size(), "fxp::adapt: a stepped layer ", l, " of ",
                layers_.size());
  }
  std::vector<bool> stepped(layers_.size(), false);
  for (int64_t l : stepped_layers) stepped[static_cast<size_t>(l)] = true;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (!stepped[i]) continue;  // no gradients this step: nothing normalized or counted
    AdaptedLayer& l = layers_[i];
    ++l.count;
    // This step's forward and backward ran at the layer's current format.
    LayerWork& w = l.work;
    const double units = static_cast<double>(batch_size) * static_cast<double>(l.format.bits) / 32.0;
    w.sparse_units += units * l.density;
    w.dense_units += units;
    w.samples += batch_size;
    ++w.iterations;
  }

  const double mean_lookback =
      std::accumulate(layers_.begin(), layers_.end(), 0.0, [](double s, const AdaptedLayer& l) { return s + l.lookback; }) /
      static_cast<double>(layers_.size());
  const auto window = static_cast<size_t>(mean_lookback);
  if (window > 0 && losses_.size() >= window) {
    const double average = std::accumulate(losses_.end() - static_cast<std::ptrdiff_t>(window), losses_.end(), 0.0) /
                           static_cast<double>(window);
    strategy_ = adapt_strategy(strategy_, average, loss);
  }
  losses_.push_back(loss);
  while (losses_.size() > static_cast<size_t>(options_.lookback.upper)) losses_.pop_front();

  bool switched = false;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (layers_[i].count >= layers_[i].lookback) {
      switch_layer(i);
      switched = true;
    }
  }
  return switched;
}

void PrecisionController::switch_layer(size_t index) {
  AdaptedLayer& l = layers_[index];
  const at::Tensor accumulated = flat_cat(l.accumulated), parameters = flat_cat(l.parameters);
  if (!(at::isfinite(accumulated).all().item<bool>() && at::isfinite(parameters).all().item<bool>())) {
    // Non-finite gradients or weights (a diverging run): keep the format, start over.
    for (auto& a : l.accumulated) a.zero_();
    l.count = 0;
    return;
  }
  l.gradient_diversity = gradient_diversity(l.count, accumulated);
  l.lookback = adapt_lookback(l.lookback, l.gradient_diversity, options_.lookback, options_.lookback_momentum);
  l.resolution = adapt_resolution(l.resolution, l.lookback, options_.lookback, options_.resolution);
  l.minimum = push_down(parameters, l.resolution, &l.work.pd_evaluations);
  const int64_t step =
      push_up_step(push_up_suggestions(l.gradient_diversity, l.minimum.frac, options_.log_form), strategy_);
  const Format previous = l.format;
  l.format = push_up(l.minimum, step, options_.buffer_bits);
  if (on_format_change_ && !(l.format == previous)) on_format_change_(index, l.format);
  l.density = density_at(l, l.format);
  for (auto& a : l.accumulated) a.zero_();
  l.count = 0;
  ++l.switches;
  ++l.work.switches;
}

std::vector<LayerWork> PrecisionController::work() const {
  std::vector<LayerWork> out;
  for (const auto& l : layers_) {
    LayerWork w = l.work;
    w.bits = l.format.bits;
    w.density = l.density;
    out.push_back(w);
  }
  return out;
}

double PrecisionController::density_at(const AdaptedLayer& l, Format format) {
  const at::Tensor q = round_to_format(flat_cat(l.parameters), format.bits, format.frac);
  return (q != 0).sum().item<double>() / static_cast<double>(q.numel());
}

namespace {
// Per layer in the state: kIntegers int64 values, kReals doubles (below).
constexpr int64_t kIntegers = 11, kReals = 4;

std::string accumulated_name(size_t layer, size_t parameter) {
  return "accumulated." + std::to_string(layer) + "." + std::to_string(parameter);
}
}  // namespace

std::vector<std::pair<std::string, at::Tensor>> PrecisionController::state() const {
  std::vector<int64_t> integers, madds;
  std::vector<double> reals;
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& l = layers_[i];
    integers.insert(integers.end(), {l.format.bits, l.format.frac, l.lookback, l.resolution, l.count, l.switches,
                                     l.minimum.bits, l.minimum.frac, l.work.samples, l.work.iterations,
                                     l.work.pd_evaluations});
    reals.insert(reals.end(), {l.gradient_diversity, l.density, l.work.sparse_units, l.work.dense_units});
    madds.push_back(l.work.madds);
    for (size_t j = 0; j < l.accumulated.size(); ++j) out.emplace_back(accumulated_name(i, j), l.accumulated[j]);
  }
  const auto as_tensor = [](const auto& v, at::ScalarType dtype) {
    return at::tensor(v, at::TensorOptions().dtype(dtype));
  };
  out.emplace_back("layers", as_tensor(integers, at::kLong));
  out.emplace_back("reals", as_tensor(reals, at::kDouble));
  out.emplace_back("strategy", as_tensor(std::vector<int64_t>{static_cast<int64_t>(strategy_)}, at::kLong));
  out.emplace_back("losses", as_tensor(std::vector<double>(losses_.begin(), losses_.end()), at::kDouble));
  out.emplace_back("madds", as_tensor(madds, at::kLong));
  return out;
}

void PrecisionController::load_state(const std::function<at::Tensor(const std::string&)>& read) {
  const auto required = [&read](const std::string& name) {
    at::Tensor t = read(name);
    TORCH_CHECK(t.defined(), "fxp::adapt: the saved controller has no '", name, "'");
    return t;
  };
  const at::Tensor integers = required("layers").cpu().to(at::kLong).contiguous();
  const at::Tensor reals = required("reals").cpu().to(at::kDouble).contiguous();
  const at::Tensor strategy = required("strategy");
  const at::Tensor losses = required("losses").cpu().to(at::kDouble).contiguous();
  // Absent from checkpoints older than the Python controller: fxp-train sets it before every step.
  at::Tensor madds = read("madds");
  const auto n = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(integers.numel() == kIntegers * n && reals.numel() == kReals * n, "fxp::adapt: the saved controller has ",
              integers.numel() / kIntegers, " layers, this one ", n);
  if (madds.defined()) {
    madds = madds.cpu().to(at::kLong).contiguous();
    TORCH_CHECK(madds.numel() == n, "fxp::adapt: the saved controller has ", madds.numel(), " multiply-add counts, this one ",
                n, " layers");
  }
  TORCH_CHECK(strategy.numel() == 1, "fxp::adapt: the saved strategy must be one value");
  const int64_t stored = strategy.item<int64_t>();
  TORCH_CHECK(stored >= 0 && stored <= 2, "fxp::adapt: the saved strategy ", stored, " is unknown");
  const int64_t* s_all = integers.const_data_ptr<int64_t>();
  const double* r_all = reals.const_data_ptr<double>();
  // Check everything before changing anything.
  std::vector<std::vector<at::Tensor>> accumulated(layers_.size());
  for (int64_t i = 0; i < n; ++i) {
    const auto& l = layers_[static_cast<size_t>(i)];
    const int64_t* s = s_all + kIntegers * i;
    TORCH_CHECK(s[0] >= 2 && s[0] <= 32 && s[1] >= 0 && s[1] < s[0] && s[2] >= 1 && s[3] >= 1 && s[4] >= 0,
                "fxp::adapt: the saved controller holds an invalid state for layer ", l.name);
    for (size_t j = 0; j < l.accumulated.size(); ++j) {
      at::Tensor a = required(accumulated_name(static_cast<size_t>(i), j));
      TORCH_CHECK(a.sizes() == l.accumulated[j].sizes(), "fxp::adapt: the saved accumulated gradient ", a.sizes(),
                  " does not fit parameter ", j, " of layer ", l.name, " ", l.accumulated[j].sizes());
      accumulated[static_cast<size_t>(i)].push_back(a);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    auto& l = layers_[static_cast<size_t>(i)];
    const int64_t* s = s_all + kIntegers * i;
    const double* r = r_all + kReals * i;
    l.format = {s[0], s[1]};
    l.lookback = s[2];
    l.resolution = s[3];
    l.count = s[4];
    l.switches = l.work.switches = s[5];
    l.minimum = {s[6], s[7]};
    l.work.samples = s[8];
    l.work.iterations = s[9];
    l.work.pd_evaluations = s[10];
    l.gradient_diversity = r[0];
    l.density = r[1];
    l.work.sparse_units = r[2];
    l.work.dense_units = r[3];
    if (madds.defined()) l.work.madds = madds.const_data_ptr<int64_t>()[i];
    for (size_t j = 0; j < l.accumulated.size(); ++j) l.accumulated[j].copy_(accumulated[static_cast<size_t>(i)][j]);
  }
  strategy_ = static_cast<Strategy>(stored);
  losses_.assign(losses.const_data_ptr<double>(), losses.const_data_ptr<double>() + losses.numel());
}

}  // namespace fxp::adapt
