// The settings of one fxp-train run. The same keys are accepted from a YAML or
// JSON config file and (with dashes instead of underscores) from the command
// line; see docs/train.md for each key.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fxp::train {

struct TrainConfig {
  // network and data
  std::string model = "paper_cnn";  // paper_cnn | lenet5 | resnet20 | alexnet (nn/models.h)
  std::string dataset = "fashion-mnist";  // fashion-mnist | mnist | emnist | cifar10 | cifar100

  // method and formats
  std::string method = "sqpu";  // fp32 | ste | sqpu | hteqpu | adapt | msq
  int64_t param_bits = 16, param_frac = 10;
  int64_t out_bits = 16, out_frac = 8;
  std::string inference_rounding = "sr";  // hte | sr
  std::string momentum_form = "standard";  // standard | paper_eq6 (QPU only)
  bool packed = false;  // packed integer storage (docs/memory.md)

  // AdaPT (method adapt; docs/adapt.md): per-layer formats that change
  int64_t adapt_start_bits = 8, adapt_start_frac = 4;
  int64_t adapt_resolution_min = 50, adapt_resolution_max = 150;
  int64_t adapt_lookback_min = 25, adapt_lookback_max = 100;
  double adapt_lookback_momentum = 0.33;
  int64_t adapt_buffer_bits = 4;
  std::string adapt_strategy = "min";  // min | mean | max: the push-up strategy to start with
  std::string adapt_log = "log2";      // log2 | squared_ln: the reading of the paper's "log²"
  double l1_decay = 0.0;               // L1 regularization (AdaPT's sparsity term)
  std::string update = "float";        // float (a float32 master copy) | qpu (none: SQPU at each layer's format)

  // MSQ (method msq; docs/msq.md): per-layer bit widths lowered by LSB sparsity
  int64_t msq_start_bits = 8, msq_min_bits = 1;
  double msq_lambda = 1e-4;          // weight of the LSBs' L1 penalty
  double msq_alpha = 0.95;           // LSB sparsity at which a layer drops bits
  int64_t msq_check_every = 1;       // epochs between pruning checks
  bool msq_hessian = true;           // Hessian-guided k (2 bits below the mean sensitivity)
  int64_t msq_hessian_samples = 16;  // Hutchinson samples per check, on one training batch
  int64_t msq_finetune_epochs = 0;   // the last epochs at fixed widths, without the penalty
  std::string init_from;             // a checkpoint of the same model whose weights start the run

  // optimization
  int64_t batch_size = 64;
  double lr = 0.01;
  std::string lr_scaling = "none";  // none | linear (lr * batch_size / 1024)
  double momentum = 0.9;
  double weight_decay = 0.0;
  std::string scheduler = "none";  // none | plateau
  int64_t plateau_patience = 5;
  double plateau_factor = 0.5;
  int64_t epochs = 3;
  bool early_stopping = false;
  int64_t early_stopping_patience = 10;
  int64_t early_stopping_min_epochs = 20;

  // run environment
  int64_t seed = 0;
  std::string device = "cpu";  // cpu | cuda | cuda:N
  int64_t threads = 0;         // 0: LibTorch's default
  // CUDA only: full training batches replay one captured CUDA graph of the
  // whole step (Note [CUDA-graph training steps], train/epoch.cpp), meant to
  // give the same bits as without it.
  bool cuda_graphs = false;
  // Data parallel across the processes that torchrun or srun starts
  // (docs/train.md, "One run across processes"): batch_size is the global
  // batch, which the ranks split; rank 0 writes the run's files.
  bool distributed = false;
  std::string data_dir;  // empty: the dataset's default directory (data_directory())
  int64_t train_limit = 0;  // 0: the whole split; else its first N images
  int64_t val_limit = 0;
  int64_t eval_batch_size = 1000;
  // Before each validation, batch norm's running statistics are recomputed
  // over this many training batches at the current parameters (0: they stay
  // the running averages; Note [Batch norm recalibration]).
  int64_t bn_recalibration_batches = 0;
  // Input normalization of pixel/255; unset: the dataset's (input_mean(), input_std()).
  std::optional<double> normalize_mean, normalize_std;
  std::string output_dir;  // empty: results/<run name>

