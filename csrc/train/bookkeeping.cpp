#include "train/bookkeeping.h"

#include <cstdio>
#include <sstream>
#include <stdexcept>

#include "train/config.h"

namespace fxp::train {
namespace {

using nlohmann::json;

const std::vector<std::string> kMethods = {"fp32", "ste", "sqpu", "hteqpu"};
const std::vector<int64_t> kFigureBits = {32, 24, 16, 12, 8};
const std::vector<int64_t> kFigureBatches = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};

std::string format(const char* fmt, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, fmt, value);
  return buffer;
}

std::string shape_text(const json& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i].get<int64_t>());
  return s;
}

std::string pad(const std::string& s, size_t width) {
  return s.size() >= width ? s : std::string(width - s.size(), ' ') + s;
}

}  // namespace

ModelCounts model_counts(const std::vector<nn::LayerRow>& rows) {
  if (rows.empty()) throw std::invalid_argument("model_counts: the model has no layers");
  ModelCounts c{rows.front().inputs, 0, 0, 0};
  for (const auto& r : rows) {
    c.saved_inputs += r.inputs;
    c.rounded_outputs += r.rounded;
    c.parameters += r.parameters;
  }
  return c;
}

RoundingCounts rounding_counts(const ModelCounts& counts, const std::string& method,
                               const std::string& inference_rounding, bool with_momentum, int64_t batch_size) {
  RoundingCounts r{0, 0, 0};
  if (method == "fp32") return r;
  r.inference = batch_size * counts.rounded_outputs + (method == "ste" ? counts.parameters : 0);
  if (is_qpu(method)) r.update = counts.parameters * (with_momentum ? 2 : 1);
  r.stochastic = (inference_rounding == "sr" ? r.inference : 0) + (method == "sqpu" ? r.update : 0);
  return r;
}

double MemoryEstimate::total_bytes() const {
  double total = 0;
  for (const auto& t : terms) total += t.bytes();
  return total;
}

MemoryEstimate estimate_memory(const ModelCounts& c, const std::string& accounting, const std::string& method,
                               int64_t param_bits, int64_t out_bits, bool with_momentum, int64_t batch_size) {
  if (accounting != "paper" && accounting != "full") {
    throw std::invalid_argument("estimate_memory: accounting must be paper or full, not " + accounting);
  }
  const bool full = accounting == "full";
  const bool quantized = method != "fp32";
  const int64_t b = batch_size, P = c.parameters;
  const int64_t layer_inputs = c.saved_inputs - c.input_elements;  // quantized layer outputs, per sample
  MemoryEstimate e{accounting, {}};
  auto add = [&](const std::string& name, int64_t elements, int64_t bits) { e.terms.push_back({name, elements, bits}); };
  if (is_qpu(method)) {
    add("weights (on the grid)", P, param_bits);
    if (full) add("gradients", P, 32);
    if (with_momentum) add("momentum (quantized)", P, param_bits);
  } else {
    add(method == "ste" ? "weights (fp32 master copy)" : "weights", P, 32);
    if (method == "ste") add("weights (quantized copy for the forward)", P, param_bits);
    if (full) add("gradients", P, 32);
    if (full && with_momentum) add("momentum", P, 32);
  }
  add("saved network input", b * c.input_elements, 32);
  // The paper's STE keeps fake-quantized (fp32) saved inputs; see Note [Two memory accountings].
  const bool quantized_saves = quantized && (full || is_qpu(method));
  add("saved layer inputs", b * layer_inputs, quantized_saves ? out_bits : 32);
  return e;
}

json to_json(const MemoryEstimate& e) {
  json terms = json::array();
  for (const auto& t : e.terms) {
    terms.push_back({{"name", t.name}, {"elements", t.elements}, {"bits", t.bits}, {"bytes", t.bytes()}});
  }
  return {{"accounting", e.accounting}, {"terms", terms}, {"total_bytes", e.total_bytes()}};
}

std::string memory_counted_as(const std::string& method, const std::string& adapt_update) {
  if (method == "adapt") return adapt_update == "qpu" ? "sqpu" : "ste";
  if (method == "msq") return "fp32";
  return method;
}

json describe_model(const std::vector<nn::LayerRow>& rows, const std::string& method,
                    const std::string& adapt_update, const std::string& inference_rounding, int64_t param_bits,
                    int64_t out_bits, bool with_momentum, int64_t batch_size) {
  const ModelCounts c = model_counts(rows);
  json report;
  json layers = json::array();
  for (const auto& r : rows) {
    layers.push_back({{"layer", r.layer}, {"in_shape", r.in_shape}, {"out_shape", r.out_shape},
                      {"inputs", r.inputs}, {"rounded", r.rounded}, {"parameters", r.parameters}});
  }
  report["table1"] = {{"layers", layers},
                      {"totals", {{"inputs", c.saved_inputs}, {"rounded", c.rounded_outputs}, {"parameters", c.parameters}}}};
  report["config"] = {{"method", method},         {"memory_counted_as", memory_counted_as(method, adapt_update)},
                      {"inference_rounding", inference_rounding},
                      {"param_bits", param_bits}, {"out_bits", out_bits},
                      {"momentum", with_momentum}, {"batch_size", batch_size}};

  json table3 = json::object();
  for (int64_t b : {int64_t{1}, batch_size}) {
    json per_method = json::object();
    for (const auto& m : kMethods) {
      const RoundingCounts r = rounding_counts(c, m, inference_rounding, with_momentum, b);
      per_method[m] = {{"inference", r.inference}, {"update", r.update}, {"total", r.total()},
                       {"stochastic", r.stochastic}};
    }
    table3["batch_" + std::to_string(b)] = per_method;
  }
  report["table3"] = table3;

  json memory = json::object();
  for (const std::string accounting : {"paper", "full"}) {
    json per_method = json::object();
    const double ste = estimate_memory(c, accounting, "ste", param_bits, out_bits, with_momentum, batch_size).total_bytes();
    for (const auto& m : kMethods) {
      const MemoryEstimate e = estimate_memory(c, accounting, m, param_bits, out_bits, with_momentum, batch_size);
      json j = to_json(e);
      j["ratio_to_ste"] = e.total_bytes() / ste;
      per_method[m] = j;
    }
    json grid = json::array();  // Figure 2: SQPU / STE with equal parameter and output bits
    for (int64_t bits : kFigureBits) {
      json row = json::array();
      for (int64_t b : kFigureBatches) {
        row.push_back(estimate_memory(c, accounting, "sqpu", bits, bits, with_momentum, b).total_bytes() /
                      estimate_memory(c, accounting, "ste", bits, bits, with_momentum, b).total_bytes());
      }
      grid.push_back(row);
    }
    memory[accounting] = {{"methods", per_method},
                          {"figure2", {{"bits", kFigureBits}, {"batch_sizes", kFigureBatches}, {"sqpu_over_ste", grid}}}};
  }
  report["memory"] = memory;
  return report;
}

