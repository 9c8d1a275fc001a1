// The TorchScript class over adapt::PrecisionController: arguments in the
// types TorchScript passes (lists of tensors, ints, floats, strings, dicts),
// checked here or by the controller, which names the bad value.
#include "ops/adapt/adapt_controller_class.h"

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "adapt/performance.h"
#include "adapt/precision_controller.h"

namespace fxp {
namespace {

using adapt::PrecisionController;

class AdaptControllerClass : public torch::CustomClassHolder {
 public:
  // Layer i is names[i], with the next parameter_counts[i] tensors of parameters.
  AdaptControllerClass(std::vector<std::string> names, std::vector<at::Tensor> parameters,
                       std::vector<int64_t> parameter_counts, std::vector<int64_t> start, std::vector<int64_t> resolution,
                       std::vector<int64_t> lookback, double lookback_momentum, int64_t buffer_bits,
                       const std::string& strategy, const std::string& log_form, double l1)
      : core_(make_core(std::move(names), std::move(parameters), parameter_counts, start, resolution, lookback,
                        lookback_momentum, buffer_bits, strategy, log_form, l1)) {}

  bool after_backward(double loss, int64_t batch_size) { return core_.after_backward(loss, batch_size); }

  // PrecisionController::sgd_step for torch.optim.SGD: momentum_buffers are
  // those of the parameters with gradients, in parameter order (none without momentum).
  bool sgd_step(double loss, int64_t batch_size, double lr, double momentum, double weight_decay, bool nesterov,
                const std::vector<at::Tensor>& momentum_buffers) {
    std::unordered_map<const c10::TensorImpl*, at::Tensor> buffers;
    if (momentum != 0) {
      size_t next = 0;
      for (const auto& layer : core_.layers()) {
        for (const auto& p : layer.parameters) {
          if (!p.grad().defined()) continue;
          TORCH_CHECK(next < momentum_buffers.size(), "fxp.adapt: sgd_step needs a momentum buffer per parameter "
                      "with a gradient, but got ", momentum_buffers.size());
          TORCH_CHECK(momentum_buffers[next].sizes() == p.sizes(), "fxp.adapt: momentum buffer ", next,
                      " has shape ", momentum_buffers[next].sizes(), ", but its parameter has ", p.sizes());
          buffers.emplace(p.unsafeGetTensorImpl(), momentum_buffers[next++]);
        }
      }
      TORCH_CHECK(next == momentum_buffers.size(), "fxp.adapt: sgd_step needs a momentum buffer per parameter with "
                  "a gradient (", next, "), but got ", momentum_buffers.size());
    }
    const adapt::PrecisionController::SgdSettings sgd{lr, momentum, weight_decay, nesterov};
    return core_.sgd_step(loss, batch_size, sgd,
                          [&buffers](const at::Tensor& p) { return buffers.at(p.unsafeGetTensorImpl()); });
  }

  // PrecisionController::step_gradients, for an update made in Python: the
  // layers' gradient norms (empty when no parameter has a gradient) and the
  // layer of each parameter with a gradient, in parameter order.
  std::tuple<at::Tensor, std::vector<int64_t>> step_gradients() {
    auto s = core_.step_gradients();
    return {s.norms.defined() ? s.norms : at::empty({0}, at::kDouble), s.layers};
  }

  bool finish_step(double loss, int64_t batch_size, const std::vector<int64_t>& stepped_layers) {
    return core_.finish_step(loss, batch_size, stepped_layers);
  }

  void measure_density(int64_t layer) {
    TORCH_CHECK(layer >= 0, "fxp.adapt: layer ", layer, " of ", core_.layers().size());
    core_.measure_density(static_cast<size_t>(layer));
  }

  // Each layer's accumulators (Eq. 3.5), in parameter order.
  std::vector<std::vector<at::Tensor>> accumulated() const {
    std::vector<std::vector<at::Tensor>> out;
    for (const auto& layer : core_.layers()) out.push_back(layer.accumulated);
    return out;
  }

  // Each layer's last forward, as the Python controller's hooks saw it: the
  // input's number of dimensions (-1: not run yet) and the output's shape.
  // The multiply-adds follow Note [Multiply-adds per sample]; the layer's weight is its first parameter.
  void set_forward_shapes(const std::vector<int64_t>& input_dims, const std::vector<std::vector<int64_t>>& output_sizes) {
    const size_t n = core_.layers().size();
    TORCH_CHECK(input_dims.size() == n && output_sizes.size() == n, "fxp.adapt: set_forward_shapes needs one shape "
                "per layer (", n, "), but got ", input_dims.size(), " input dims and ", output_sizes.size(),
                " output shapes");
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& weight = core_.layers()[i].parameters.front();
      const int64_t outputs =
          input_dims[i] < 0 ? 0
                            : adapt::outputs_per_sample(output_sizes[i],
                                                        adapt::is_batched_input(input_dims[i], weight.dim()));
      core_.set_madds(i, outputs * adapt::fan_in(weight.sizes()));
    }
  }

  // [bits_0, frac_0, bits_1, frac_1, ...]
  std::vector<int64_t> formats() const {
    std::vector<int64_t> out;
    for (const auto& f : core_.formats()) out.insert(out.end(), {f.bits, f.frac});
    return out;
  }

  std::string strategy() const { return adapt::to_string(core_.strategy()); }

