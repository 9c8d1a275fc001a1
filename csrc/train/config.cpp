#include "train/config.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <type_traits>
#include <map>
#include <set>
#include <sstream>
#include <system_error>
#include <stdexcept>

#if defined(FXP_HAVE_YAML)
#include <yaml-cpp/yaml.h>
#endif

#include "data/datasets.h"
#include "nn/models.h"
#include "train/io.h"

namespace fxp::train {
namespace {

using nlohmann::json;

// One accessor per key: reads and writes the field as JSON. The table is the
// single list of keys (config files, to_json, resume checks and the CLI all use it).
struct Field {
  std::function<json(const TrainConfig&)> get;
  std::function<void(TrainConfig&, const json&)> set;
};

template <typename T>
Field field(T TrainConfig::*member) {
  return {[member](const TrainConfig& c) { return json(c.*member); },
          [member](TrainConfig& c, const json& v) { c.*member = v.get<T>(); }};
}

// A key whose default is the dataset's: set it, or read the effective value.
template <typename T>
Field dataset_default(std::optional<T> TrainConfig::*member, T (TrainConfig::*effective)() const) {
  return {[effective](const TrainConfig& c) { return json((c.*effective)()); },
          [member](TrainConfig& c, const json& v) { c.*member = v.get<T>(); }};
}

const std::vector<std::pair<std::string, Field>>& fields() {
  static const std::vector<std::pair<std::string, Field>> table = {
      {"model", field(&TrainConfig::model)},
      {"dataset", field(&TrainConfig::dataset)},
      {"method", field(&TrainConfig::method)},
      {"param_bits", field(&TrainConfig::param_bits)},
      {"param_frac", field(&TrainConfig::param_frac)},
      {"out_bits", field(&TrainConfig::out_bits)},
      {"out_frac", field(&TrainConfig::out_frac)},
      {"inference_rounding", field(&TrainConfig::inference_rounding)},
      {"momentum_form", field(&TrainConfig::momentum_form)},
      {"packed", field(&TrainConfig::packed)},
      {"adapt_start_bits", field(&TrainConfig::adapt_start_bits)},
      {"adapt_start_frac", field(&TrainConfig::adapt_start_frac)},
      {"adapt_resolution_min", field(&TrainConfig::adapt_resolution_min)},
      {"adapt_resolution_max", field(&TrainConfig::adapt_resolution_max)},
      {"adapt_lookback_min", field(&TrainConfig::adapt_lookback_min)},
      {"adapt_lookback_max", field(&TrainConfig::adapt_lookback_max)},
      {"adapt_lookback_momentum", field(&TrainConfig::adapt_lookback_momentum)},
      {"adapt_buffer_bits", field(&TrainConfig::adapt_buffer_bits)},
      {"adapt_strategy", field(&TrainConfig::adapt_strategy)},
      {"adapt_log", field(&TrainConfig::adapt_log)},
      {"l1_decay", field(&TrainConfig::l1_decay)},
      {"update", field(&TrainConfig::update)},
      {"msq_start_bits", field(&TrainConfig::msq_start_bits)},
      {"msq_min_bits", field(&TrainConfig::msq_min_bits)},
      {"msq_lambda", field(&TrainConfig::msq_lambda)},
      {"msq_alpha", field(&TrainConfig::msq_alpha)},
      {"msq_check_every", field(&TrainConfig::msq_check_every)},
      {"msq_hessian", field(&TrainConfig::msq_hessian)},
      {"msq_hessian_samples", field(&TrainConfig::msq_hessian_samples)},
      {"msq_finetune_epochs", field(&TrainConfig::msq_finetune_epochs)},
      {"init_from", field(&TrainConfig::init_from)},
      {"batch_size", field(&TrainConfig::batch_size)},
      {"lr", field(&TrainConfig::lr)},
      {"lr_scaling", field(&TrainConfig::lr_scaling)},
      {"momentum", field(&TrainConfig::momentum)},
      {"weight_decay", field(&TrainConfig::weight_decay)},
      {"scheduler", field(&TrainConfig::scheduler)},
      {"plateau_patience", field(&TrainConfig::plateau_patience)},
      {"plateau_factor", field(&TrainConfig::plateau_factor)},
      {"epochs", field(&TrainConfig::epochs)},
      {"early_stopping", field(&TrainConfig::early_stopping)},
      {"early_stopping_patience", field(&TrainConfig::early_stopping_patience)},
      {"early_stopping_min_epochs", field(&TrainConfig::early_stopping_min_epochs)},
      {"seed", field(&TrainConfig::seed)},
      {"device", field(&TrainConfig::device)},
      {"threads", field(&TrainConfig::threads)},
      {"cuda_graphs", field(&TrainConfig::cuda_graphs)},
      {"distributed", field(&TrainConfig::distributed)},
      {"data_dir", {[](const TrainConfig& c) { return json(c.data_directory()); },
                    [](TrainConfig& c, const json& v) { c.data_dir = v.get<std::string>(); }}},
      {"train_limit", field(&TrainConfig::train_limit)},
      {"val_limit", field(&TrainConfig::val_limit)},
      {"eval_batch_size", field(&TrainConfig::eval_batch_size)},
      {"bn_recalibration_batches", field(&TrainConfig::bn_recalibration_batches)},
      {"normalize_mean", dataset_default(&TrainConfig::normalize_mean, &TrainConfig::input_mean)},
      {"normalize_std", dataset_default(&TrainConfig::normalize_std, &TrainConfig::input_std)},
      {"output_dir", field(&TrainConfig::output_dir)},
  };
  return table;
}

[[noreturn]] void bad(const std::string& key, const std::string& why, std::vector<std::string> others = {}) {
  throw SettingError(key, why, std::move(others));
}

// A double as the shortest text that reads back as it ("0.5", "1e-05", "nan"),
// not std::to_string's fixed six decimals ("-1.000000", "0.000000" for 1e-9).
std::string number_text(double value) {
  char text[32];
  const auto [end, error] = std::to_chars(text, text + sizeof(text), value);
  return error == std::errc{} ? std::string(text, end) : std::to_string(value);
}

// What a config key's JSON value must be, in words.
std::string kind_of_value(const json& current) {
  if (current.is_number_integer()) return "an integer";
  if (current.is_number()) return "a number";
  if (current.is_boolean()) return "true or false";
  return "a string";
}

// "0x10", "-0o17", "0b101", "0x1p3": a numeral in a base other than ten, which config files do not read.
bool other_base_numeral(const std::string& text) {
  const size_t digits = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
  return text.size() > digits + 2 && text[digits] == '0' &&
         std::string("xXoObB").find(text[digits + 1]) != std::string::npos &&
         std::isxdigit(static_cast<unsigned char>(text[digits + 2]));
}

// Levenshtein distance, for "did you mean" on a mistyped key.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

std::string closest_name(const std::string& word, const std::vector<std::string>& names) {
  // Close: at most a quarter of the longer name's letters differ (at least one), so "wd" is no "lr".
  std::string best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const auto& name : names) {
    const size_t d = edit_distance(word, name);
    if (d <= std::max<size_t>(1, std::max(word.size(), name.size()) / 4) && d < best_distance) {
      best = name, best_distance = d;
    }
  }
  return best;
}

namespace {

// " (did you mean 'batch_size'?)" for a key written with dashes or a typo; "" when nothing is close.
std::string closest_key_hint(const std::string& key) {
  std::string underscored = key;
  std::replace(underscored.begin(), underscored.end(), '-', '_');
  const std::string best = closest_name(underscored, config_keys());
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

void one_of(const std::string& key, const std::string& value, const std::vector<std::string>& allowed) {
  std::string list;
  for (const auto& a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "" : ", ") + a;
  }
  bad(key, "must be one of " + list + ", but got '" + value + "'");
}

// `min_key`: the setting `min` comes from, if any (adapt_lookback_max is at least adapt_lookback_min).
void at_least(const std::string& key, int64_t value, int64_t min, const std::string& min_key = "") {
  if (value < min) {
    bad(key, "must be at least " + (min_key.empty() ? "" : min_key + " = ") + std::to_string(min) + ", but got " +
                 std::to_string(value),
        min_key.empty() ? std::vector<std::string>{} : std::vector<std::string>{min_key});
  }
}

// Note [Largest batch]: a batch size is at most 2^24, far above any real batch, so that every
// int64 product of one stays in range: --describe-model's and the memory model's batch times a
// per-sample count (below 2^20 for every model, bookkeeping.cpp) and times the bits of a term, and
// an epoch's batch arithmetic (train.size() + batch_size - 1, epoch.cpp). Unchecked, a batch of
// 2^63 - 1 printed negative counts and one of 2^32 + 1 was accepted for training.
constexpr int64_t kMaxBatchSize = int64_t{1} << 24;

void at_most_batch(const std::string& key, int64_t value) {
  if (value > kMaxBatchSize) {
    bad(key, "must be at most " + std::to_string(kMaxBatchSize) + " (2^24), but got " + std::to_string(value));
  }
}

void check_format(const std::string& bits_key, int64_t bits, const std::string& frac_key, int64_t frac) {
  if (bits < 2 || bits > 32) bad(bits_key, "total bits must be in [2, 32], but got " + std::to_string(bits));
  if (frac < 0 || frac > bits - 1) {
    bad(frac_key, "fractional bits must be in [0, " + std::to_string(bits - 1) + "] for " +
                      std::to_string(bits) + " total bits, but got " + std::to_string(frac), {bits_key});
  }
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

#if defined(FXP_HAVE_YAML)
// Note [Bounded YAML]
// yaml-cpp resolves an alias to the node it names, so `a: &x [*x]` is a cycle
// and nested aliases ("billion laughs") expand exponentially. A config is a
// flat mapping of keys to scalars, so the conversion refuses anything deeper
// than kMaxYamlDepth or with more than kMaxYamlNodes values, with an error
// instead of a stack overflow or unbounded memory.
constexpr int kMaxYamlDepth = 16;
constexpr int64_t kMaxYamlNodes = 10000;

// A YAML number beyond a double's range; the mapping that holds it names its key.
struct NumberOverflow {
  std::string text;
};

struct YamlReader {
  const std::string& path;
  int64_t nodes = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::invalid_argument("config file " + path + ": " + why);
  }

  // A scalar with an explicit standard tag (!!str, !!int, ...) converts as the tag says.
  json tagged(const std::string& tag, const std::string& text) const {
    const std::string kind = tag.substr(tag.rfind(':') + 1);
    if (kind != "str" && kind != "int" && kind != "float" && kind != "bool" && kind != "null") {
      fail("unknown YAML tag '" + tag + "' on '" + text + "'");
    }
    if (kind == "str") return text;
    json value = plain(text);
    const bool ok = (kind == "int" && value.is_number_integer()) || (kind == "float" && value.is_number()) ||
                    (kind == "bool" && value.is_boolean()) || (kind == "null" && value.is_null());
    if (!ok) fail("'" + text + "' is not a valid !!" + kind);
    return kind == "float" ? json(value.get<double>()) : value;
  }

  // YAML scalars carry no type; take the JSON type the text spells. A number
  // reads as a flag's does (Note [Integer flags], cli.cpp): integers in decimal,
  // floats in decimal or scientific notation, so "0x10", "0o10", "0x1p3", "inf"
  // and "nan" stay text, which the key's type check refuses. An integer outside
  // int64 reads as JSON's does (unsigned up to 2^64 - 1, else a double), so that
  // apply_json says it is outside the 64-bit integer range, and a float key takes it.
  static json plain(const std::string& text) {
    if (text == "true" || text == "True") return true;
    if (text == "false" || text == "False") return false;
    if (text == "null" || text == "~" || text.empty()) return nullptr;
    int64_t i = 0;
    const DecimalRead as_integer = read_decimal(text, i);
    if (as_integer == DecimalRead::kOk) return i;
    uint64_t u = 0;
    if (as_integer == DecimalRead::kOutOfRange && read_decimal(text, u) == DecimalRead::kOk) return u;
    double d = 0;
    const DecimalRead as_double = read_decimal(text, d);
    if (as_double == DecimalRead::kOutOfRange) throw NumberOverflow{text};  // refused, as a flag's is
    return as_double == DecimalRead::kOk ? json(d) : json(text);
  }

  json convert(const YAML::Node& node, int depth) {
    if (depth > kMaxYamlDepth) fail("nested deeper than " + std::to_string(kMaxYamlDepth) + " levels (a recursive alias?)");
    if (++nodes > kMaxYamlNodes) {
      fail("holds more than " + std::to_string(kMaxYamlNodes) + " values (nested aliases?)");
    }
    switch (node.Type()) {
      case YAML::NodeType::Null:
      case YAML::NodeType::Undefined:
        return nullptr;
      case YAML::NodeType::Sequence: {
        check_tag(node, "seq");
        json out = json::array();
        for (const auto& item : node) out.push_back(convert(item, depth + 1));
        return out;
      }
      case YAML::NodeType::Map: {
        check_tag(node, "map");
        json out = json::object();
        for (const auto& kv : node) {
          if (!kv.first.IsScalar()) fail("a key must be a plain name");
          const std::string key = kv.first.Scalar();
          if (out.contains(key)) fail("key '" + key + "' is given twice");
          try {
            out[key] = convert(kv.second, depth + 1);
          } catch (const NumberOverflow& e) {
            fail("key '" + key + "' is " + e.text + ", out of the range of a 64-bit float");
          }
        }
        return out;
      }
      case YAML::NodeType::Scalar: {
        const std::string& tag = node.Tag();
        if (tag == "!") return node.Scalar();  // quoted: a string
        if (tag == "?" || tag.empty()) return plain(node.Scalar());
        if (tag.rfind("tag:yaml.org,2002:", 0) == 0) return tagged(tag, node.Scalar());
        fail("unknown YAML tag '" + tag + "' on '" + node.Scalar() + "'");
      }
    }
    return nullptr;
  }

  // The whole document; a number beyond a double outside any mapping is named by its text.
  json convert_document(const YAML::Node& node) {
    try {
      return convert(node, 0);
    } catch (const NumberOverflow& e) {
      fail("the number " + e.text + " is out of the range of a 64-bit float");
    }
  }

  void check_tag(const YAML::Node& node, const std::string& kind) const {
    const std::string& tag = node.Tag();
    if (!(tag.empty() || tag == "?" || tag == "!" || tag == "tag:yaml.org,2002:" + kind)) {
      fail("unknown YAML tag '" + tag + "'");
    }
  }
};
#endif

}  // namespace

// An unknown dataset falls back to Fashion-MNIST's values here, so that a
// config can be printed before validate() names the bad dataset.
static const data::DatasetInfo& info_or_default(const std::string& dataset) {
  for (const auto& name : data::dataset_names()) {
    if (name == dataset) return data::dataset_info(name);
  }
  return data::dataset_info("fashion-mnist");
}

std::string TrainConfig::data_directory() const {
  return data_dir.empty() ? info_or_default(dataset).default_dir : data_dir;
}
double TrainConfig::input_mean() const { return normalize_mean.value_or(info_or_default(dataset).mean); }
double TrainConfig::input_std() const { return normalize_std.value_or(info_or_default(dataset).std); }
std::pair<int64_t, int64_t> TrainConfig::epoch_images() const {
  const data::DatasetInfo& info = info_or_default(dataset);
  return {train_limit > 0 ? train_limit : info.train_images, val_limit > 0 ? val_limit : info.test_images};
}

double TrainConfig::initial_lr() const {
  return lr_scaling == "linear" ? lr * static_cast<double>(batch_size) / 1024.0 : lr;
}

std::string TrainConfig::run_name() const {
  std::ostringstream name;
  if (model != "paper_cnn") name << model << "-";
  if (dataset != "fashion-mnist") name << dataset << "-";
  name << method;
  if (method == "adapt") {
    // The settings a grid may vary, where they are not the paper's defaults.
    const TrainConfig d;
    name << "-start" << adapt_start_bits << "." << adapt_start_frac << "-buf" << adapt_buffer_bits;
    if (adapt_lookback_min != d.adapt_lookback_min || adapt_lookback_max != d.adapt_lookback_max) {
      name << "-lb" << adapt_lookback_min << "." << adapt_lookback_max;
    }
    if (adapt_resolution_min != d.adapt_resolution_min || adapt_resolution_max != d.adapt_resolution_max) {
      name << "-r" << adapt_resolution_min << "." << adapt_resolution_max;
    }
    if (adapt_lookback_momentum != d.adapt_lookback_momentum) name << "-g" << adapt_lookback_momentum;
    if (adapt_strategy != d.adapt_strategy) name << "-" << adapt_strategy;
    if (adapt_log != d.adapt_log) name << "-" << adapt_log;
    if (l1_decay != d.l1_decay) name << "-l1_" << l1_decay;
    if (update != d.update) name << "-" << update;
  } else if (method == "msq") {
    const TrainConfig d;
    name << "-n" << msq_start_bits << "-lam" << msq_lambda << "-a" << msq_alpha;
    if (msq_min_bits != d.msq_min_bits) name << "-min" << msq_min_bits;
    if (msq_check_every != d.msq_check_every) name << "-every" << msq_check_every;
    if (!msq_hessian) name << "-nohessian";
    if (msq_finetune_epochs != d.msq_finetune_epochs) name << "-ft" << msq_finetune_epochs;
  } else if (method != "fp32") {
    name << "-p" << param_bits << "." << param_frac << "-o" << out_bits << "." << out_frac << "-"
         << inference_rounding;
  }
  if (momentum_form != "standard") name << "-" << momentum_form;
  if (bn_recalibration_batches > 0 && nn::network_has_batch_norm(model)) name << "-bnr" << bn_recalibration_batches;
  name << "-b" << batch_size << "-s" << seed;
  if (packed) name << "-packed";
  if (distributed) name << "-dist";
  return name.str();
}

// Note [Settings without effect]
// A setting the run's method, model, scheduler or early stopping does not
// read is named in the run's log (and in --print-configs' "unread"), not
// refused, and kept out of the run name: a grid's base may hold the settings of
// its other blocks' methods (msq-resnet20.yaml gives its fp32 block MSQ's).
// Settings that would change what a method does if it read them (l1_decay,
// update, momentum_form, packed) are refused by validate() instead.
std::vector<std::pair<std::string, std::string>> TrainConfig::unread_settings() const {
  std::vector<std::pair<std::string, std::string>> unread;
  const bool float_layers = method == "fp32" || method == "msq";
  for (const std::string key : {"param_bits", "param_frac", "out_bits", "out_frac"}) {
    if (float_layers) {
      unread.emplace_back(key, method == "msq"
                                   ? "method msq keeps float layer outputs and its own weight widths (msq_start_bits)"
                                   : "method fp32 keeps float weights and layer outputs");
    }
    if (method == "adapt") unread.emplace_back(key, "method adapt starts every layer at adapt_start_bits and adapt_start_frac");
  }
  if (float_layers) unread.emplace_back("inference_rounding", "method " + method + " rounds no layer outputs");
  for (const auto& [key, f] : fields()) {
    if (method != "adapt" && key.rfind("adapt_", 0) == 0) unread.emplace_back(key, "it is AdaPT's (method adapt)");
    if (method != "msq" && key.rfind("msq_", 0) == 0) unread.emplace_back(key, "it is MSQ's (method msq)");
    if (scheduler != "plateau" && key.rfind("plateau_", 0) == 0) unread.emplace_back(key, "scheduler is " + scheduler);
  }
  if (method == "msq" && !msq_hessian) unread.emplace_back("msq_hessian_samples", "msq_hessian is off");
  if (!nn::network_has_batch_norm(model)) {
    unread.emplace_back("bn_recalibration_batches", "model " + model + " has no batch norm");
  }
  if (!early_stopping) {
    for (const std::string key : {"early_stopping_patience", "early_stopping_min_epochs"}) {
      unread.emplace_back(key, "early_stopping is off");
    }
  }
  return unread;
}

std::vector<std::string> TrainConfig::settings_without_effect() const {
  const json mine = to_json(*this), defaults = to_json(TrainConfig{});
  std::vector<std::string> notes;
  for (const auto& [key, why] : unread_settings()) {
    if (mine[key] != defaults[key]) notes.push_back(key + " = " + mine[key].dump() + " has no effect: " + why);
  }
  return notes;
}

void TrainConfig::validate() const {
  one_of("model", model, nn::network_names());
  one_of("dataset", dataset, data::dataset_names());
  one_of("method", method, {"fp32", "ste", "sqpu", "hteqpu", "adapt", "msq"});
  if (msq_min_bits < 1 || msq_start_bits < msq_min_bits || msq_start_bits > 15) {
    bad("msq_start_bits", "must be at most 15 and at least msq_min_bits, itself at least 1 (1 <= msq_min_bits "
                          "<= msq_start_bits <= 15), but got msq_min_bits " + std::to_string(msq_min_bits) +
                          " and msq_start_bits " + std::to_string(msq_start_bits), {"msq_min_bits"});
  }
  if (!(msq_lambda >= 0) || !std::isfinite(msq_lambda)) {
    bad("msq_lambda", "must be a non-negative number, but got " + number_text(msq_lambda));
  }
  if (!(msq_alpha >= 0 && msq_alpha <= 1)) bad("msq_alpha", "must be in [0, 1], but got " + number_text(msq_alpha));
  at_least("msq_check_every", msq_check_every, 1);
  at_least("msq_hessian_samples", msq_hessian_samples, 1);
  at_least("msq_finetune_epochs", msq_finetune_epochs, 0);
  at_least("epochs", epochs, 1);  // before the checks that compare with it
  if (msq_finetune_epochs > epochs) {
    bad("msq_finetune_epochs", "is more than the run's " + std::to_string(epochs) + " epochs", {"epochs"});
  }
  check_format("param_bits", param_bits, "param_frac", param_frac);
  check_format("out_bits", out_bits, "out_frac", out_frac);
  one_of("inference_rounding", inference_rounding, {"hte", "sr"});
  check_format("adapt_start_bits", adapt_start_bits, "adapt_start_frac", adapt_start_frac);
  at_least("adapt_resolution_min", adapt_resolution_min, 1);
  at_least("adapt_resolution_max", adapt_resolution_max, adapt_resolution_min, "adapt_resolution_min");
  at_least("adapt_lookback_min", adapt_lookback_min, 1);
  at_least("adapt_lookback_max", adapt_lookback_max, adapt_lookback_min, "adapt_lookback_min");
  if (!(adapt_lookback_momentum >= 0 && adapt_lookback_momentum <= 1)) {
    bad("adapt_lookback_momentum", "must be in [0, 1], but got " + number_text(adapt_lookback_momentum));
  }
  if (adapt_buffer_bits < 1 || adapt_buffer_bits > 31) {
    bad("adapt_buffer_bits", "must be in [1, 31], but got " + std::to_string(adapt_buffer_bits));
  }
  one_of("adapt_strategy", adapt_strategy, {"min", "mean", "max"});
  one_of("adapt_log", adapt_log, {"log2", "squared_ln"});
  if (!(l1_decay >= 0) || !std::isfinite(l1_decay)) {
    bad("l1_decay", "must be a non-negative number, but got " + number_text(l1_decay));
  }
  if (l1_decay > 0 && method != "adapt") bad("l1_decay", "is AdaPT's (method adapt) only", {"method"});
  one_of("update", update, {"float", "qpu"});
  if (update != "float" && method != "adapt") {
    bad("update", "chooses AdaPT's update (method adapt); sqpu and hteqpu are quantized updates already", {"method"});
  }
  one_of("momentum_form", momentum_form, {"standard", "paper_eq6"});
  if (momentum_form != "standard" && !is_qpu(method) && !(method == "adapt" && update == "qpu")) {
    bad("momentum_form", "is the QPU step's (methods sqpu and hteqpu, and adapt with update qpu); method " + method +
                             " steps with torch's SGD",
        {"method", "update"});
  }
  at_least("batch_size", batch_size, 1);
  at_most_batch("batch_size", batch_size);
  if (!(lr > 0) || !std::isfinite(lr)) bad("lr", "must be a positive number, but got " + number_text(lr));
  one_of("lr_scaling", lr_scaling, {"none", "linear"});
  if (!(initial_lr() > 0) || !std::isfinite(initial_lr())) {
    bad("lr", "after lr_scaling " + lr_scaling + " it is " + number_text(initial_lr()) +
                  ", which is not a positive finite number", {"lr_scaling", "batch_size"});
  }
  if (!(momentum >= 0 && momentum < 1)) bad("momentum", "must be in [0, 1), but got " + number_text(momentum));
  if (!(weight_decay >= 0) || !std::isfinite(weight_decay)) {
    bad("weight_decay", "must be a non-negative number, but got " + number_text(weight_decay));
  }
  one_of("scheduler", scheduler, {"none", "plateau"});
  at_least("plateau_patience", plateau_patience, 0);
  if (!(plateau_factor > 0 && plateau_factor < 1)) {
    bad("plateau_factor", "must be in (0, 1), but got " + number_text(plateau_factor));
  }
  at_least("early_stopping_patience", early_stopping_patience, 1);
  at_least("early_stopping_min_epochs", early_stopping_min_epochs, 0);
  at_least("threads", threads, 0);
  // A typo's thousands of threads would start (and hang the machine) before any other error shows.
  constexpr int64_t kMaxThreads = 4096;
  if (threads > kMaxThreads) {
    bad("threads", "must be at most " + std::to_string(kMaxThreads) + " (0: LibTorch's default), but got " +
                       std::to_string(threads));
  }
  if (cuda_graphs) {
    if (device.rfind("cuda", 0) != 0) {
      bad("cuda_graphs", "captures CUDA work: it needs device cuda, but device is " + device, {"device"});
    }
    if (method == "adapt" || method == "msq") {
      bad("cuda_graphs", "supports methods fp32, ste, sqpu and hteqpu; " + method +
                             " decides on the host between steps (it reads the loss or the weights back)",
          {"method"});
    }
  }
  if (distributed && cuda_graphs) {
    bad("distributed", "cannot be combined with cuda_graphs yet: the gradients' all-reduce is not captured",
        {"cuda_graphs"});
  }
  at_least("train_limit", train_limit, 0);
  at_least("val_limit", val_limit, 0);
  // Beyond the published split it can only fail when the data is read (load_split), after a sweep planned it.
  const data::DatasetInfo& info = data::dataset_info(dataset);  // dataset checked above
  if (train_limit > info.train_images) {
    bad("train_limit", "must be at most " + std::to_string(info.train_images) + ", the images of " + dataset +
                           "'s training split (0: all of them), but got " + std::to_string(train_limit), {"dataset"});
  }
  if (val_limit > info.test_images) {
    bad("val_limit", "must be at most " + std::to_string(info.test_images) + ", the images of " + dataset +
                         "'s test split (0: all of them), but got " + std::to_string(val_limit), {"dataset"});
  }
  at_least("eval_batch_size", eval_batch_size, 1);
  at_most_batch("eval_batch_size", eval_batch_size);
  at_least("bn_recalibration_batches", bn_recalibration_batches, 0);
  // The images are normalized in float32 (setup.cpp): a value beyond its range would be inf there, and a
  // standard deviation that rounds to 0 a division by zero; the run's loss would be NaN, its exit status 0.
  constexpr double kFloatMax = std::numeric_limits<float>::max();
  if (!(std::abs(input_mean()) <= kFloatMax)) {
    bad("normalize_mean", "must be a finite number that float32 holds (magnitude at most " + number_text(kFloatMax) +
                              "), but got " + number_text(input_mean()));
  }
  if (!(input_std() > 0 && input_std() <= kFloatMax && static_cast<float>(input_std()) > 0)) {
    bad("normalize_std", "must be a positive finite number that float32 holds (at most " + number_text(kFloatMax) +
                             ", and not so small that it rounds to 0), but got " + number_text(input_std()));
  }
  {  // and the normalized pixels themselves, (x - mean) / std for x in [0, 1], in float32's range
    const double mean = static_cast<float>(input_mean()), deviation = static_cast<float>(input_std());
    if (!(std::max(std::abs(mean), std::abs(1.0 - mean)) / deviation <= kFloatMax)) {
      bad("normalize_std",
          "with normalize_mean " + number_text(input_mean()) + ", a standard deviation of " +
              number_text(input_std()) + " makes normalized pixels, (x - mean) / std for x in [0, 1], beyond "
              "float32's range",
          {"normalize_mean"});
    }
  }
  if (packed && method == "fp32") bad("packed", "stores fixed-point codes, and fp32 has none to store", {"method"});
  if (packed && method == "msq") bad("packed", "is not supported by MSQ yet: its activations are float", {"method"});
  if (packed && method == "adapt") {
    bad("packed", update == "qpu" ? "AdaPT's formats change during training; packed storage cannot follow them yet"
                                  : "AdaPT keeps a float32 master copy; it has no packed form yet",
        {"method", "update"});
  }
  if (packed && model != "paper_cnn" && model != "lenet5") {
    bad("packed", "packed storage is supported for models paper_cnn and lenet5 only (yet), not " + model, {"model"});
  }
  if (packed && model == "lenet5" && !is_qpu(method)) {
    bad("packed", "lenet5 packs the QPU methods' weights and momentum only (its saved activations are tanh "
                  "outputs, off any grid), and " + method + " keeps float32 weights: nothing to pack",
        {"model", "method"});
  }
  // cuda:N with N a decimal index, as torch::Device parses it (it throws for
  // anything else only when the run starts, after the sweep took it as valid).
  // c10::DeviceIndex is an int8_t: cuda:255 would wrap to -1, the current device.
  const std::string index = device.rfind("cuda:", 0) == 0 ? device.substr(5) : "";
  const bool cuda_index = !index.empty() && index.size() <= 3 &&
                          std::all_of(index.begin(), index.end(), [](unsigned char ch) { return std::isdigit(ch); }) &&
                          (index == "0" || index[0] != '0') && std::stoi(index) <= 127;
  if (device != "cpu" && device != "cuda" && !cuda_index) {
    bad("device", "must be cpu, cuda or cuda:N (N a device index), but got '" + device + "'");
  }
}

const std::vector<std::string>& config_keys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    for (const auto& f : fields()) k.push_back(f.first);
    return k;
  }();
  return keys;
}

