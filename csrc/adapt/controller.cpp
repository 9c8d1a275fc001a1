#include "adapt/controller.h"

#include <torch/torch.h>

#include <cmath>
#include <numeric>

namespace fxp::adapt {
namespace {

at::Tensor flat_cat(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.detach().flatten());
  return torch::cat(flat);
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

Controller::Controller(nn::NetworkImpl& network, AdaptOptions options)
    : options_(options), strategy_(options.strategy) {
  check_options(options_);
  for (const auto& [name, layer] : network.quantized_layers()) {
    auto parameters = dynamic_cast<torch::nn::Module&>(*layer).parameters();
    if (parameters.empty()) {
      followers_.emplace_back(layer, layers_.empty() ? 0 : layers_.size() - 1);
      continue;
    }
    AdaptedLayer l;
    l.name = name;
    l.layer = layer;
    l.parameters = parameters;
    l.format = options_.start;
    l.lookback = options_.lookback.lower;
    l.resolution = options_.resolution.lower;
    for (const auto& p : parameters) {
      l.accumulated.push_back(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
      l.work.parameters += p.numel();
    }
    l.density = density_at(l, l.format);
    layers_.push_back(std::move(l));
  }
  TORCH_CHECK(!layers_.empty(), "fxp::adapt: the network has no quantized layers with parameters");
  apply_formats();
}

void Controller::apply_formats() {
  auto set = [](nn::QuantizedLayer& layer, Format f) {
    layer.config.param_total_bits = layer.config.act_total_bits = f.bits;
    layer.config.param_frac_bits = layer.config.act_frac_bits = f.frac;
  };
  for (auto& l : layers_) set(*l.layer, l.format);
  for (auto& [layer, leader] : followers_) set(*layer, layers_.at(leader).format);
}

// Note [AdaPT's schedule]
// After each backward pass, for every layer l: the gradient gets L1's term,
// is divided by its norm over all of l's parameters (Eq. 3.4), and is added
// to l's accumulator. The strategy is adapted from the loss (the mean of the
// last lb_avg losses against this one). Then each layer whose accumulator
// holds lb^l gradients switches: GD = lb^l / ||accumulated|| (Eq. 3.5), then
// lb^l and r^l are adapted, PD finds <BW_min, FL_min> on l's float32 master
// parameters at resolution r^l, and PU sets the new format from GD and the
// strategy; the accumulator starts over. The optimizer's step then updates
// the master copy with the normalized gradients, and the next forward reads
// it at the new formats. "Every lb^l batches" is counted from the layer's last
// switch, so a lookback that changes never skips or repeats a switch.
void Controller::after_backward(double loss, int64_t batch_size) {
  TORCH_CHECK(batch_size >= 1, "fxp::adapt: the batch size must be positive, but got ", batch_size);
  // A diverged step (NaN or infinite loss) changes nothing here; the training
  // loop stops the run on its non-finite loss.
  if (!std::isfinite(loss)) return;
  torch::NoGradGuard no_grad;
  for (auto& l : layers_) {
    // The norm stays on the gradients' device: the normalization needs no synchronization.
    torch::Tensor squared;
    for (size_t i = 0; i < l.parameters.size(); ++i) {
      auto& p = l.parameters[i];
      if (!p.grad().defined()) continue;
      if (options_.l1 > 0) p.mutable_grad().add_(p.sign(), options_.l1);
      const torch::Tensor s = p.grad().to(torch::kDouble).square().sum();
      squared = squared.defined() ? squared + s : s;
    }
    if (!squared.defined()) continue;  // no gradients this step: nothing to normalize or count
    const torch::Tensor norm = squared.sqrt();
    const torch::Tensor divisor = torch::where(norm > 0, norm, torch::ones_like(norm));  // a zero gradient stays zero
    for (size_t i = 0; i < l.parameters.size(); ++i) {
      auto& p = l.parameters[i];
      if (!p.grad().defined()) continue;
      p.mutable_grad().div_(divisor);
      l.accumulated[i].add_(p.grad());
    }
    ++l.count;
    // This step's forward and backward ran at the layer's current format.
    LayerWork& w = l.work;
    w.madds = l.layer->outputs_per_sample * l.layer->madds_per_output();
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
  if (switched) apply_formats();
}

void Controller::switch_layer(size_t index) {
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
  if (quantized_updates_ != nullptr && !(l.format == previous)) {
    quantized_updates_->change_format(index, l.format.bits, l.format.frac);
  }
  l.density = density_at(l, l.format);
  for (auto& a : l.accumulated) a.zero_();
  l.count = 0;
  ++l.switches;
  ++l.work.switches;
}

// Note [AdaPT with QPU]
// `fxp-train --method adapt --update qpu` keeps no float32 master copy: the
// layers are QPU layers, whose parameters lie on their format's grid and are
// read as they are, and a QpuSgd optimizer with one group per adapted layer
// applies the normalized gradient with stochastic rounding at that layer's
// format (the momentum at the same format). The controller is unchanged up to
// the switch: PD reads the parameters (now fixed point), PU picks the new
// format, and the layer's group moves to it, rounding the parameters and the
// momentum onto the new grid (Note [QPU format change]). A push-down that
// lowers FL makes small updates vanish in expectation only, as in SQPU.
void Controller::use_quantized_updates(optim::QpuSgd& optimizer) {
  const auto& groups = optimizer.param_groups();
  TORCH_CHECK(groups.size() == layers_.size(), "fxp::adapt: the optimizer has ", groups.size(),
              " parameter groups, but quantized updates need one per adapted layer (", layers_.size(), ")");
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& params = groups[i].params();
    bool same = params.size() == layers_[i].parameters.size();
    for (size_t k = 0; same && k < params.size(); ++k) same = params[k].is_same(layers_[i].parameters[k]);
    TORCH_CHECK(same, "fxp::adapt: parameter group ", i, " of the optimizer is not layer ", layers_[i].name,
                "'s parameters");
    const auto& o = static_cast<const optim::QpuSgdOptions&>(groups[i].options());
    TORCH_CHECK(o.total_bits() == layers_[i].format.bits && o.frac_bits() == layers_[i].format.frac,
                "fxp::adapt: parameter group ", i, " updates FxP(", o.total_bits(), ", ", o.frac_bits(),
                "), but layer ", layers_[i].name, " is at FxP(", layers_[i].format.bits, ", ",
                layers_[i].format.frac, ")");
  }
  quantized_updates_ = &optimizer;
}

std::vector<torch::optim::OptimizerParamGroup> Controller::parameter_groups(
    const optim::QpuSgdOptions& defaults) const {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (size_t i = 0; i < layers_.size(); ++i) {
    auto options = std::make_unique<optim::QpuSgdOptions>(defaults);
    options->total_bits(layers_[i].format.bits).frac_bits(layers_[i].format.frac);
    options->seed(defaults.seed() + static_cast<int64_t>(i));  // as QpuSgd's own groups
    groups.emplace_back(layers_[i].parameters, std::move(options));
  }
  return groups;
}

std::vector<LayerWork> Controller::work() const {
  std::vector<LayerWork> out;
  for (const auto& l : layers_) {
    LayerWork w = l.work;
    w.bits = l.format.bits;
    w.density = l.density;
    out.push_back(w);
  }
  return out;
}

double Controller::density_at(const AdaptedLayer& l, Format format) {
  const at::Tensor q = round_to_format(flat_cat(l.parameters), format.bits, format.frac);
  return (q != 0).sum().item<double>() / static_cast<double>(q.numel());
}

namespace {
// Per layer in a checkpoint: kIntegers int64 values, kReals doubles (below).
constexpr int64_t kIntegers = 11, kReals = 4;
}  // namespace

void Controller::save(torch::serialize::OutputArchive& archive) const {
  std::vector<int64_t> state;
  std::vector<double> reals;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& l = layers_[i];
    state.insert(state.end(), {l.format.bits, l.format.frac, l.lookback, l.resolution, l.count, l.switches,
                               l.minimum.bits, l.minimum.frac, l.work.samples, l.work.iterations,
                               l.work.pd_evaluations});
    reals.insert(reals.end(), {l.gradient_diversity, l.density, l.work.sparse_units, l.work.dense_units});
    for (size_t j = 0; j < l.accumulated.size(); ++j) {
      archive.write("accumulated." + std::to_string(i) + "." + std::to_string(j), l.accumulated[j], /*is_buffer=*/true);
    }
  }
  archive.write("layers", torch::tensor(state, torch::kLong), true);
  archive.write("reals", torch::tensor(reals, torch::kDouble), true);
  archive.write("strategy", torch::tensor({static_cast<int64_t>(strategy_)}, torch::kLong), true);
  archive.write("losses", torch::tensor(std::vector<double>(losses_.begin(), losses_.end()), torch::kDouble), true);
}

void Controller::load(torch::serialize::InputArchive& archive) {
  torch::Tensor state, reals, strategy, losses;
  archive.read("layers", state, true);
  archive.read("reals", reals, true);
  archive.read("strategy", strategy, true);
  archive.read("losses", losses, true);
  const auto n = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(state.numel() == kIntegers * n && reals.numel() == kReals * n, "fxp::adapt: the checkpoint's controller has ",
              state.numel() / kIntegers, " layers, this network ", n);
  state = state.cpu();
  reals = reals.cpu().to(torch::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    auto& l = layers_[static_cast<size_t>(i)];
    const auto s = [&](int64_t k) { return state[kIntegers * i + k].item<int64_t>(); };
    const auto r = [&](int64_t k) { return reals[kReals * i + k].item<double>(); };
    TORCH_CHECK(s(0) >= 2 && s(0) <= 32 && s(1) >= 0 && s(1) < s(0) && s(2) >= 1 && s(3) >= 1,
                "fxp::adapt: the checkpoint's controller holds an invalid state for layer ", l.name);
    l.format = {s(0), s(1)};
    l.lookback = s(2);
    l.resolution = s(3);
    l.count = s(4);
    l.switches = l.work.switches = s(5);
    l.minimum = {s(6), s(7)};
    l.work.samples = s(8);
    l.work.iterations = s(9);
    l.work.pd_evaluations = s(10);
    l.gradient_diversity = r(0);
    l.density = r(1);
    l.work.sparse_units = r(2);
    l.work.dense_units = r(3);
    for (size_t j = 0; j < l.accumulated.size(); ++j) {
      torch::Tensor a;
      archive.read("accumulated." + std::to_string(i) + "." + std::to_string(j), a, true);
      TORCH_CHECK(a.sizes() == l.accumulated[j].sizes(), "fxp::adapt: the checkpoint's accumulated gradient ",
                  a.sizes(), " does not fit parameter ", j, " of layer ", l.name, " ", l.accumulated[j].sizes());
      l.accumulated[j].copy_(a);
    }
  }
  const int64_t stored = strategy.item<int64_t>();
  TORCH_CHECK(stored >= 0 && stored <= 2, "fxp::adapt: the checkpoint's strategy ", stored, " is unknown");
  strategy_ = static_cast<Strategy>(stored);
  losses = losses.cpu().to(torch::kDouble).contiguous();
  losses_.assign(losses.data_ptr<double>(), losses.data_ptr<double>() + losses.numel());
  apply_formats();
}

}  // namespace fxp::adapt