  // Layer i's state, as fxp-train's metrics.jsonl records it (docs/adapt.md).
  c10::Dict<std::string, double> layer_record(int64_t i) const {
    TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < core_.layers().size(), "fxp.adapt: layer ", i, " of ",
                core_.layers().size());
    const auto& l = core_.layers()[static_cast<size_t>(i)];
    c10::Dict<std::string, double> d;
    d.insert("bits", static_cast<double>(l.format.bits));
    d.insert("frac", static_cast<double>(l.format.frac));
    d.insert("lookback", static_cast<double>(l.lookback));
    d.insert("resolution", static_cast<double>(l.resolution));
    d.insert("switches", static_cast<double>(l.switches));
    d.insert("gradient_diversity", l.gradient_diversity);
    d.insert("min_bits", static_cast<double>(l.minimum.bits));
    d.insert("min_frac", static_cast<double>(l.minimum.frac));
    d.insert("parameters", static_cast<double>(l.work.parameters));
    d.insert("sparsity", core_.sparsity(l));
    d.insert("samples", static_cast<double>(l.work.samples));
    d.insert("bit_samples", l.work.dense_units * 32);
    return d;
  }

  // The performance model's figures so far (adapt/performance.h).
  c10::Dict<std::string, double> performance() const {
    const auto work = core_.work();
    const adapt::TrainingCost cost = adapt::training_cost(work, core_.options().l1 > 0);
    c10::Dict<std::string, double> d;
    d.insert("cost", cost.adapt);
    d.insert("float32_cost", cost.float32);
    d.insert("training_speedup", cost.speedup());
    d.insert("model_size", adapt::model_size_ratio(work));
    d.insert("inference_speedup", adapt::inference_speedup(work));
    return d;
  }

  c10::Dict<std::string, at::Tensor> state_dict() const {
    c10::Dict<std::string, at::Tensor> d;
    for (const auto& [name, tensor] : core_.state()) d.insert(name, tensor.detach().clone());
    return d;
  }

  void load_state_dict(const c10::Dict<std::string, at::Tensor>& state) {
    core_.load_state([&state](const std::string& name) { return state.contains(name) ? state.at(name) : at::Tensor(); });
  }

 private:
  static PrecisionController make_core(std::vector<std::string> names, std::vector<at::Tensor> parameters,
                                       const std::vector<int64_t>& counts, const std::vector<int64_t>& start,
                                       const std::vector<int64_t>& resolution, const std::vector<int64_t>& lookback,
                                       double lookback_momentum, int64_t buffer_bits, const std::string& strategy,
                                       const std::string& log_form, double l1) {
    TORCH_CHECK(names.size() == counts.size(), "fxp.adapt: ", names.size(), " layer names but ", counts.size(),
                " parameter counts");
    for (const auto* pair : {&start, &resolution, &lookback}) {
      TORCH_CHECK(pair->size() == 2, "fxp.adapt: start, resolution and lookback take two values each");
    }
    std::vector<adapt::LayerSpec> layers;
    size_t next = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      TORCH_CHECK(counts[i] >= 1 && next + static_cast<size_t>(counts[i]) <= parameters.size(),
                  "fxp.adapt: the parameter counts do not add up to the ", parameters.size(), " parameters");
      adapt::LayerSpec spec{std::move(names[i]), {}};
      for (int64_t k = 0; k < counts[i]; ++k) spec.parameters.push_back(parameters[next++]);
      layers.push_back(std::move(spec));
    }
    TORCH_CHECK(next == parameters.size(), "fxp.adapt: the parameter counts do not add up to the ",
                parameters.size(), " parameters");
    adapt::AdaptOptions o;
    o.start = {start[0], start[1]};
    o.resolution = {resolution[0], resolution[1]};
    o.lookback = {lookback[0], lookback[1]};
    o.lookback_momentum = lookback_momentum;
    o.buffer_bits = buffer_bits;
    o.strategy = adapt::strategy_from_string(strategy);
    o.log_form = adapt::log_form_from_string(log_form);
    o.l1 = l1;
    return PrecisionController(std::move(layers), o);
  }

  PrecisionController core_;
};

}  // namespace

void define_adapt_controller_class(torch::Library& m) {
  m.class_<AdaptControllerClass>("AdaptController")
      .def(torch::init<std::vector<std::string>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<int64_t>, std::vector<int64_t>, double, int64_t, std::string, std::string, double>())
      .def("after_backward", &AdaptControllerClass::after_backward)
      .def("sgd_step", &AdaptControllerClass::sgd_step)
      .def("step_gradients", &AdaptControllerClass::step_gradients)
      .def("finish_step", &AdaptControllerClass::finish_step)
      .def("measure_density", &AdaptControllerClass::measure_density)
      .def("accumulated", &AdaptControllerClass::accumulated)
      .def("set_forward_shapes", &AdaptControllerClass::set_forward_shapes)
      .def("formats", &AdaptControllerClass::formats)
      .def("strategy", &AdaptControllerClass::strategy)
      .def("layer_record", &AdaptControllerClass::layer_record)
      .def("performance", &AdaptControllerClass::performance)
      .def("state_dict", &AdaptControllerClass::state_dict)
      .def("load_state_dict", &AdaptControllerClass::load_state_dict);
}

}  // namespace fxp