json to_json(const TrainConfig& config) {
  json out = json::object();
  for (const auto& [key, f] : fields()) out[key] = f.get(config);
  return out;
}

void apply_json(TrainConfig& config, const json& values, const std::string& origin) {
  if (!values.is_object()) throw std::invalid_argument(origin + ": expected a mapping of keys to values");
  for (const auto& [key, value] : values.items()) {
    // A distributed run's config.json records its process count, which the environment sets, not a
    // setting: skipped, so that "-c DIR/config.json --resume" reads any run's own file.
    if (key == "world_size" && value.is_number_integer()) continue;
    auto it = std::find_if(fields().begin(), fields().end(), [&](const auto& f) { return f.first == key; });
    if (it == fields().end()) {
      throw std::invalid_argument(origin + ": unknown key '" + key + "'" + closest_key_hint(key));
    }
    const json current = it->second.get(config);
    // Accept 1 for 1.0; reject every other type mismatch (e.g. "16" for a number).
    const bool ok = (current.is_number_float() && value.is_number()) ||
                    (current.is_number_integer() && value.is_number_integer()) ||
                    (current.is_boolean() && value.is_boolean()) || (current.is_string() && value.is_string());
    // An integer beyond int64 that JSON (or YAML, as JSON) read as a double: said as beyond the range, as
    // one below 2^64 is, not as a non-integer. (-2^63 - 1 reads as -2^63, a double, so <= it.)
    if (current.is_number_integer() && value.is_number_float() && std::nearbyint(value.get<double>()) ==
        value.get<double>() && std::abs(value.get<double>()) >= 0x1p63) {
      throw std::invalid_argument(origin + ": key '" + key + "' is " + value.dump() +
                                  ", outside the 64-bit integer range");
    }
    if (!ok) {
      // A string that C would read as a number in another base ("0x10"): the rule is decimal.
      const std::string base_note = current.is_number() && value.is_string() &&
                                            other_base_numeral(value.get<std::string>())
                                        ? current.is_number_integer() ? " in decimal" : " in decimal or scientific notation"
                                        : "";
      throw std::invalid_argument(origin + ": key '" + key + "' needs " + kind_of_value(current) + base_note +
                                  ", but got " + value.dump());
    }
    // nlohmann reads integers above the int64 range as unsigned; get<int64_t> would wrap them.
    if (current.is_number_integer() && value.is_number_unsigned() &&
        value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw std::invalid_argument(origin + ": key '" + key + "' is " + value.dump() +
                                  ", outside the 64-bit integer range");
    }
    it->second.set(config, value);
  }
}

