// The TorchScript class over msq::WidthController: arguments in the types
// TorchScript passes (lists of tensors, ints, floats, strings, dicts), checked
// by the controller, which names the bad value.
#include "ops/msq/msq_controller_class.h"

#include <torch/custom_class.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "msq/width_controller.h"

namespace fxp {
namespace {

using msq::WidthController;

class MsqControllerClass : public torch::CustomClassHolder {
 public:
  MsqControllerClass(std::vector<std::string> names, std::vector<at::Tensor> weights, int64_t start_bits,
                     int64_t min_bits, double lambda, double alpha, bool hessian, int64_t hessian_samples)
      : core_(make_core(std::move(names), std::move(weights), start_bits, min_bits, lambda, alpha, hessian,
                        hessian_samples)) {}

  at::Tensor penalty(const std::vector<std::optional<at::Tensor>>& lsb_l1) const {
    std::vector<at::Tensor> l1;
    for (const auto& t : lsb_l1) l1.push_back(t.value_or(at::Tensor()));
    return core_.penalty(l1);
  }

  std::vector<int64_t> check(const std::optional<at::Tensor>& float_path_loss, int64_t hessian_seed) {
    return core_.check(float_path_loss.value_or(at::Tensor()), static_cast<uint64_t>(hessian_seed));
  }

  void freeze() { core_.freeze(); }
  bool frozen() const { return core_.frozen(); }

  std::vector<int64_t> bits() const {
    std::vector<int64_t> out;
    for (const auto& l : core_.layers()) out.push_back(l.bits);
    return out;
  }

  std::vector<double> scales() const {
    std::vector<double> out;
    for (const auto& l : core_.layers()) out.push_back(l.scale);
    return out;
  }

  std::vector<double> sparsities() const { return core_.sparsities(); }
  double compression_rate() const { return core_.compression_rate(); }

  // Each layer's state, as fxp-train's metrics.jsonl records it (docs/msq.md):
  // width, weights, LSB sparsity now and at the last check, Hessian trace, scale.
  std::vector<c10::Dict<std::string, double>> layer_records() const {
    std::vector<c10::Dict<std::string, double>> out;
    for (const msq::MsqLayerRecord& r : core_.records()) {  // the layer's name is its position on the Python side
      c10::Dict<std::string, double> d;
      d.insert("bits", static_cast<double>(r.bits));
      d.insert("weights", static_cast<double>(r.weights));
      d.insert("lsb_sparsity", r.lsb_sparsity);
      d.insert("check_sparsity", r.check_sparsity);
      d.insert("hessian_trace", r.hessian_trace);
      d.insert("scale", r.scale);
      out.push_back(std::move(d));
    }
    return out;
  }

  c10::Dict<std::string, at::Tensor> state_dict() const {
    c10::Dict<std::string, at::Tensor> d;
    for (const auto& [name, tensor] : core_.state()) d.insert(name, tensor);
    return d;
  }

  void load_state_dict(const c10::Dict<std::string, at::Tensor>& state) {
    core_.load_state([&state](const std::string& name) { return state.contains(name) ? state.at(name) : at::Tensor(); });
  }

 private:
  static WidthController make_core(std::vector<std::string> names, std::vector<at::Tensor> weights, int64_t start_bits,
                                   int64_t min_bits, double lambda, double alpha, bool hessian,
                                   int64_t hessian_samples) {
    TORCH_CHECK(names.size() == weights.size(), "fxp.msq: ", names.size(), " layer names but ", weights.size(),
                " weights");
    std::vector<std::pair<std::string, at::Tensor>> named;
    for (size_t i = 0; i < names.size(); ++i) named.emplace_back(std::move(names[i]), std::move(weights[i]));
    msq::MsqOptions o;
    o.start_bits = start_bits;
    o.min_bits = min_bits;
    o.lambda = lambda;
    o.alpha = alpha;
    o.hessian = hessian;
    o.hessian_options.samples = hessian_samples;
    return WidthController(std::move(named), o);
  }

  WidthController core_;
};

}  // namespace

void define_msq_controller_class(torch::Library& m) {
  m.class_<MsqControllerClass>("MsqController")
      .def(torch::init<std::vector<std::string>, std::vector<at::Tensor>, int64_t, int64_t, double, double, bool,
                       int64_t>())
      .def("penalty", &MsqControllerClass::penalty)
      .def("check", &MsqControllerClass::check)
      .def("freeze", &MsqControllerClass::freeze)
      .def("frozen", &MsqControllerClass::frozen)
      .def("bits", &MsqControllerClass::bits)
      .def("scales", &MsqControllerClass::scales)
      .def("sparsities", &MsqControllerClass::sparsities)
      .def("compression_rate", &MsqControllerClass::compression_rate)
      .def("layer_records", &MsqControllerClass::layer_records)
      .def("state_dict", &MsqControllerClass::state_dict)
      .def("load_state_dict", &MsqControllerClass::load_state_dict);
}

}  // namespace fxp
