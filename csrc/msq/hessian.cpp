#include "msq/hessian.h"

#include <torch/autograd.h>

#include <string>

namespace fxp::msq {

std::vector<double> hessian_traces(const torch::Tensor& loss, const std::vector<std::vector<torch::Tensor>>& layers,
                                   const HessianTraceOptions& options, const std::vector<std::string>& layer_names) {
  TORCH_CHECK(layer_names.empty() || layer_names.size() == layers.size(),
              "fxp::msq::hessian_traces: one name per layer, or none");
  const auto layer_name = [&](size_t l) { return layer_names.empty() ? std::to_string(l) : layer_names[l]; };
  TORCH_CHECK(options.samples >= 1, "fxp::msq::hessian_traces: samples must be at least 1, but got ", options.samples);
  TORCH_CHECK(loss.numel() == 1, "fxp::msq::hessian_traces: the loss must be a scalar, but has shape ", loss.sizes());
  std::vector<torch::Tensor> params;
  std::vector<size_t> layer_of;
  for (size_t l = 0; l < layers.size(); ++l) {
    for (const auto& p : layers[l]) {
      TORCH_CHECK(p.requires_grad(), "fxp::msq::hessian_traces: a parameter of layer ", layer_name(l),
                  " does not require grad (a frozen layer has no Hessian to estimate)");
      params.push_back(p);
      layer_of.push_back(l);
    }
  }
  std::vector<double> traces(layers.size(), 0.0);
  if (params.empty()) return traces;
  torch::AutoGradMode grad_on(true);
  const auto grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/true, /*create_graph=*/true,
                                           /*allow_unused=*/true);
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(grads[k].defined(), "fxp::msq::hessian_traces: the loss does not depend on layer ",
                layer_name(layer_of[k]), " (a layer the forward does not use)");
  }
  auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  for (int64_t s = 0; s < options.samples; ++s) {
    std::vector<torch::Tensor> vs;
    torch::Tensor dot = torch::zeros({}, loss.options());
    for (size_t k = 0; k < params.size(); ++k) {
      // Rademacher: 2 * Bernoulli(1/2) - 1, drawn on the CPU for every device alike.
      torch::Tensor v = torch::randint(0, 2, params[k].sizes(), generator, torch::dtype(params[k].scalar_type()))
                            .mul_(2)
                            .sub_(1)
                            .to(params[k].device());
      dot = dot + (grads[k] * v).sum();
      vs.push_back(std::move(v));
    }
    const bool last = s + 1 == options.samples;
    const auto hv = torch::autograd::grad({dot}, params, {}, /*retain_graph=*/!last, /*create_graph=*/false,
                                          /*allow_unused=*/true);
    for (size_t k = 0; k < params.size(); ++k) {
      if (hv[k].defined()) traces[layer_of[k]] += (vs[k] * hv[k]).sum().item<double>();
    }
  }
  for (double& t : traces) t /= static_cast<double>(options.samples);
  return traces;
}

}  // namespace fxp::msq