template <typename T>
DecimalRead read_decimal(const std::string& text, T& value) {
  constexpr bool kInteger = std::is_integral_v<T>;
  const char* begin = text.data();
  const char* const end = begin + text.size();
  // Digits and signs (and a point and an exponent for a double): from_chars also reads "nan" and "inf".
  const bool numeral = std::all_of(begin, end, [](unsigned char ch) {
    return std::isdigit(ch) || ch == '+' || ch == '-' || (!kInteger && (ch == '.' || ch == 'e' || ch == 'E'));
  });
  // from_chars takes '-' but not '+'; "+-1" is no number.
  if (begin != end && *begin == '+' && begin + 1 != end && begin[1] != '-') ++begin;
  std::from_chars_result read{};
  if constexpr (kInteger) {
    read = std::from_chars(begin, end, value);
  } else {
    read = std::from_chars(begin, end, value, std::chars_format::general);
  }
  if (read.ec == std::errc::result_out_of_range) return DecimalRead::kOutOfRange;
  return numeral && read.ec == std::errc{} && read.ptr == end && begin != end ? DecimalRead::kOk
                                                                             : DecimalRead::kNotDecimal;
}
template DecimalRead read_decimal(const std::string&, int64_t&);
template DecimalRead read_decimal(const std::string&, uint64_t&);
template DecimalRead read_decimal(const std::string&, double&);

