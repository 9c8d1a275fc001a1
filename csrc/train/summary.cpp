#include "train/summary.h"

#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <cstdio>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "train/bookkeeping.h"
#include "train/trainer.h"

namespace fxp::train {
namespace {

using nlohmann::json;

std::string percent(double x) {
  std::ostringstream s;
  s.precision(2);
  s << std::fixed << 100.0 * x << "%";
  return s.str();
}

}  // namespace

// The epoch's line of metrics.jsonl (docs/train.md).
json epoch_record(int64_t epoch, const EpochResult& trained, const Validation& v, const LayerStatistics& stats,
                  double lr, double epoch_time, double train_time, int64_t train_images) {
  return {{"epoch", epoch},
          {"train_loss", std::isfinite(trained.loss) ? json(trained.loss) : json(nullptr)},
          {"val_loss", std::isfinite(v.loss) ? json(v.loss) : json(nullptr)},
          {"val_accuracy", v.accuracy},
          {"lr", lr},
          {"epoch_time_s", epoch_time},
          {"train_time_s", train_time},
          {"images_per_s", static_cast<double>(train_images) / train_time},
          {"cuda_graph_steps", trained.graph_steps},
          {"layers", stats.layers},
          {"vanished_update_fraction", stats.vanished_fraction}};
}

std::string output_range_flags(const TrainConfig& config) {
  if (config.method == "adapt") {
    return "range: --adapt-buffer-bits, or the weights' integer bits where more";
  }
  return "range: --out-bits, --out-frac";
}

// Note [Saturation in the epoch line]: a layer's saturating outputs show in
// the loss only once they have harmed training. AdaPT's ResNet-20 at buff 8
// (docs/adapt.md) saturated 12% of a layer's outputs at epoch 1, up to 14%
// through epoch 6, 29-78% by epoch 10, and ended 4.5 points below the same
// run at buff 12; its loss turned up only at epoch 7. So the epoch line
// names the layers that saturated more than 1% of their outputs in
// validation, worst first, and what sets their range.
std::string saturation_note(const json& layers, const std::string& range_flags) {
  constexpr double kNoteAbove = 0.01;
  constexpr size_t kNamed = 3;
  std::vector<std::pair<double, std::string>> saturated;
  for (const auto& [name, entry] : layers.items()) {
    if (!entry.is_object()) continue;
    const json& fraction = entry.value("output_saturated_fraction", json());
    const double share = fraction.is_number() ? fraction.get<double>() : 0.0;  // NaN is a number, and fails the test
    if (share > kNoteAbove) saturated.emplace_back(share, name);
  }
  if (saturated.empty()) return "";
  std::stable_sort(saturated.begin(), saturated.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::string note = "  saturated outputs in validation: ";
  for (size_t i = 0; i < std::min(kNamed, saturated.size()); ++i) {
    note += (i ? ", " : "") + saturated[i].second + " " + percent(saturated[i].first);
  }
  if (saturated.size() > kNamed) {
    note += ", and " + std::to_string(saturated.size() - kNamed) + " more layer" +
            (saturated.size() - kNamed > 1 ? "s" : "") + " over 1%";
  }
  return note + " (" + range_flags + ")\n";
}

void log_epoch(std::ostream& log, const json& e, const TrainConfig& config) {
  char line[256];
  std::snprintf(line, sizeof line,
                "epoch %3lld/%lld  train loss %.4f  val loss %.4f  val acc %6.2f%%  lr %.3g  %.1f s  %.0f img/s\n",
                static_cast<long long>(e["epoch"].get<int64_t>()), static_cast<long long>(config.epochs),
                e["train_loss"].is_null() ? NAN : e["train_loss"].get<double>(),
                e["val_loss"].is_null() ? NAN : e["val_loss"].get<double>(), 100.0 * e["val_accuracy"].get<double>(),
                e["lr"].get<double>(), e["epoch_time_s"].get<double>(), e["images_per_s"].get<double>());
  log << line;
  if (e.contains("layers")) log << saturation_note(e["layers"], output_range_flags(config));
  log << std::flush;
}


json make_summary(const RunRecord& r) {
  const TrainConfig& config = r.config;
  const json& last = r.state.history.back();
  double images_per_s = 0;
  for (const auto& e : r.state.history) images_per_s += e["images_per_s"].get<double>();
  images_per_s /= static_cast<double>(r.state.history.size());
  int64_t n_params = 0;
  for (const auto& p : r.training.model->parameters()) n_params += p.numel();
  const ModelCounts counts = model_counts(r.training.model->describe());
  json memory_model = json::object();
  // AdaPT is counted (memory_counted_as) at the widest layer's final format,
  // the largest any layer needs at the end (an upper bound; adapt's
  // training_state below counts each layer at its own width).
  // The adapted layers' parameters, their sum of bit widths and the widest.
  double adapt_parameters = 0, adapt_parameter_bits = 0;
  int64_t widest = 2;
  if (last.contains("adapt")) {
    for (const auto& layer : last["adapt"]["layers"]) {
      const auto p = layer.at("parameters").get<double>();
      const auto bits = layer.at("bits").get<int64_t>();
      adapt_parameters += p;
      adapt_parameter_bits += p * static_cast<double>(bits);
      widest = std::max(widest, bits);
    }
  }
  const std::string method_for_memory = memory_counted_as(config.method, config.update);
  int64_t memory_bits = config.param_bits, memory_out_bits = config.out_bits;
  if (config.method == "adapt") memory_bits = memory_out_bits = widest;
  for (const std::string accounting : {"paper", "full"}) {
    const auto estimate = [&](const std::string& method) {
      return estimate_memory(counts, accounting, method, memory_bits, memory_out_bits, config.momentum > 0,
                             config.batch_size);
    };
    const MemoryEstimate own = estimate(method_for_memory);
    json j = to_json(own);
    j["counted_as"] = method_for_memory;
    j["ratio_to_ste"] = own.total_bytes() / estimate("ste").total_bytes();
    j["ratio_to_fp32"] = own.total_bytes() / estimate("fp32").total_bytes();
    memory_model[accounting] = j;
  }
  json summary = {{"run_name", config.run_name()},
          {"status", "finished"},
          {"stop_reason", r.state.stop_reason},
          {"epochs_completed", r.state.epochs_done},
          {"best_val_accuracy", r.state.best_accuracy},
          {"best_epoch", r.state.best_epoch},
          {"final_val_accuracy", last["val_accuracy"]},
          {"final_val_loss", last["val_loss"]},
          {"final_train_loss", last["train_loss"]},
          {"final_lr", r.state.lr},
          {"wall_time_s", r.state.wall_time_s},
          {"session_time_s", r.session_time_s},
          {"train_images_per_s", images_per_s},
          {"train_images", r.train_images},
          {"val_images", r.val_images},
          {"parameters", n_params},
          {"memory_model", memory_model},
          {"measured_memory", measured_memory(r.device, r.step_memory)},
          {"device", r.device.str()},
          {"threads", at::get_num_threads()},
          {"torch_version", TORCH_VERSION},
          {"config", r.settings}};
  // AdaPT: the performance model's figures at the end (docs/adapt.md), and the
  // training state per layer at its final format: parameters and momentum as
  // float32 (a master copy) or at the layer's width (update qpu), plus the
  // controller's float32 accumulators, against float32 SGD's parameters and momentum.
  if (last.contains("adapt")) {
    json adapt = last["adapt"]["performance"];
    const double copies = config.momentum > 0 ? 2 : 1;
    const double stored = config.update == "qpu" ? adapt_parameter_bits / 8 : 4 * adapt_parameters;
    const double state = stored * copies + 4 * adapt_parameters;
    adapt["training_state_bytes"] = state;
    adapt["training_state_ratio_to_fp32"] = adapt_parameters > 0 ? state / (4 * adapt_parameters * copies) : 0;
    summary["adapt"] = adapt;
  }
  // MSQ: the final widths and the compression rate (docs/msq.md).
  if (last.contains("msq")) {
    json widths = json::object();
    for (const auto& layer : last["msq"]["layers"]) widths[layer["name"].get<std::string>()] = layer["bits"];
    summary["msq"] = {{"compression_rate", last["msq"]["compression_rate"]}, {"bits", widths}};
  }
  return summary;
}

std::string summary_text(const json& s) {
  std::ostringstream out;
  const json& c = s["config"];
  out << "run " << s["run_name"].get<std::string>() << " on " << s["device"].get<std::string>() << " ("
      << s["threads"].get<int64_t>() << " threads), output in " << c["output_dir"].get<std::string>() << "\n";
  out << "  best validation accuracy  " << percent(s["best_val_accuracy"].get<double>()) << " (epoch "
      << s["best_epoch"].get<int64_t>() << ")\n";
  out << "  final validation accuracy " << percent(s["final_val_accuracy"].get<double>()) << " after "
      << s["epochs_completed"].get<int64_t>() << " epochs, stopped by: " << s["stop_reason"].get<std::string>() << "\n";
  if (s.contains("distributed")) {
    const json& d = s["distributed"];
    out << "  data parallel over " << d["world_size"].get<int64_t>() << " processes ("
        << d["backend"].get<std::string>() << "), replicas bit-identical after every epoch; memory below is one rank's\n";
  }
  char line[256];
  std::snprintf(line, sizeof line, "  wall time %.1f s, %.0f training images/s\n", s["wall_time_s"].get<double>(),
                s["train_images_per_s"].get<double>());
  out << line;
  for (const std::string accounting : {"paper", "full"}) {
    const json& m = s["memory_model"][accounting];
    std::snprintf(line, sizeof line, "  training memory, %s model: %.1f kB (%.3f of STE)\n", accounting.c_str(),
                  m["total_bytes"].get<double>() / 1e3, m["ratio_to_ste"].get<double>());
    out << line;
  }
  if (s["measured_memory"].contains("step")) {
    const json& m = s["measured_memory"]["step"];
    std::snprintf(line, sizeof line,
                  "  measured, one step%s: %.1f kB = parameters %.1f + gradients %.1f + optimizer state %.1f + "
                  "activations %.1f (peak %.1f kB)\n",
                  c.value("packed", false) ? " (packed)" : "", m["total_bytes"].get<double>() / 1e3,
                  m["parameters_bytes"].get<double>() / 1e3, m["gradients_bytes"].get<double>() / 1e3,
                  m["optimizer_state_bytes"].get<double>() / 1e3, m["activations_bytes"].get<double>() / 1e3,
                  m["step_peak_bytes"].get<double>() / 1e3);
    out << line;
  }
  if (s.contains("adapt")) {
    const json& a = s["adapt"];
    std::snprintf(line, sizeof line,
                  "  AdaPT performance model: training speed-up %.2f, model size %.2f of float32, inference "
                  "speed-up %.2f\n",
                  a["training_speedup"].get<double>(), a["model_size"].get<double>(),
                  a["inference_speedup"].get<double>());
    out << line;
  }
  return out.str();
}

}  // namespace fxp::train
