#include "adapt/controller.h"

#include <torch/torch.h>

#include <cmath>
#include <unordered_set>

namespace fxp::adapt {
namespace {

// The network's layers with parameters, to adapt, and (out) the others with
// the index of the adapted layer before them.
std::vector<LayerSpec> adapted_layers(nn::NetworkImpl& network, std::vector<nn::QuantizedLayer*>& bound,
                                      std::vector<std::pair<nn::QuantizedLayer*, size_t>>& followers) {
  std::vector<LayerSpec> specs;
  for (const auto& [name, layer] : network.quantized_layers()) {
    // Its codes keep the format they were packed in; AdaPT changes formats (fxp-train refuses adapt with packed).
    TORCH_CHECK(!layer->packed.weights, "fxp::adapt: layer ", name, " has packed weights, whose format is fixed; "
                "AdaPT changes the formats: build the controller over an unpacked network");
    auto parameters = dynamic_cast<torch::nn::Module&>(*layer).parameters();
    if (parameters.empty()) {
      followers.emplace_back(layer, bound.empty() ? 0 : bound.size() - 1);
      continue;
    }
    // As fxp.adapt: fp32 and msq layers read float weights and give float outputs, so formats set on them
    // would change nothing; and all layers keep a master copy (ste) or none (qpu).
    const nn::WeightMode mode = layer->config.weight_mode;
    TORCH_CHECK(mode == nn::WeightMode::Ste || mode == nn::WeightMode::Qpu, "fxp::adapt: layer ", name,
                " is not quantized (a float32 or MSQ layer); AdaPT's layers need weight mode ste (a float32 master "
                "copy read quantized) or qpu (parameters on their format's grid)");
    TORCH_CHECK(bound.empty() || bound.front()->config.weight_mode == mode, "fxp::adapt: layer ", name, " is ",
                mode == nn::WeightMode::Ste ? "an ste" : "a qpu", " layer, but the layers before it are not; AdaPT's "
                "layers all keep a master copy (ste) or none (qpu)");
    specs.push_back({name, std::move(parameters)});
    bound.push_back(layer);
  }
  TORCH_CHECK(!specs.empty(), "fxp::adapt: the network has no quantized layers with parameters");
  return specs;
}

}  // namespace

Controller::Controller(nn::NetworkImpl& network, AdaptOptions options)
    : core_(adapted_layers(network, bound_, followers_), options) {
  apply_formats();
}

void Controller::apply_formats() {
  auto set = [](nn::QuantizedLayer& layer, Format f) {
    layer.config.param_total_bits = layer.config.act_total_bits = f.bits;
    layer.config.param_frac_bits = layer.config.act_frac_bits = f.frac;
  };
  for (size_t i = 0; i < bound_.size(); ++i) set(*bound_[i], core_.layers()[i].format);
  for (auto& [layer, leader] : followers_) set(*layer, core_.layers().at(leader).format);
}

void Controller::set_madds() {
  // outputs_per_sample is the last forward's, so a layer's count follows its input size.
  for (size_t i = 0; i < bound_.size(); ++i) {
    core_.set_madds(i, bound_[i]->outputs_per_sample * bound_[i]->madds_per_output());
  }
}

void Controller::after_backward(double loss, int64_t batch_size) {
  set_madds();
  if (core_.after_backward(loss, batch_size)) apply_formats();
}

void Controller::step(double loss, int64_t batch_size, torch::optim::Optimizer& optimizer) {
  if (!std::isfinite(loss)) return;  // a diverged step changes nothing, in any form
  if (&optimizer != fused_sgd_ && &optimizer != quantized_updates_) {
    after_backward(loss, batch_size);
    optimizer.step();
    return;
  }
  set_madds();
  bool switched = false;
  if (&optimizer == quantized_updates_) {
    // Note [AdaPT's fused QPU step]: group i holds layer i's parameters (use_quantized_updates checked), so
    // layer i's accumulators and norm are group i's.
    std::vector<std::vector<torch::Tensor>> accumulated;
    for (const auto& layer : core_.layers()) accumulated.push_back(layer.accumulated);
    switched = core_.fused_step(loss, batch_size, [&](const PrecisionController::StepGradients& s) {
      quantized_updates_->step_normalized({s.norms, core_.options().l1, accumulated});
    });
  } else {
    const auto& o = static_cast<const torch::optim::SGDOptions&>(fused_sgd_->param_groups().front().options());
    const PrecisionController::SgdSettings sgd{o.lr(), o.momentum(), o.weight_decay(), o.nesterov()};
    auto& state = fused_sgd_->state();
    const auto momentum_buffer = [&state](const at::Tensor& p) {
      auto& slot = state[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto fresh = std::make_unique<torch::optim::SGDParamState>();
        fresh->momentum_buffer(torch::zeros_like(p, at::MemoryFormat::Contiguous));
        slot = std::move(fresh);
      }
      return static_cast<torch::optim::SGDParamState&>(*slot).momentum_buffer();
    };
    switched = core_.sgd_step(loss, batch_size, sgd, momentum_buffer);
  }
  if (switched) apply_formats();
}

void Controller::use_fused_sgd(torch::optim::SGD& optimizer) {
  const auto& groups = optimizer.param_groups();
  TORCH_CHECK(groups.size() == 1, "fxp::adapt: the fused SGD step needs one parameter group, but the optimizer has ",
              groups.size());
  const auto& o = static_cast<const torch::optim::SGDOptions&>(groups.front().options());
  TORCH_CHECK(o.dampening() == 0, "fxp::adapt: the fused SGD step has no dampening, but the optimizer's is ",
              o.dampening());
  std::unordered_set<const c10::TensorImpl*> adapted, held;
  for (const auto& layer : core_.layers()) {
    for (const auto& p : layer.parameters) adapted.insert(p.unsafeGetTensorImpl());
  }
  for (const auto& p : groups.front().params()) held.insert(p.unsafeGetTensorImpl());
  TORCH_CHECK(adapted == held, "fxp::adapt: the fused SGD step needs an optimizer over exactly the adapted layers' "
              "parameters (", adapted.size(), "), but it holds ", held.size(), " others or more");
  fused_sgd_ = &optimizer;
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
// step() normalizes and accumulates inside the QPU step (Note [AdaPT's fused
// QPU step]) and switches after it, as the fused SGD step does.
void Controller::use_quantized_updates(optim::QpuSgd& optimizer) {
  const auto& groups = optimizer.param_groups();
  const auto& layers = core_.layers();
  TORCH_CHECK(groups.size() == layers.size(), "fxp::adapt: the optimizer has ", groups.size(),
              " parameter groups, but quantized updates need one per adapted layer (", layers.size(), ")");
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& params = groups[i].params();
    bool same = params.size() == layers[i].parameters.size();
    for (size_t k = 0; same && k < params.size(); ++k) same = params[k].is_same(layers[i].parameters[k]);
    TORCH_CHECK(same, "fxp::adapt: parameter group ", i, " of the optimizer is not layer ", layers[i].name,
                "'s parameters");
    const auto& o = static_cast<const optim::QpuSgdOptions&>(groups[i].options());
    TORCH_CHECK(o.total_bits() == layers[i].format.bits && o.frac_bits() == layers[i].format.frac,
                "fxp::adapt: parameter group ", i, " updates FxP(", o.total_bits(), ", ", o.frac_bits(),
                "), but layer ", layers[i].name, " is at FxP(", layers[i].format.bits, ", ", layers[i].format.frac,
                ")");
  }
  core_.on_format_change(
      [&optimizer](size_t layer, Format f) { optimizer.change_format(layer, f.bits, f.frac); });
  quantized_updates_ = &optimizer;
}

std::vector<torch::optim::OptimizerParamGroup> Controller::parameter_groups(
    const optim::QpuSgdOptions& defaults) const {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  const auto& layers = core_.layers();
  for (size_t i = 0; i < layers.size(); ++i) {
    auto options = std::make_unique<optim::QpuSgdOptions>(defaults);
    // The momentum at the layer's format too, so that it follows the layer's switches (as in Python).
    options->total_bits(layers[i].format.bits).frac_bits(layers[i].format.frac);
    options->momentum_total_bits(-1).momentum_frac_bits(-1);
    options->seed(std::nullopt);  // QpuSgd::add_param_group gives group i the optimizer's seed + i
    groups.emplace_back(layers[i].parameters, std::move(options));
  }
  return groups;
}

void Controller::save(torch::serialize::OutputArchive& archive) const {
  for (const auto& [name, tensor] : core_.state()) archive.write(name, tensor, /*is_buffer=*/true);
}

void Controller::load(torch::serialize::InputArchive& archive) {
  core_.load_state([&archive](const std::string& name) {
    torch::Tensor t;
    archive.try_read(name, t, /*is_buffer=*/true);
    return t;
  });
  apply_formats();
}

}  // namespace fxp::adapt