json parse_json_strict(const std::string& text, const std::string& origin) {
  // Per open object: its keys so far, and the key whose value is being read (an object's key
  // again once a value nested in it ends, so an overflow after it is named by its own key).
  struct OpenObject {
    std::set<std::string> keys;
    std::string current;
  };
  std::vector<OpenObject> objects;
  json::parser_callback_t check = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) objects.emplace_back();
    if (event == json::parse_event_t::object_end) objects.pop_back();
    if (event == json::parse_event_t::key) {
      OpenObject& object = objects.back();
      object.current = parsed.get<std::string>();
      if (!object.keys.insert(object.current).second) {
        throw std::invalid_argument(origin + ": key '" + object.current + "' is given twice");
      }
    }
    return true;
  };
  try {
    return json::parse(text, check);
  } catch (const json::out_of_range& e) {
    const std::string last_key = objects.empty() ? "" : objects.back().current;
    // 406, "number overflow parsing '1e400'": a number beyond a double. Said as a flag's is (cli.cpp).
    const std::string what = e.what();
    const size_t open = what.find('\''), close = what.rfind('\'');
    const std::string number = open != std::string::npos && close > open ? what.substr(open + 1, close - open - 1)
                                                                          : what;
    throw std::invalid_argument(origin + ": " + (last_key.empty() ? "the number " : "key '" + last_key + "' is ") +
                                number + (last_key.empty() ? " is" : ",") + " out of the range of a 64-bit float");
  }
}