  // The settings that default to the dataset's.
  std::string data_directory() const;
  double input_mean() const;
  double input_std() const;
  // Images an epoch trains on and validates on: the limits where set, else
  // the dataset's published split sizes (for estimates; no files are read).
  std::pair<int64_t, int64_t> epoch_images() const;
  // The effective learning rate after lr_scaling.
  double initial_lr() const;
  // A readable, filesystem-safe name, e.g. sqpu-p16.10-o16.8-sr-b64-s0, led
  // by the model and the dataset where they are not the defaults
  // (resnet20-cifar10-sqpu-...).
  // Note [Run names come from fxp-train]: this is the one definition;
  // scripts/sweep names its runs by asking `fxp-train --print-configs`.
  std::string run_name() const;
  // Throws SettingError naming the key and the bad value.
  void validate() const;
  // The settings this run does not read, whatever their values, each with
  // why (Note [Settings without effect]).
  std::vector<std::pair<std::string, std::string>> unread_settings() const;
  // Those changed from their defaults, one line each, for the run's log.
  std::vector<std::string> settings_without_effect() const;
};

// A setting TrainConfig::validate refuses: the message begins with its key,
// which the caller may trace to where the value came from (a config file);
// `others`: the settings the check compared it with (epochs for
// msq_finetune_epochs), which may have come from elsewhere.
struct SettingError : std::invalid_argument {
  SettingError(std::string key_, const std::string& why, std::vector<std::string> others_ = {})
      : std::invalid_argument(key_ + ": " + why), key(std::move(key_)), others(std::move(others_)) {}
  std::string key;
  std::vector<std::string> others;
};

// QPU methods (sqpu, hteqpu) keep no float master copy; their update rounding
// (and initialization) is stochastic for sqpu, nearest_even for hteqpu.
bool is_qpu(const std::string& method);
const char* update_rounding(const std::string& method);

// The name of `names` closest to a mistyped `word` ("did you mean"), or "" when none is close.
std::string closest_name(const std::string& word, const std::vector<std::string>& names);

// Every key a config file may hold, in documentation order.
const std::vector<std::string>& config_keys();

nlohmann::json to_json(const TrainConfig& config);
// Applies the keys present in `values` over `config`. Unknown keys and values
// of the wrong type are errors (std::invalid_argument naming the key and `origin`).
void apply_json(TrainConfig& config, const nlohmann::json& values, const std::string& origin);

// Note [Integer flags] (cli.cpp): how a flag's and a YAML config's number text
// reads: the whole text, in decimal (no other base, no inf or nan), digits and
// signs, and for a double a point and an exponent too. kOutOfRange: beyond T
// (for a double, also below its smallest denormal).
enum class DecimalRead { kOk, kNotDecimal, kOutOfRange };
template <typename T>  // int64_t, uint64_t or double
DecimalRead read_decimal(const std::string& text, T& value);

// json::parse, with an error (std::invalid_argument) that begins with `origin`
// ("config file run.json", "fleet.jsonl line 3") for a key given twice in one
// object (nlohmann keeps the last one silently) and for a number beyond a
// double's range, naming the key; text that is not JSON throws json::parse_error.
nlohmann::json parse_json_strict(const std::string& text, const std::string& origin);

// Reads a YAML (.yaml/.yml) or JSON (.json) file into a JSON object.
nlohmann::json read_config_file(const std::string& path);

// Keys that may differ between a run and its --resume: epochs extends a run,
// output_dir and data_dir only locate files, cuda_graphs changes no result.
// threads may change too, but a CPU run is bit-reproducible only at one thread
// count, so fxp-train warns.
bool key_may_change_on_resume(const std::string& key);

// Keys whose value names a file: two values are the same setting when they
// name the same file (same_file_path), so `results/a/checkpoint.pt` and its
// absolute path, or `results/b/../a/checkpoint.pt`, are one init_from.
bool key_names_a_file(const std::string& key);

// Whether two paths name the same file: equal as weakly_canonical_path
// (train/io.h) makes them: absolute, the leading part that exists made
// canonical (`.`, `..` and symbolic links resolved), the rest made lexically
// normal. scripts/sweeplib.py's same_file mirrors it.
bool same_file_path(const std::string& a, const std::string& b);

// The settings of a stored run that differ from `current`, as readable text
// (empty: none). Keys that may change on resume are ignored; epochs only when
// epochs_may_differ (extending a run) is set; keys that name a file compare
// the files (key_names_a_file).
std::string differing_settings(const nlohmann::json& stored, const nlohmann::json& current, bool epochs_may_differ);

}  // namespace fxp::train
