#include "train/cli.h"

#include <CLI/CLI.hpp>

#include "data/datasets.h"
#include "nn/models.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <memory>
#include <stdexcept>
#include <system_error>
#include <type_traits>

namespace fxp::train {
namespace {

using nlohmann::json;

struct FlagHelp {
  const char* key;
  const char* help;
  std::vector<std::string> choices;  // empty: any value of the key's type
};

// One entry per config key, in the order of config_keys().
const std::vector<FlagHelp>& flag_help() {
  static const std::vector<FlagHelp> help = {
      {"model", "network (docs/models.md; --describe-model prints its layers)", nn::network_names()},
      {"dataset", "dataset (docs/models.md); images are padded or cropped to the model's input size",
       data::dataset_names()},
      {"method", "parameter update method (adapt: AdaPT, docs/adapt.md; msq: MSQ, docs/msq.md)",
       {"fp32", "ste", "sqpu", "hteqpu", "adapt", "msq"}},
      {"param_bits", "parameter format: total bits (2..32)", {}},
      {"param_frac", "parameter format: fractional bits", {}},
      {"out_bits", "layer output (inference) format: total bits (2..32)", {}},
      {"out_frac", "layer output (inference) format: fractional bits", {}},
      {"inference_rounding", "rounding of layer outputs (and of STE's weight reads)", {"hte", "sr"}},
      {"momentum_form", "QPU momentum form (docs/design.md)", {"standard", "paper_eq6"}},
      {"packed", "packed integer storage (docs/memory.md): QPU parameters and momentum as int codes, saved "
                 "layer inputs as codes (paper_cnn; lenet5: parameters and momentum only); bit-identical "
                 "results, less memory", {}},
      {"adapt_start_bits", "AdaPT: every layer's total bits before its first switch", {}},
      {"adapt_start_frac", "AdaPT: every layer's fractional bits before its first switch", {}},
      {"adapt_resolution_min", "AdaPT: lower bound of the KL test's resolution r (bins)", {}},
      {"adapt_resolution_max", "AdaPT: upper bound of the resolution r", {}},
      {"adapt_lookback_min", "AdaPT: lower bound of a layer's lookback lb (batches between switches)", {}},
      {"adapt_lookback_max", "AdaPT: upper bound of the lookback lb", {}},
      {"adapt_lookback_momentum", "AdaPT: momentum gamma of the lookback", {}},
      {"adapt_buffer_bits", "AdaPT: range buffer bits added to every layer's format", {}},
      {"adapt_strategy", "AdaPT: the push-up strategy to start with (the loss adapts it)", {"min", "mean", "max"}},
      {"adapt_log", "AdaPT: the reading of the paper's log^2 in the push-up (docs/adapt.md)", {"log2", "squared_ln"}},
      {"l1_decay", "AdaPT: L1 regularization, added to the gradient (with weight_decay as L2)", {}},
      {"update",
       "AdaPT: float (a float32 master copy, the paper's) or qpu (no master copy: SQPU steps at each layer's format)",
       {"float", "qpu"}},
      {"msq_start_bits", "MSQ: every conv and linear layer's bit width at the start, at most 15 (sign not counted)", {}},
      {"msq_min_bits", "MSQ: the lowest width a pruning check may reach", {}},
      {"msq_lambda", "MSQ: weight of the L1 penalty on the weights' least significant bits", {}},
      {"msq_alpha", "MSQ: a layer drops bits when this fraction of its LSBs is 0", {}},
      {"msq_check_every", "MSQ: epochs between pruning checks", {}},
      {"msq_hessian", "MSQ: Hessian-guided pruning (layers below the mean sensitivity drop 2 bits, others 1)", {}},
      {"msq_hessian_samples", "MSQ: Hutchinson samples per pruning check (on the epoch's first batch)", {}},
      {"msq_finetune_epochs", "MSQ: the last epochs train at fixed widths without the penalty", {}},
      {"init_from", "start from this checkpoint's model weights (a run of the same model, e.g. fp32 for MSQ)", {}},
      {"batch_size", "training batch size", {}},
      {"lr", "base learning rate", {}},
      {"lr_scaling", "none, or linear: lr * batch_size / 1024 (the paper's Exp 3)", {"none", "linear"}},
      {"momentum", "SGD momentum", {}},
      {"weight_decay", "L2 weight decay", {}},
      {"scheduler", "plateau: multiply the lr by plateau_factor when the validation loss has not improved "
                    "for more than plateau_patience epochs (torch's ReduceLROnPlateau)", {"none", "plateau"}},
      {"plateau_patience", "epochs without validation-loss improvement the plateau scheduler tolerates", {}},
      {"plateau_factor", "lr factor of the plateau scheduler", {}},
      {"epochs", "maximum number of epochs", {}},
      {"early_stopping", "stop after early_stopping_patience epochs with no improvement in validation loss "
                         "or accuracy, once early_stopping_min_epochs epochs are done", {}},
      {"early_stopping_patience", "epochs without improvement before early stopping", {}},
      {"early_stopping_min_epochs", "epochs always trained before early stopping may stop the run", {}},
      {"seed", "seed of initialization, shuffling and every rounding stream", {}},
      {"device", "cpu, cuda or cuda:N", {}},
      {"threads", "CPU threads (0: LibTorch's default)", {}},
      {"cuda_graphs", "CUDA: replay each full training batch as one captured CUDA graph (forward, backward, "
                      "step), for small batches, where launches bound a step; results meant to be the same", {}},
      {"distributed", "data parallel across the processes torchrun or srun starts (Gloo on CPU, NCCL on CUDA; "
                      "docs/train.md): batch_size is the global batch, rank 0 writes the files", {}},
      {"data_dir", "directory with the dataset's files (default: the dataset's, see docs/models.md)", {}},
      {"train_limit", "train on the first N training images only (0: all)", {}},
      {"val_limit", "validate on the first N test images only (0: all)", {}},
      {"eval_batch_size", "batch size of the validation pass", {}},
      {"bn_recalibration_batches", "before each validation, recompute batch norm's running statistics over this "
                                   "many training batches at the current parameters (0: keep the running "
                                   "averages; docs/train.md)", {}},
      {"normalize_mean", "input normalization of pixel/255: mean (default: the dataset's)", {}},
      {"normalize_std", "input normalization of pixel/255: standard deviation (default: the dataset's)", {}},
      {"output_dir", "where the run's files go (default: results/<run name>)", {}},
  };
  return help;
}

std::string flag_name(const std::string& key) {
  std::string name = "--" + key;
  std::replace(name.begin(), name.end(), '_', '-');
  return name;
}

// Note [Integer flags]: CLI11 reads integers in C's bases ("010" is 8, "0x10"
// 16) and clamps values beyond int64's range, so "--seed 010" and a config's
// "seed: 010" would be other runs, and two huge seeds one run; and it reads an
// empty float ('', an unset shell variable) as 0. A flag reads a number as a
// config file does: integers in decimal, floats in decimal or scientific
// notation, the whole text, and an error when out of range. Range checks are
// validate()'s.
template <typename T>
T parse_number_flag(const std::string& flag, const std::string& text) {
  constexpr bool kInteger = std::is_integral_v<T>;
  T value{};
  const DecimalRead read = read_decimal(text, value);
  if (read == DecimalRead::kOutOfRange) {
    throw CLI::ValidationError(flag, "'" + text + "' is out of the range of a 64-bit " +
                                         (kInteger ? "integer" : "float"));
  }
  if (read == DecimalRead::kNotDecimal) {
    throw CLI::ValidationError(flag, std::string(kInteger ? "needs a decimal integer" : "needs a number") +
                                         ", but got '" + text + "'");
  }
  return value;
}

// The spellings of a boolean flag's value (--packed=VALUE) that CLI11 turns
// into a count; anything else would reach its conversion and fail there
// without naming the flag.
const CLI::Validator& boolean_flag_value() {
  static const CLI::Validator validator(
      [](std::string& value) {
        std::string lower = value;
        std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
        static const std::vector<std::string> spellings = {"true", "false", "yes", "no", "on", "off", "1", "0"};
        if (std::find(spellings.begin(), spellings.end(), lower) != spellings.end()) return std::string();
        return "must be true or false (or yes/no, on/off, 1/0), but got '" + value + "'";
      },
      "");  // no name: the help shows the flag's default instead
  return validator;
}

std::string default_text(const json& value) {
  return value.is_string() ? value.get<std::string>() : value.dump();
}

// CLI11 names a boolean flag "--x,--no-x{false}": the {false} is the value the
// negated form sets, which reads as the default; each help text ends with the real one.
class HelpFormatter : public CLI::Formatter {
 public:
  std::string make_option_name(const CLI::Option* option, bool is_positional) const override {
    std::string name = CLI::Formatter::make_option_name(option, is_positional);
    for (size_t open = name.find('{'); open != std::string::npos; open = name.find('{', open)) {
      const size_t close = name.find('}', open);
      if (close == std::string::npos) break;
      name.erase(open, close - open + 1);
    }
    return name;
  }
};

}  // namespace

std::optional<int> parse_command_line(const std::vector<std::string>& args, Command& command, std::ostream& out,
                                      std::ostream& err) {
  CLI::App app{
      "fxp-train: train a network with fixed-point parameters (fp32, STE, SQPU, HTEQPU, AdaPT, MSQ).\n"
      "With no arguments: the QPU paper's CNN on Fashion-MNIST (/usr/share/datasets/fashion-mnist), SQPU,\n"
      "16-bit parameters (10 fractional bits), 16-bit outputs (8), SR inference, batch 64, 3 epochs.\n"
      "--model and --dataset choose others. Flags override --config, which overrides the defaults;\n"
      "a config file (YAML or JSON) takes the same keys with underscores.",
      "fxp-train"};
  app.option_defaults()->always_capture_default();
  app.formatter(std::make_shared<HelpFormatter>());
  app.get_formatter()->column_width(38);
  app.set_version_flag("--version", "fxp-train 0.1.0");

  std::string config_file;
  app.add_option("-c,--config", config_file, "YAML or JSON file of settings (keys as below, with underscores)")
      ->check(CLI::ExistingFile);

  json overrides = json::object();
  const json defaults = to_json(TrainConfig{});
  const auto& keys = config_keys();
  for (const auto& h : flag_help()) {
    if (std::find(keys.begin(), keys.end(), h.key) == keys.end()) {
      throw std::logic_error(std::string("fxp-train: help for unknown key ") + h.key);
    }
    const std::string key = h.key;
    const json& def = defaults.at(key);
    const std::string name = flag_name(key) + (key == "output_dir" ? ",-o" : "");
    // Each flag records its value under its key; the override is applied after the config file.
    auto typed_option = [&](auto type_tag) {
      using T = decltype(type_tag);
      return app.add_option_function<T>(name, [&overrides, key](const T& v) { overrides[key] = v; }, h.help);
    };
    CLI::Option* option = nullptr;
    if (def.is_boolean()) {
      option = app.add_flag_function(
                       name + ",!--no-" + flag_name(key).substr(2),
                       [&overrides, key](int64_t count) { overrides[key] = count > 0; }, h.help)
                   ->check(boolean_flag_value());
    } else if (def.is_number_integer()) {
      option = app.add_option_function<std::string>(
          name, [&overrides, key](const std::string& text) { overrides[key] = parse_number_flag<int64_t>(flag_name(key), text); },
          h.help);
      option->type_name("INT");
    } else if (def.is_number_float()) {
      option = app.add_option_function<std::string>(
          name, [&overrides, key](const std::string& text) { overrides[key] = parse_number_flag<double>(flag_name(key), text); },
          h.help);
      option->type_name("FLOAT");
    } else {
      option = typed_option(std::string{});
    }
    if (!h.choices.empty()) option->check(CLI::IsMember(h.choices));
    if (def.is_boolean()) {
      // CLI11 shows "{false}" after "--no-x" (the value it sets), which reads as the default.
      option->description(std::string(h.help) + " (default: " + (def.get<bool>() ? "on" : "off") + ")");
    } else {
      option->default_str(default_text(def));
    }
    option->group("Run settings");
  }

  bool describe = false, print_config = false;
  app.add_flag("--resume", command.resume,
               "continue the run in the output directory from its last checkpoint (starts it when there is none)")
      ->group("Modes");
  app.add_flag("--overwrite", command.overwrite, "discard a run already in the output directory")->group("Modes");
  app.add_flag("-q,--quiet", command.quiet, "print nothing but errors (for sweeps)")->group("Modes");
  app.add_flag("--no-progress", command.no_progress, "no progress bar (it is drawn only on a terminal anyway)")
      ->group("Modes");
  app.add_flag("--describe-model", describe,
               "print the model's per-layer table (the QPU paper's Table 1 for paper_cnn), the rounding counts "
               "(Table 3) and the training-memory model (Eq. 5, Figure 2) for these settings, then exit")
      ->group("Modes");
  app.add_flag("--json", command.json, "with --describe-model: print JSON")->group("Modes");
  app.add_flag("--print-config", print_config, "print the resolved settings as JSON, then exit")->group("Modes");
  app.add_option("--print-configs", command.configs_file,
                 "read settings as JSON lines from FILE ('-': stdin), one run per line, over the defaults and the "
                 "flags; print for each a JSON line with its run_name, output_dir and resolved config, or an error "
                 "(scripts/sweep names its runs this way), then exit")
      ->group("Modes");

  CLI::Option* fleet = app.add_option("--fleet", command.fleet_file,
                 "train many runs as one fleet (docs/train.md, \"Many runs as one\"): read settings as JSON lines from FILE "
                 "('-': stdin), one member run per line, over the defaults, --config and the flags; each member "
                 "writes its own run directory, as a solo run would. Members share model, dataset, method, "
                 "batch size and what the data needs (device, threads, data and its limits, normalization; "
                 "docs/train.md lists them); seeds, formats, rounding, lr, momentum, weight decay, schedule and "
                 "epochs may differ")
      ->group("Modes");
  app.add_option_function<std::string>(
         "--fleet-compact-below",
         [&command](const std::string& text) {
           command.fleet_compact_below = parse_number_flag<double>("--fleet-compact-below", text);
           if (!(command.fleet_compact_below >= 0 && command.fleet_compact_below <= 1)) {
             throw CLI::ValidationError("--fleet-compact-below", "must be in [0, 1], but got " + text);
           }
         },
         "with --fleet: shrink the fleet to its running members once they are at most this share of it "
         "(0: never)")
      ->type_name("FLOAT")
      ->default_str(default_text(json(Command{}.fleet_compact_below)))
      ->needs(fleet)  // alone it would be ignored, as --json is refused without --describe-model
      ->group("Modes");
  app.add_option_function<std::string>(
         "--fleet-chunk",
         [&command](const std::string& text) {
           command.fleet_chunk = parse_number_flag<int64_t>("--fleet-chunk", text);
           if (command.fleet_chunk < 0) {
             throw CLI::ValidationError("--fleet-chunk", "must be 0 or more, but got " + text);
           }
         },
         "with --fleet: members per forward and backward pass (0: 512 images' worth on a CPU, every member "
         "on a GPU); any value gives the same results")
      ->type_name("INT")
      ->default_str("0")
      ->needs(fleet)
      ->group("Modes");

  std::vector<const char*> argv = {"fxp-train"};
  for (const auto& a : args) argv.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError& e) {
    // A mistyped flag: CLI11 lists the arguments it did not expect, but suggests nothing (a config key gets
    // "did you mean", and a flag should too).
    if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr) {
      std::vector<std::string> flags;
      for (const CLI::Option* option : app.get_options()) {
        for (const auto& name : option->get_lnames()) flags.push_back("--" + name);
      }
      for (const auto& a : app.remaining()) {  // what CLI11 did not take: no option's value
        const std::string flag = a.substr(0, a.find('='));
        if (flag.rfind("--", 0) != 0 || flag == "--" || std::find(flags.begin(), flags.end(), flag) != flags.end()) {
          continue;
        }
        const std::string best = closest_name(flag, flags);
        err << "fxp-train: unknown flag " << flag << (best.empty() ? "" : " (did you mean " + best + "?)") << "\n";
      }
    }
    // CLI11 has one exit code per error kind; keep the usual 2 for every usage error.
    return app.exit(e, out, err) == 0 ? 0 : 2;
  }
  if (describe + print_config + !command.configs_file.empty() + !command.fleet_file.empty() > 1) {
    err << "fxp-train: --describe-model, --print-config, --print-configs and --fleet cannot be combined\n";
    return 2;
  }
  if (command.json && !describe) {
    err << "fxp-train: --json needs --describe-model (it is that mode's output format)\n";
    return 2;
  }
  if (command.resume && command.overwrite) {
    err << "fxp-train: --resume and --overwrite cannot be combined\n";
    return 2;
  }
  command.mode = describe                         ? Mode::DescribeModel
                 : print_config                   ? Mode::PrintConfig
                 : !command.configs_file.empty() ? Mode::PrintConfigs
                 : !command.fleet_file.empty()   ? Mode::Fleet
                                                  : Mode::Train;
  try {
    json from_file = json::object();
    if (!config_file.empty()) apply_json(command.config, from_file = read_config_file(config_file), config_file);
    apply_json(command.config, overrides, "command line");
    try {
      command.config.validate();
    } catch (const SettingError& e) {
      // A value that came from the file, and no flag gave it or one it was checked against: name the file.
      const bool flag_involved = overrides.contains(e.key) ||
          std::any_of(e.others.begin(), e.others.end(), [&](const std::string& k) { return overrides.contains(k); });
      if (from_file.contains(e.key) && !flag_involved) throw std::invalid_argument(config_file + ": " + e.what());
      throw;
    }
  } catch (const std::exception& e) {
    err << "fxp-train: " << e.what() << "\nRun with --help for more information.\n";
    return 2;
  }
  return std::nullopt;
}

}  // namespace fxp::train