json read_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("cannot open config file " + path);
  std::stringstream text;
  text << in.rdbuf();
  if (ends_with(path, ".json")) {
    try {
      return parse_json_strict(text.str(), "config file " + path);
    } catch (const json::parse_error& e) {
      throw std::invalid_argument("config file " + path + " is not valid JSON: " + e.what());
    }
  }
  if (ends_with(path, ".yaml") || ends_with(path, ".yml")) {
#if defined(FXP_HAVE_YAML)
    try {
      YamlReader reader{path};
      // One document: YAML::Load would read the first of several and ignore the rest without a word.
      const std::vector<YAML::Node> documents = YAML::LoadAll(text.str());
      if (documents.size() > 1) {
        throw std::invalid_argument("config file " + path + " holds " + std::to_string(documents.size()) +
                                    " YAML documents (separated by ---); a config is one");
      }
      return reader.convert_document(documents.empty() ? YAML::Node() : documents.front());
    } catch (const YAML::Exception& e) {
      throw std::invalid_argument("config file " + path + " is not valid YAML: " + e.what());
    }
#else
    throw std::invalid_argument("config file " + path +
                                ": this build has no yaml-cpp (install libyaml-cpp-dev and rebuild), "
                                "use a .json config instead");
#endif
  }
  throw std::invalid_argument("config file " + path + ": the name must end in .yaml, .yml or .json");
}