std::string describe_model_text(const json& report) {
  std::ostringstream out;
  const json& cfg = report["config"];
  const std::string model = report.value("model", "paper_cnn");
  out << "Table 1: " << (model == "paper_cnn" ? std::string("the paper's network") : model)
      << ", per sample (computed from the model)\n";
  out << "  layer         in         out        inputs   rounded  parameters\n";
  for (const auto& r : report["table1"]["layers"]) {
    const std::string layer = r["layer"].get<std::string>();
    out << "  " << layer << std::string(layer.size() < 12 ? 12 - layer.size() : 1, ' ')
        << pad(shape_text(r["in_shape"]), 9) << "  " << pad(shape_text(r["out_shape"]), 9) << "  "
        << pad(std::to_string(r["inputs"].get<int64_t>()), 8) << "  "
        << pad(r["rounded"].get<int64_t>() ? std::to_string(r["rounded"].get<int64_t>()) : "-", 8) << "  "
        << pad(r["parameters"].get<int64_t>() ? std::to_string(r["parameters"].get<int64_t>()) : "-", 10) << "\n";
  }
  const json& t = report["table1"]["totals"];
  out << "  SUM" << std::string(30, ' ') << pad(std::to_string(t["inputs"].get<int64_t>()), 8) << "  "
      << pad(std::to_string(t["rounded"].get<int64_t>()), 8) << "  "
      << pad(std::to_string(t["parameters"].get<int64_t>()), 10) << "\n\n";

  out << "Table 3: rounding operations per training step (inference rounding "
      << cfg["inference_rounding"].get<std::string>() << ", momentum " << (cfg["momentum"].get<bool>() ? "on" : "off")
      << ")\n";
  for (const auto& [batch_key, per_method] : report["table3"].items()) {
    out << "  " << batch_key << ":      inference     update      total   (of which SR)\n";
    for (const auto& m : kMethods) {
      const json& r = per_method[m];
      out << "    " << m << std::string(8 - m.size(), ' ') << pad(std::to_string(r["inference"].get<int64_t>()), 12)
          << pad(std::to_string(r["update"].get<int64_t>()), 11) << pad(std::to_string(r["total"].get<int64_t>()), 11)
          << pad(std::to_string(r["stochastic"].get<int64_t>()), 16) << "\n";
    }
  }
  out << "\nTraining memory (Eq. 5), " << cfg["param_bits"].get<int64_t>() << "-bit parameters, "
      << cfg["out_bits"].get<int64_t>() << "-bit outputs, batch " << cfg["batch_size"].get<int64_t>() << "\n";
  const std::string method = cfg["method"].get<std::string>();
  if (method != cfg.value("memory_counted_as", method)) {
    out << "  (method " << method << " is counted as " << cfg["memory_counted_as"].get<std::string>()
        << (method == "adapt" ? " at its start format; its layers' widths change as it trains, and each run's "
                                "summary.json counts them all at the widest layer's final width"
                              : "")
        << ")\n";
  }
  for (const std::string accounting : {"paper", "full"}) {
    out << "  accounting '" << accounting << "'" << (accounting == "paper" ? " (reproduces the paper's ratios)" : "")
        << ":\n";
    for (const auto& m : kMethods) {
      const json& j = report["memory"][accounting]["methods"][m];
      out << "    " << m << std::string(8 - m.size(), ' ') << pad(format("%.1f", j["total_bytes"].get<double>() / 1e3), 10)
          << " kB  " << format("%.3f", j["ratio_to_ste"].get<double>()) << " of STE   =";
      bool first = true;
      for (const auto& term : j["terms"]) {
        out << (first ? " " : " + ") << term["name"].get<std::string>() << " "
            << term["elements"].get<int64_t>() << "x" << term["bits"].get<int64_t>() << "b";
        first = false;
      }
      out << "\n";
    }
    const json& fig = report["memory"][accounting]["figure2"];
    out << "    Figure 2, SQPU / STE by total bits (rows) and batch size (columns):\n      bits";
    for (const auto& b : fig["batch_sizes"]) out << pad(std::to_string(b.get<int64_t>()), 6);
    out << "\n";
    for (size_t i = 0; i < fig["bits"].size(); ++i) {
      out << "      " << pad(std::to_string(fig["bits"][i].get<int64_t>()), 4);
      for (const auto& v : fig["sqpu_over_ste"][i]) out << pad(format("%.2f", v.get<double>()), 6);
      out << "\n";
    }
  }
  return out.str();
}

}  // namespace fxp::train