bool is_qpu(const std::string& method) { return method == "sqpu" || method == "hteqpu"; }

const char* update_rounding(const std::string& method) {
  return method == "sqpu" ? "stochastic" : "nearest_even";
}

bool key_may_change_on_resume(const std::string& key) {
  return key == "epochs" || key == "output_dir" || key == "data_dir" || key == "threads" || key == "cuda_graphs";
}

bool key_names_a_file(const std::string& key) { return key == "init_from"; }

bool same_file_path(const std::string& a, const std::string& b) {
  if (a == b) return true;
  return !a.empty() && !b.empty() && weakly_canonical_path(a) == weakly_canonical_path(b);
}

std::string differing_settings(const json& stored, const json& current, bool epochs_may_differ) {
  std::string differ;
  // A key the run's record lacks was added to fxp-train after the run: it
  // had the key's default then (for example update, float before AdaPT's qpu).
  static const json defaults = to_json(TrainConfig{});
  for (const auto& key : config_keys()) {
    const bool ignored = key_may_change_on_resume(key) && (epochs_may_differ || key != "epochs");
    const json& was = stored.contains(key) ? stored[key] : defaults[key];
    const bool same = key_names_a_file(key) && was.is_string() && current[key].is_string()
                          ? same_file_path(was.get<std::string>(), current[key].get<std::string>())
                          : was == current[key];
    if (!ignored && !same) {
      differ += (differ.empty() ? "" : ", ") + key + " (" + was.dump() + " in the run, " + current[key].dump() +
                " now)";
    }
  }
  return differ;
}

}  // namespace fxp::train
