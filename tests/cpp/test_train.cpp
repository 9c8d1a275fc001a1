// fxp-train: the command line, config files, the paper's bookkeeping, and
// short runs on a Fashion-MNIST subset (JSON outputs, determinism, resume).
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <torch/torch.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include "nn/models.h"
#include "train/bookkeeping.h"
#include "train/cli.h"
#include "train/config.h"
#include "train/epoch.h"
#include "train/export.h"
#include "train/fleet.h"
#include "train/io.h"
#include "train/setup.h"
#include "train/summary.h"
#include "train/trainer.h"

#include "test_util.h"

namespace {

using fxp::testing::expect_error;
using nlohmann::json;
namespace ft = fxp::train;

std::string temp_dir() {
  char templ[] = "/tmp/fxp_train_test_XXXXXX";
  EXPECT_NE(::mkdtemp(templ), nullptr);
  return templ;
}

void remove_tree(const std::string& dir) {
  const std::string command = "rm -rf '" + dir + "'";
  EXPECT_EQ(std::system(command.c_str()), 0);
}

struct Parsed {
  int code = -1;  // -1: parsed
  ft::Command command;
  std::string out, err;
};

Parsed parse(const std::vector<std::string>& args) {
  Parsed p;
  std::ostringstream out, err;
  if (auto code = ft::parse_command_line(args, p.command, out, err)) p.code = *code;
  p.out = out.str();
  p.err = err.str();
  return p;
}

// ---- command line and config files ---------------------------------------------

TEST(TrainCli, NoArgumentsIsThePaperDefault) {
  const Parsed p = parse({});
  ASSERT_EQ(p.code, -1) << p.err;
  const ft::TrainConfig& c = p.command.config;
  EXPECT_EQ(c.method, "sqpu");
  EXPECT_EQ(c.param_bits, 16);
  EXPECT_EQ(c.param_frac, 10);
  EXPECT_EQ(c.out_bits, 16);
  EXPECT_EQ(c.out_frac, 8);
  EXPECT_EQ(c.inference_rounding, "sr");
  EXPECT_EQ(c.batch_size, 64);
  EXPECT_EQ(c.model, "paper_cnn");
  EXPECT_EQ(c.dataset, "fashion-mnist");
  EXPECT_EQ(c.input_mean(), 0.1307);
  EXPECT_EQ(c.input_std(), 0.3081);
  EXPECT_EQ(c.data_directory(), "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(p.command.mode, ft::Mode::Train);
}

// The dataset decides the defaults of data_dir and the normalization; set
// values win, and --print-config shows the values in effect.
TEST(TrainCli, DatasetDefaults) {
  Parsed p = parse({"--dataset", "cifar10", "--model", "resnet20"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.data_directory(), "data/cifar10");
  EXPECT_EQ(p.command.config.input_mean(), 0.4734);
  EXPECT_EQ(p.command.config.run_name(), "resnet20-cifar10-sqpu-p16.10-o16.8-sr-b64-s0");
  const auto j = ft::to_json(p.command.config);
  EXPECT_EQ(j["data_dir"], "data/cifar10");
  EXPECT_EQ(j["normalize_std"], 0.2516);
  // An epoch's images: the published splits, or the limits where set.
  EXPECT_EQ(p.command.config.epoch_images(), (std::pair<int64_t, int64_t>{50000, 10000}));
  p.command.config.train_limit = 1000;
  EXPECT_EQ(p.command.config.epoch_images(), (std::pair<int64_t, int64_t>{1000, 10000}));
  p = parse({"--dataset", "mnist", "--data-dir", "/m", "--normalize-mean", "0.5"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.data_directory(), "/m");
  EXPECT_EQ(p.command.config.input_mean(), 0.5);
  EXPECT_EQ(p.command.config.input_std(), 0.3081);
  EXPECT_EQ(p.command.config.run_name(), "mnist-sqpu-p16.10-o16.8-sr-b64-s0");
  p = parse({"--model", "resnet20", "--packed"});
  EXPECT_EQ(p.code, 2);
  EXPECT_NE(p.err.find("packed: packed storage is supported for models paper_cnn and lenet5 only (yet), not resnet20"),
            std::string::npos)
      << p.err;
  p = parse({"--model", "lenet5", "--method", "ste", "--packed"});
  EXPECT_EQ(p.code, 2);
  EXPECT_NE(p.err.find("packed: lenet5 packs the QPU methods' weights and momentum only"), std::string::npos) << p.err;
  p = parse({"--model", "lenet5", "--packed"});
  ASSERT_EQ(p.code, -1) << p.err;
  // AdaPT's run names tell apart the settings a grid may vary.
  p = parse({"--method", "adapt", "--adapt-lookback-min", "5", "--adapt-lookback-max", "9", "--l1-decay", "0.001"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.run_name(), "adapt-start8.4-buf4-lb5.9-l1_0.001-b64-s0");
  // The paper's Eq. 6 momentum form is named; the standard form, the default, is not.
  p = parse({"--method", "hteqpu", "--momentum-form", "paper_eq6"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.run_name(), "hteqpu-p16.10-o16.8-sr-paper_eq6-b64-s0");
  p = parse({"--model", "vgg"});
  EXPECT_NE(p.code, -1);
  EXPECT_NE(p.err.find("vgg"), std::string::npos) << p.err;
}

// Note [Settings without effect]: changed settings the run does not read are
// named, with the reason; defaults and the settings it reads are not.
TEST(TrainConfig, SettingsWithoutEffectAreNamed) {
  Parsed p = parse({});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_TRUE(p.command.config.settings_without_effect().empty());
  p = parse({"--method", "fp32", "--param-bits", "8", "--param-frac", "4", "--inference-rounding", "hte",
             "--msq-alpha", "0.5", "--adapt-buffer-bits", "8", "--plateau-patience", "3",
             "--early-stopping-patience", "4"});
  ASSERT_EQ(p.code, -1) << p.err;
  const std::vector<std::string> fp32 = p.command.config.settings_without_effect();
  const std::vector<std::string> expected = {
      "param_bits = 8 has no effect: method fp32 keeps float weights and layer outputs",
      "param_frac = 4 has no effect: method fp32 keeps float weights and layer outputs",
      "inference_rounding = \"hte\" has no effect: method fp32 rounds no layer outputs",
      "adapt_buffer_bits = 8 has no effect: it is AdaPT's (method adapt)",
      "msq_alpha = 0.5 has no effect: it is MSQ's (method msq)",
      "plateau_patience = 3 has no effect: scheduler is none",
      "early_stopping_patience = 4 has no effect: early_stopping is off"};
  EXPECT_EQ(fp32, expected);
  // The same settings where the run reads them: none is named.
  p = parse({"--method", "ste", "--param-bits", "8", "--param-frac", "4", "--inference-rounding", "hte",
             "--scheduler", "plateau", "--plateau-patience", "3", "--early-stopping", "--early-stopping-patience", "4"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_TRUE(p.command.config.settings_without_effect().empty());
  // Batch norm recalibration on a model without batch norm: named, and not in the run name.
  p = parse({"--model", "lenet5", "--bn-recalibration-batches", "2"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.settings_without_effect(),
            std::vector<std::string>{"bn_recalibration_batches = 2 has no effect: model lenet5 has no batch norm"});
  EXPECT_EQ(p.command.config.run_name().find("bnr"), std::string::npos) << p.command.config.run_name();
  p = parse({"--model", "resnet20", "--bn-recalibration-batches", "2"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_TRUE(p.command.config.settings_without_effect().empty());
  EXPECT_NE(p.command.config.run_name().find("-bnr2-"), std::string::npos) << p.command.config.run_name();
  p = parse({"--method", "adapt", "--out-bits", "12", "--adapt-buffer-bits", "8", "--inference-rounding", "hte"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.settings_without_effect(),
            std::vector<std::string>{
                "out_bits = 12 has no effect: method adapt starts every layer at adapt_start_bits and adapt_start_frac"});
  p = parse({"--method", "msq", "--msq-hessian=false", "--msq-hessian-samples", "4"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.settings_without_effect(),
            std::vector<std::string>{"msq_hessian_samples = 4 has no effect: msq_hessian is off"});
}

TEST(TrainCli, FlagsSetEveryKind) {
  const Parsed p = parse({"--method", "hteqpu", "--param-bits", "8", "--param-frac", "5", "--out-bits", "8",
                          "--out-frac", "3", "--inference-rounding", "hte", "--batch-size", "16", "--lr", "0.02",
                          "--lr-scaling", "linear", "--weight-decay", "5e-4", "--scheduler", "plateau",
                          "--early-stopping", "--early-stopping-min-epochs", "7", "--device", "cuda:1", "-o", "x"});
  ASSERT_EQ(p.code, -1) << p.err;
  const ft::TrainConfig& c = p.command.config;
  EXPECT_EQ(c.method, "hteqpu");
  EXPECT_EQ(c.param_frac, 5);
  EXPECT_EQ(c.out_frac, 3);
  EXPECT_EQ(c.inference_rounding, "hte");
  EXPECT_EQ(c.weight_decay, 5e-4);
  EXPECT_TRUE(c.early_stopping);
  EXPECT_EQ(c.early_stopping_min_epochs, 7);
  EXPECT_EQ(c.device, "cuda:1");
  EXPECT_EQ(c.output_dir, "x");
  EXPECT_DOUBLE_EQ(c.initial_lr(), 0.02 * 16 / 1024);
  EXPECT_FALSE(parse({"--early-stopping", "--no-early-stopping"}).command.config.early_stopping);
  // Integers are decimal, as in a config file ("010" is not octal 8); booleans take the usual spellings.
  const Parsed q = parse({"--seed", "010", "--batch-size", "+32", "--packed=yes", "--no-msq-hessian", "--lr", "+2.5e-1",
                          "--momentum", "0"});
  ASSERT_EQ(q.code, -1) << q.err;
  EXPECT_EQ(q.command.config.lr, 0.25);
  EXPECT_EQ(q.command.config.momentum, 0.0);
  const Parsed d = parse({"--device", "cuda:127", "--fleet", "members.jsonl", "--fleet-compact-below", "0.5"});
  ASSERT_EQ(d.code, -1) << d.err;
  EXPECT_EQ(d.command.config.device, "cuda:127");
  EXPECT_EQ(d.command.fleet_compact_below, 0.5);
  EXPECT_EQ(q.command.config.seed, 10);
  EXPECT_EQ(q.command.config.batch_size, 32);
  EXPECT_TRUE(q.command.config.packed);
  EXPECT_FALSE(q.command.config.msq_hessian);
}

TEST(TrainCli, BadFlagsAndValuesAreUsageErrors) {
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {{"--bogus"}, "--bogus"},
      {{"--method", "adam"}, "adam"},
      {{"--batch-size", "many"}, "many"},
      {{"--inference-rounding", "up"}, "up"},
      {{"--param-bits", "40"}, "param_bits: total bits must be in [2, 32], but got 40"},
      {{"--param-bits", "8", "--param-frac", "8"}, "param_frac: fractional bits must be in [0, 7]"},
      {{"--batch-size", "0"}, "batch_size: must be at least 1"},
      {{"--lr", "-1"}, "lr: must be a positive number"},
      {{"--momentum", "1.5"}, "momentum: must be in [0, 1)"},
      {{"--device", "tpu"}, "device: must be cpu, cuda or cuda:N"},
      // torch::Device would refuse these only when the run starts (after a sweep took them as valid).
      {{"--device", "cuda:abc"}, "device: must be cpu, cuda or cuda:N (N a device index), but got 'cuda:abc'"},
      {{"--device", "cuda:"}, "but got 'cuda:'"},
      {{"--device", "cuda:-1"}, "but got 'cuda:-1'"},
      {{"--device", "cuda:01"}, "but got 'cuda:01'"},
      // A float reads as a config file's number: an empty value (an unset shell variable) is no 0.
      {{"--momentum", ""}, "--momentum: needs a number, but got ''"},
      {{"--weight-decay", ""}, "--weight-decay: needs a number, but got ''"},
      {{"--lr", "0x10"}, "--lr: needs a number, but got '0x10'"},
      {{"--lr", "0.1abc"}, "--lr: needs a number, but got '0.1abc'"},
      {{"--lr", "1e999"}, "--lr: '1e999' is out of the range of a 64-bit float"},
      {{"--lr", "+-1"}, "--lr: needs a number, but got '+-1'"},
      {{"--lr", "inf"}, "--lr: needs a number, but got 'inf'"},
      {{"--momentum", "nan"}, "--momentum: needs a number, but got 'nan'"},
      {{"--seed", "+-1"}, "--seed: needs a decimal integer, but got '+-1'"},
      {{"--device", "cuda:128"}, "but got 'cuda:128'"},  // c10::DeviceIndex is an int8_t
      {{"--fleet-compact-below", ""}, "--fleet-compact-below: needs a number, but got ''"},
      {{"--fleet-compact-below", "1.5"}, "--fleet-compact-below: must be in [0, 1], but got 1.5"},
      {{"--json"}, "fxp-train: --json needs --describe-model"},
      {{"--fleet-chunk", "-1"}, "--fleet-chunk: must be 0 or more, but got -1"},
      {{"--fleet-chunk", "4"}, "--fleet-chunk requires --fleet"},  // alone it would be ignored
      {{"--bacth-size", "4"}, "fxp-train: unknown flag --bacth-size (did you mean --batch-size?)"},
      {{"--no-packd"}, "fxp-train: unknown flag --no-packd (did you mean --no-packed?)"},
      {{"--colour=red"}, "fxp-train: unknown flag --colour\n"},  // nothing close: no guess
      {{"--fleet-compact-below", "0.5"}, "--fleet-compact-below requires --fleet"},
      {{"--msq-min-bits", "9"}, "msq_start_bits: must be at most 15 and at least msq_min_bits, itself at least 1 "
                                "(1 <= msq_min_bits <= msq_start_bits <= 15), but got msq_min_bits 9 and "
                                "msq_start_bits 8"},
      {{"--config", "/nonexistent/run.yaml"}, "/nonexistent/run.yaml"},
      {{"--resume", "--overwrite"}, "cannot be combined"},
      // Note [Integer flags]: decimal only, and no clamping; a boolean's value names the flag.
      {{"--batch-size", "0x10"}, "--batch-size: needs a decimal integer, but got '0x10'"},
      {{"--seed", "99999999999999999999"}, "--seed: '99999999999999999999' is out of the range of a 64-bit integer"},
      {{"--seed", "1.5"}, "--seed: needs a decimal integer, but got '1.5'"},
      {{"--packed=maybe"}, "--packed: must be true or false (or yes/no, on/off, 1/0), but got 'maybe'"},
      {{"--epochs", "-1"}, "epochs: must be at least 1"},
      {{"--threads", "100000"}, "threads: must be at most 4096"},
      // Note [Largest batch]: --describe-model printed negative counts for this one, and training took 2^32 + 1.
      {{"--describe-model", "--batch-size", "9223372036854775807"},
       "batch_size: must be at most 16777216 (2^24), but got 9223372036854775807"},
      {{"--batch-size", "4294967297"}, "batch_size: must be at most 16777216 (2^24), but got 4294967297"},
      {{"--eval-batch-size", "16777217"}, "eval_batch_size: must be at most 16777216 (2^24), but got 16777217"},
      // Finite in double, not in float32, where the images are normalized: the loss was NaN, the exit status 0.
      {{"--normalize-mean", "1e300"}, "normalize_mean: must be a finite number that float32 holds (magnitude at "
                                      "most 3.4028234663852886e+38), but got 1e+300"},
      {{"--normalize-std", "1e39"}, "normalize_std: must be a positive finite number that float32 holds"},
      {{"--normalize-std", "1e-50"}, "and not so small that it rounds to 0), but got 1e-50"},
      // Each in range, but not (x - mean) / std.
      {{"--normalize-std", "1e-44"}, "normalize_std: with normalize_mean 0.1307, a standard deviation of 1e-44 makes "
                                     "normalized pixels, (x - mean) / std for x in [0, 1], beyond float32's range"},
      {{"--normalize-mean", "3e38", "--normalize-std", "0.5"}, "normalize_std: with normalize_mean 3e+38"},
      {{"--method", "fp32", "--packed"}, "packed: stores fixed-point codes, and fp32 has none to store"},
      {{"--method", "ste", "--momentum-form", "paper_eq6"}, "momentum_form: is the QPU step's"},
  };
  for (const auto& c : cases) {
    const Parsed p = parse(c.args);
    EXPECT_EQ(p.code, 2) << c.args[0];
    EXPECT_NE(p.err.find(c.needle), std::string::npos) << "stderr: " << p.err;
  }
}

// Note [Largest batch]: at the largest batch a config may give, every model's
// --describe-model counts are in range (they were negative at 2^63 - 1).
TEST(TrainCli, TheLargestBatchKeepsTheModelsCountsInRange) {
  for (const auto& model : fxp::nn::network_names()) {
    const Parsed p = parse({"--describe-model", "--model", model, "--dataset", "cifar100", "--batch-size", "16777216"});
    ASSERT_EQ(p.code, -1) << p.err;
    const ft::TrainConfig& c = p.command.config;
    const json report = ft::describe_model(ft::build_network(c)->describe(), c.method, c.update,
                                           c.inference_rounding, c.param_bits, c.out_bits, true, c.batch_size);
    std::function<void(const json&)> in_range = [&](const json& v) {
      if (v.is_structured()) {
        for (const auto& item : v) in_range(item);
      } else if (v.is_number_integer()) {
        EXPECT_GE(v.get<int64_t>(), 0) << model;
      } else if (v.is_number()) {
        EXPECT_TRUE(std::isfinite(v.get<double>()) && v.get<double>() >= 0) << model;
      }
    };
    in_range(report);
    EXPECT_EQ(report["table3"]["batch_16777216"]["sqpu"]["inference"].get<int64_t>(),
              int64_t{16777216} * report["table1"]["totals"]["rounded"].get<int64_t>())
        << model;
  }
}

TEST(TrainCli, HelpDocumentsEveryKey) {
  const Parsed p = parse({"--help"});
  EXPECT_EQ(p.code, 0);
  for (const auto& key : ft::config_keys()) {
    std::string flag = "--" + key;
    std::replace(flag.begin(), flag.end(), '_', '-');
    EXPECT_NE(p.out.find(flag), std::string::npos) << flag;
  }
  for (const char* mode : {"--config", "--resume", "--quiet", "--describe-model", "--overwrite"}) {
    EXPECT_NE(p.out.find(mode), std::string::npos) << mode;
  }
  // A boolean flag's line says its default once: not CLI11's "{false}" (the --no- form's value) beside "(default: on)".
  EXPECT_NE(p.out.find("--msq-hessian,--no-msq-hessian "), std::string::npos) << p.out;
  EXPECT_EQ(p.out.find("{false}"), std::string::npos) << p.out;
}

class TrainFiles : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = temp_dir(); }
  void TearDown() override { remove_tree(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  std::string dir_;
};

TEST_F(TrainFiles, ConfigFileThenFlagsOverride) {
  const std::string yaml = write("run.yaml", "method: ste\nbatch_size: 256\nlr: 1\nearly_stopping: true\n"
                                             "data_dir: '/data'\n");
  Parsed p = parse({"--config", yaml, "--batch-size", "32"});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.method, "ste");
  EXPECT_EQ(p.command.config.batch_size, 32);  // the flag wins
  EXPECT_EQ(p.command.config.lr, 1.0);         // an integer is fine for a float key
  EXPECT_TRUE(p.command.config.early_stopping);
  EXPECT_EQ(p.command.config.data_dir, "/data");

  // A distributed run's config.json records world_size, which is not a setting: read past, so it resumes with -c.
  const std::string js = write("run.json", R"({"method": "fp32", "epochs": 7, "world_size": 2})");
  p = parse({"-c", js});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.method, "fp32");
  EXPECT_EQ(p.command.config.epochs, 7);
}

TEST_F(TrainFiles, BadConfigFilesNameTheProblem) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {write("unknown.yaml", "methd: ste\n"), "unknown key 'methd' (did you mean 'method'?)"},
      {write("dashes.yaml", "batch-size: 16\n"), "unknown key 'batch-size' (did you mean 'batch_size'?)"},
      {write("far.yaml", "colour: red\n"), "unknown key 'colour'\n"},  // nothing close: no guess
      {write("short.yaml", "wd: 0.1\n"), "unknown key 'wd'\n"},        // not 'lr', two letters off of two
      {write("nan.yaml", "normalize_mean: .nan\n"), "key 'normalize_mean' needs a number, but got \".nan\""},
      {write("inf.yaml", "normalize_std: .inf\n"), "key 'normalize_std' needs a number, but got \".inf\""},
      {write("type.yaml", "batch_size: \"64\"\n"), "key 'batch_size' needs an integer, but got \"64\""},
      {write("float.yaml", "epochs: 3.0\n"), "key 'epochs' needs an integer, but got 3.0"},
      {write("bool.yaml", "packed: 1\n"), "key 'packed' needs true or false, but got 1"},
      {write("number.yaml", "lr: fast\n"), "key 'lr' needs a number, but got \"fast\""},
      // Values in the shortest text that reads back, not std::to_string's six decimals.
      {write("lambda.yaml", "msq_lambda: -1\n"), "msq_lambda: must be a non-negative number, but got -1\n"},
      {write("tiny.yaml", "momentum: 1.5e-9\nweight_decay: -2.5e-7\n"), "but got -2.5e-07\n"},
      {write("value.json", R"({"scheduler": "cosine"})"), "scheduler: must be one of none, plateau"},
      {write("broken.json", "{\"method\": "), "is not valid JSON"},
      {write("broken.yaml", "method: [ste\n"), "is not valid YAML"},
      {write("list.yaml", "- method\n"), "expected a mapping"},
      {write("two.yaml", "epochs: 2\n---\nepochs: 5\n"), "holds 2 YAML documents (separated by ---)"},
      {write("run.toml", "method = 'ste'\n"), "must end in .yaml, .yml or .json"},
  };
  for (const auto& [path, needle] : cases) {
    const Parsed p = parse({"--config", path});
    EXPECT_EQ(p.code, 2) << path;
    EXPECT_NE(p.err.find(needle), std::string::npos) << path << ": " << p.err;
  }
}

// Issue 11: configs that once crashed fxp-train, grew its memory without bound,
// or were accepted with a silently different meaning.
TEST_F(TrainFiles, ConfigsCannotRecurseExplodeOrRepeatKeys) {
  // "Billion laughs": ten levels of ten aliases each would expand to 10^10 values.
  std::string laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n";
  for (char c = 'b'; c <= 'j'; ++c) {
    const std::string previous = "*" + std::string(1, static_cast<char>(c - 1));
    laughs += std::string(1, c) + ": &" + c + " [" + previous;
    for (int i = 1; i < 10; ++i) laughs += ", " + previous;
    laughs += "]\n";
  }
  const std::vector<std::pair<std::string, std::string>> cases = {
      {write("recursive.yaml", "lr: &a [*a]\n"), "nested deeper than 16 levels (a recursive alias?)"},
      {write("laughs.yaml", laughs), "holds more than 10000 values (nested aliases?)"},
      {write("twice.yaml", "lr: 0.1\nbatch_size: 8\nlr: 0.2\n"), "key 'lr' is given twice"},
      {write("twice.json", R"({"lr": 0.1, "lr": 0.2})"), "key 'lr' is given twice"},
      {write("tag.yaml", "lr: !!python/object 0.1\n"), "unknown YAML tag 'tag:yaml.org,2002:python/object'"},
      {write("local_tag.yaml", "method: !custom sqpu\n"), "unknown YAML tag '!custom'"},
      {write("bad_float_tag.yaml", "lr: !!float fast\n"), "'fast' is not a valid !!float"},
      {write("seed.json", R"({"seed": 9223372036854775808})"), "outside the 64-bit integer range"},
      {write("seed.yaml", "seed: 99999999999999999999\n"), "key 'seed' is 1e+20, outside the 64-bit integer range"},
  };
  for (const auto& [path, needle] : cases) {
    const Parsed p = parse({"--config", path});
    EXPECT_EQ(p.code, 2) << path;
    EXPECT_NE(p.err.find(needle), std::string::npos) << path << ": " << p.err;
  }
  // A value the checks refuse names the file it came from, unless a flag gave it.
  const std::string method = write("method.yaml", "method: sqpuu\nlr: 0.1\n");
  Parsed p = parse({"--config", method});
  EXPECT_NE(p.err.find("fxp-train: " + method + ": method: must be one of"), std::string::npos) << p.err;
  p = parse({"--config", method, "--method", "ste", "--lr", "-1"});
  EXPECT_NE(p.err.find("fxp-train: lr: must be a positive number, but got -1"), std::string::npos) << p.err;
  // A check of two settings names the file only when neither came from a flag.
  const std::string frac = write("frac.yaml", "param_frac: 16\n");
  p = parse({"--config", frac});
  EXPECT_NE(p.err.find("fxp-train: " + frac + ": param_frac: fractional bits must be in [0, 15]"), std::string::npos)
      << p.err;
  p = parse({"--config", frac, "--param-bits", "8"});
  EXPECT_NE(p.err.find("fxp-train: param_frac: fractional bits must be in [0, 7]"), std::string::npos) << p.err;
  // Standard tags keep their meaning.
  const Parsed tagged = parse({"--config", write("tagged.yaml", "lr: !!float 1\nmethod: !!str ste\n")});
  ASSERT_EQ(tagged.code, -1) << tagged.err;
  EXPECT_EQ(tagged.command.config.lr, 1.0);
  EXPECT_EQ(tagged.command.config.method, "ste");
}

// A config file's numbers read as a flag's (Note [Integer flags]): integers in
// decimal, an integer beyond int64 said to be so (JSON reads one below -2^63 as
// a double, which read "needs an integer, but got -9.2e+18"), and a number beyond
// a double named by its file and key (it was nlohmann's bare out_of_range.406).
TEST_F(TrainFiles, ConfigNumbersReadAsFlagsDo) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {write("hex.yaml", "seed: 0x10\n"), "hex.yaml: key 'seed' needs an integer in decimal, but got \"0x10\""},
      {write("octal.yaml", "seed: 0o10\n"), "key 'seed' needs an integer in decimal, but got \"0o10\""},
      {write("hex_float.yaml", "lr: 0x1p3\n"),
       "key 'lr' needs a number in decimal or scientific notation, but got \"0x1p3\""},
      {write("nan_plain.yaml", "lr: nan\n"), "key 'lr' needs a number, but got \"nan\""},
      // The base note is for number keys: a boolean needs true or false, in no base.
      {write("hex_bool.yaml", "packed: 0x1\n"), "key 'packed' needs true or false, but got \"0x1\""},
      {write("low.json", R"({"seed": -9223372036854775809})"),
       "low.json: key 'seed' is -9.223372036854776e+18, outside the 64-bit integer range"},
      {write("low.yaml", "seed: -9223372036854775809\n"), "key 'seed' is -9.223372036854776e+18, outside the 64-bit"},
      {write("high.yaml", "seed: 9223372036854775808\n"), "key 'seed' is 9223372036854775808, outside the 64-bit"},
      {write("huge.json", R"({"lr": 0.1, "epochs": 1e400})"),
       "config file " + dir_ + "/huge.json: key 'epochs' is 1e400, out of the range of a 64-bit float"},
      // One reader of decimal numbers for flags and YAML (read_decimal): an underflow is refused in both.
      {write("tiny.yaml", "lr: 1e-400\n"),
       "config file " + dir_ + "/tiny.yaml: key 'lr' is 1e-400, out of the range of a 64-bit float"},
      {write("huge.yaml", "epochs: 1e400\n"),
       "config file " + dir_ + "/huge.yaml: key 'epochs' is 1e400, out of the range of a 64-bit float"},
      {write("top.json", "-1e400"), "top.json: the number -1e400 is out of the range of a 64-bit float"},
      // Named by the key whose value holds it, not by the last key of an object nested before it.
      {write("nested.json", R"({"lr": 0.1, "epochs": [{"x": 1}, 1e400]})"),
       "nested.json: key 'epochs' is 1e400, out of the range of a 64-bit float"},
      {write("in_array.json", R"([{"x": 1}, 1e400])"),
       "in_array.json: the number 1e400 is out of the range of a 64-bit float"},
  };
  for (const auto& [path, needle] : cases) {
    const Parsed p = parse({"--config", path});
    EXPECT_EQ(p.code, 2) << path;
    EXPECT_NE(p.err.find(needle), std::string::npos) << path << ": " << p.err;
  }
  // Decimal integers still read as integers, and a float key takes an integer beyond int64, as from JSON.
  const Parsed p = parse({"--config", write("fine.yaml", "seed: 010\nbatch_size: +7\nlr: 99999999999999999999\n")});
  ASSERT_EQ(p.code, -1) << p.err;
  EXPECT_EQ(p.command.config.seed, 10);
  EXPECT_EQ(p.command.config.batch_size, 7);
  EXPECT_EQ(p.command.config.lr, 1e20);
}

// --fleet's and --print-configs' JSON lines refuse a key given twice as -c does
// (nlohmann kept the last), naming the line (fxp-train itself: test_fxp_train*.py).
TEST(TrainConfig, JsonLinesRefuseAKeyGivenTwice) {
  expect_error([] { ft::parse_json_strict(R"({"seed": 3, "seed": 4})", "runs.jsonl line 2"); },
               "runs.jsonl line 2: key 'seed' is given twice");
  expect_error([] { ft::parse_json_strict(R"({"lr": 1e999})", "runs.jsonl line 5"); },
               "runs.jsonl line 5: key 'lr' is 1e999, out of the range of a 64-bit float");
  EXPECT_THROW(ft::parse_json_strict("{seed: 1}", "x"), json::parse_error);  // the callers' "not JSON"
  EXPECT_EQ(ft::parse_json_strict(R"({"a": {"seed": 1}, "seed": 2})", "x")["seed"], 2);  // per object
}

TEST(TrainCli, NonFiniteValuesAreUsageErrors) {
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  };
  const std::vector<Case> cases = {
      // A flag reads digits only, and a config file's .nan and .inf are no numbers either (TrainFiles below).
      {{"--normalize-mean", "nan"}, "--normalize-mean: needs a number, but got 'nan'"},
      {{"--normalize-std", "inf"}, "--normalize-std: needs a number, but got 'inf'"},
      {{"--lr", "1e308", "--batch-size", "2048", "--lr-scaling", "linear"},
       "lr: after lr_scaling linear it is inf, which is not a positive finite number"},
  };
  for (const auto& c : cases) {
    const Parsed p = parse(c.args);
    EXPECT_EQ(p.code, 2) << c.args[0];
    EXPECT_NE(p.err.find(c.needle), std::string::npos) << "stderr: " << p.err;
  }
}

TEST_F(TrainFiles, ChecksumsRefuseDamagedFiles) {
  const std::string sealed = ft::with_checksum("payload bytes");
  EXPECT_EQ(ft::without_checksum(sealed, "c.pt"), "payload bytes");
  std::string flipped = sealed;
  flipped[3] ^= 0x01;
  expect_error([&] { ft::without_checksum(flipped, "c.pt"); }, "checkpoint c.pt is corrupted");
  expect_error([&] { ft::without_checksum(sealed.substr(0, sealed.size() - 5), "c.pt"); }, "damaged checksum line");
  expect_error([&] { ft::without_checksum("payload bytes", "c.pt"); }, "has no checksum");
}

// A write that fails part-way (a full disk; here a file-size limit, in a
// child process) removes its temporary file and keeps the old file.
TEST_F(TrainFiles, AFailedWriteKeepsTheOldFileAndLeavesNoTemporary) {
  const std::string path = dir_ + "/f.json";
  ft::atomic_write(path, "old");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const rlimit limit{1000, 1000};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    ::signal(SIGXFSZ, SIG_IGN);  // a write past the limit then fails with EFBIG instead of killing the process
    try {
      ft::atomic_write(path, std::string(100000, 'x'));
    } catch (const std::runtime_error& e) {
      _exit(std::string(e.what()).find(path + " is unchanged") != std::string::npos ? 0 : 2);
    }
    _exit(1);  // no error: wrong
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(ft::read_text(path), "old");
  EXPECT_FALSE(ft::path_exists(path + ".tmp"));
}

TEST_F(TrainFiles, ARunDirectoryIsLockedWhileARunHoldsIt) {
  {
    const ft::DirectoryLock first(dir_);
    expect_error([&] { ft::DirectoryLock second(dir_); },
                 "is in use by another fxp-train (pid " + std::to_string(::getpid()) + ")");
  }
  const ft::DirectoryLock again(dir_);  // released with the first
}

TEST_F(TrainFiles, ShippedConfigsParse) {
  // Every single-run config in configs/runs must load and validate.
  const std::string list = dir_ + "/configs.txt";
  const std::string command = "ls " FXP_SOURCE_DIR "/configs/runs/*.yaml > " + list;
  ASSERT_EQ(std::system(command.c_str()), 0);
  std::ifstream in(list);
  int count = 0;
  for (std::string path; std::getline(in, path); ++count) {
    const Parsed p = parse({"--config", path});
    EXPECT_EQ(p.code, -1) << path << ": " << p.err;
  }
  EXPECT_GE(count, 6);
}

TEST_F(TrainFiles, AtomicWriteReplacesWholeFiles) {
  const std::string path = dir_ + "/f.json";
  ft::atomic_write(path, "first");
  ft::atomic_write(path, "second");
  EXPECT_EQ(ft::read_text(path), "second");
  EXPECT_FALSE(ft::path_exists(path + ".tmp"));
  ft::make_dirs(dir_ + "/a/b/c");
  EXPECT_TRUE(ft::path_exists(dir_ + "/a/b/c"));
  expect_error([&] { ft::make_dirs(path + "/x"); }, path);
}

// ---- the paper's bookkeeping ---------------------------------------------------------

ft::ModelCounts paper_counts() {
  fxp::nn::PaperCNN model(fxp::nn::QuantConfig{});
  return ft::model_counts(model->describe());
}

// Note [Fleet chunk size]: 512 images' worth of members per chunk on the CPU,
// every member at once on a GPU, and whatever the user asks for.
TEST(FleetChunk, ImagesWorthOnTheCpuWholeOnAGpuOrAsAsked) {
  const c10::Device cpu(c10::DeviceType::CPU), cuda(c10::DeviceType::CUDA, 0);
  EXPECT_EQ(fxp::train::fleet_chunk(0, cpu, 64), 8);
  EXPECT_EQ(fxp::train::fleet_chunk(0, cpu, 16), 32);
  EXPECT_EQ(fxp::train::fleet_chunk(0, cpu, 1), 512);
  EXPECT_EQ(fxp::train::fleet_chunk(0, cpu, 4096), 1);
  EXPECT_EQ(fxp::train::fleet_chunk(0, cuda, 64), 0);
  EXPECT_EQ(fxp::train::fleet_chunk(3, cpu, 64), 3);
  EXPECT_EQ(fxp::train::fleet_chunk(3, cuda, 64), 3);
}

// Note [Saturation in the epoch line]: the worst three layers over 1%, then a
// count; layers at or under 1%, and those that count nothing (null), are left out.
TEST(TrainSummary, SaturationNoteNamesTheWorstLayersAndWhatSetsTheirRange) {
  const auto fraction = [](json f) { return json{{"output_saturated", nullptr}, {"output_saturated_fraction", f}}; };
  json layers = {{"conv1", fraction(0.01)},          {"layer1_0.conv1", fraction(0.26)},
                 {"layer1_0.conv2", fraction(0.78)}, {"layer1_1.conv1", fraction(0.5)},
                 {"layer2_0.conv1", fraction(0.02)}, {"layer2_1.conv1", fraction(0.015)},
                 {"fc", fraction(nullptr)}};
  EXPECT_EQ(ft::saturation_note(layers, "flags"),
            "  saturated outputs in validation: layer1_0.conv2 78.00%, layer1_1.conv1 50.00%, layer1_0.conv1 "
            "26.00%, and 2 more layers over 1% (flags)\n");
  layers.erase("layer2_1.conv1");
  EXPECT_NE(ft::saturation_note(layers, "flags").find(", and 1 more layer over 1% (flags)\n"), std::string::npos);
  // Exactly 1%, 0, null, NaN and entries that are not objects: none is named.
  layers = {{"conv1", fraction(0.01)},   {"fc", fraction(0.0)}, {"pool", fraction(nullptr)},
            {"bn", fraction(std::nan(""))}, {"odd", 0.5},        {"odder", json::array({0.5})}};
  EXPECT_EQ(ft::saturation_note(layers, "flags"), "");
  layers["fc"] = fraction(0.5);
  EXPECT_EQ(ft::saturation_note(layers, "flags"), "  saturated outputs in validation: fc 50.00% (flags)\n");

  ft::TrainConfig c;
  c.method = "adapt";
  // push_up: BW >= FL + buff, so the range is the buffer's, or the weights' where they need more.
  EXPECT_EQ(ft::output_range_flags(c), "range: --adapt-buffer-bits, or the weights' integer bits where more");
  c.method = "sqpu";
  EXPECT_EQ(ft::output_range_flags(c), "range: --out-bits, --out-frac");
}

TEST(Bookkeeping, Table1Totals) {
  const ft::ModelCounts c = paper_counts();
  EXPECT_EQ(c.saved_inputs, 29082);
  EXPECT_EQ(c.rounded_outputs, 22666);
  EXPECT_EQ(c.parameters, 184490);
  EXPECT_EQ(c.input_elements, 784);
}

TEST(Bookkeeping, Table3RoundingCounts) {
  const ft::ModelCounts c = paper_counts();
  // Per sample (batch 1), as the paper's Table 3: STE rounds the outputs and every weight read.
  auto ste = ft::rounding_counts(c, "ste", "sr", true, 1);
  EXPECT_EQ(ste.inference, 22666 + 184490);
  EXPECT_EQ(ste.update, 0);
  EXPECT_EQ(ste.total(), 207156);  // the paper's "Sum" row
  EXPECT_EQ(ste.stochastic, 207156);
  // QPU rounds the outputs, then the weights and the momentum buffer at the update.
  auto sqpu = ft::rounding_counts(c, "sqpu", "sr", true, 1);
  EXPECT_EQ(sqpu.inference, 22666);
  EXPECT_EQ(sqpu.update, 2 * 184490);
  auto hte = ft::rounding_counts(c, "hteqpu", "sr", false, 1);  // no momentum: weights only
  EXPECT_EQ(hte.update, 184490);
  EXPECT_EQ(hte.total(), 207156);  // the paper's sum, which leaves the momentum out
  EXPECT_EQ(hte.stochastic, 22666);
  // Outputs scale with the batch; weight roundings do not.
  EXPECT_EQ(ft::rounding_counts(c, "ste", "hte", true, 1024).inference, 1024 * 22666 + 184490);
  EXPECT_EQ(ft::rounding_counts(c, "ste", "hte", true, 1024).stochastic, 0);
  EXPECT_EQ(ft::rounding_counts(c, "fp32", "sr", true, 64).total(), 0);
}

TEST(Bookkeeping, MemoryModelReproducesThePaperRatios) {
  const ft::ModelCounts c = paper_counts();
  auto ratio = [&](const std::string& accounting, int64_t bits, int64_t batch) {
    return ft::estimate_memory(c, accounting, "sqpu", bits, bits, true, batch).total_bytes() /
           ft::estimate_memory(c, accounting, "ste", bits, bits, true, batch).total_bytes();
  };
  EXPECT_NEAR(ratio("paper", 16, 16), 0.57, 0.005);  // Section 4.3: "0.57 ... at 16 total bits, batch 16"
  EXPECT_LT(ratio("paper", 12, 16), 0.50);            // "below 50% ... 12 total bits, batch 16"
  // Parameter memory alone (Section 4.1): 737.96 kB at 32 bits, 184.49 kB at 8 bits.
  const auto q8 = ft::estimate_memory(c, "paper", "sqpu", 8, 8, false, 1);
  EXPECT_DOUBLE_EQ(q8.terms.front().bytes(), 184490.0);
  const auto f32 = ft::estimate_memory(c, "paper", "fp32", 32, 32, false, 1);
  EXPECT_DOUBLE_EQ(f32.terms.front().bytes(), 737960.0);
  // Every term of the full model, STE at 16 bits, batch 2, with momentum.
  const auto full = ft::estimate_memory(c, "full", "ste", 16, 12, true, 2);
  const double P = 184490;
  EXPECT_DOUBLE_EQ(full.total_bytes(), P * 4 + P * 2 + P * 4 + P * 4 + 2 * 784 * 4 + 2 * (29082 - 784) * 1.5);
  expect_error([&] { ft::estimate_memory(c, "guess", "ste", 16, 16, true, 1); }, "accounting must be paper or full");
}

// The notes a run's log starts with (log_settings_notes): besides the settings
// without effect, more threads than this process may use, batch norm's, and MSQ
// without a trained model to start from.
TEST(TrainConfig, LogNotesNameTooManyThreadsAndBatchNormsWithout) {
  const int64_t cpus = ft::usable_cpus();
  ASSERT_GE(cpus, 1);
  {  // the affinity mask (a SLURM allocation's), not the machine's CPUs: pinned to one, one is counted
    cpu_set_t mask, one;
    ASSERT_EQ(sched_getaffinity(0, sizeof(mask), &mask), 0);
    CPU_ZERO(&one);
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &mask)) {
        CPU_SET(c, &one);
        break;
      }
    }
    ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
    const int64_t pinned = ft::usable_cpus();
    ASSERT_EQ(sched_setaffinity(0, sizeof(mask), &mask), 0);
    EXPECT_EQ(pinned, 1);
  }
  Parsed p = parse({"--threads", std::to_string(cpus + 1), "--model", "lenet5", "--bn-recalibration-batches", "2"});
  ASSERT_EQ(p.code, -1) << p.err;
  std::ostringstream log;
  ft::log_settings_notes(log, p.command.config, *ft::build_network(p.command.config), "run: ");
  EXPECT_EQ(log.str(), "run: note: bn_recalibration_batches = 2 has no effect: model lenet5 has no batch norm\n"
                       "run: note: threads = " + std::to_string(cpus + 1) + " is more than the " +
                           std::to_string(cpus) + " CPUs this process may use: OpenMP's waiting threads spin, so "
                           "threads that share a core can make the run several times slower (docs/train.md, "
                           "\"Threads and a busy machine\")\n");
  p = parse({"--threads", std::to_string(cpus), "--model", "resnet20"});
  ASSERT_EQ(p.code, -1) << p.err;
  log.str("");
  ft::log_settings_notes(log, p.command.config, *ft::build_network(p.command.config));
  EXPECT_EQ(log.str().rfind("note: batch norm's running statistics trail the parameters", 0), 0u) << log.str();
  p = parse({"--method", "msq"});
  ASSERT_EQ(p.code, -1) << p.err;
  log.str("");
  ft::log_settings_notes(log, p.command.config, *ft::build_network(p.command.config));
  EXPECT_EQ(log.str().rfind("note: MSQ starts from random weights here", 0), 0u) << log.str();
  EXPECT_NE(log.str().find("--init-from RUN/checkpoint.pt"), std::string::npos) << log.str();
  p = parse({"--method", "msq", "--init-from", "runs/fp32/checkpoint.pt"});
  ASSERT_EQ(p.code, -1) << p.err;
  log.str("");
  ft::log_settings_notes(log, p.command.config, *ft::build_network(p.command.config));
  EXPECT_EQ(log.str(), "");
  p = parse({});
  log.str("");
  ft::log_settings_notes(log, p.command.config, *ft::build_network(p.command.config));
  EXPECT_EQ(log.str(), "");
}

TEST(Bookkeeping, DescribeModelReport) {
  fxp::nn::PaperCNN model(fxp::nn::QuantConfig{});
  const json report = ft::describe_model(model->describe(), "sqpu", "float", "sr", 16, 16, true, 16);
  EXPECT_EQ(report["table1"]["totals"]["parameters"], 184490);
  EXPECT_EQ(report["table1"]["layers"].size(), 7u);
  EXPECT_NEAR(report["memory"]["paper"]["methods"]["sqpu"]["ratio_to_ste"].get<double>(), 0.57, 0.005);
  EXPECT_EQ(report["memory"]["paper"]["figure2"]["sqpu_over_ste"].size(), 5u);
  const std::string text = ft::describe_model_text(report);
  for (const char* needle : {"29082", "22666", "184490", "Table 3", "Figure 2"}) {
    EXPECT_NE(text.find(needle), std::string::npos) << needle;
  }
  EXPECT_EQ(text.find("is counted as"), std::string::npos);
  // AdaPT and MSQ are counted as one of the paper's methods, which the text says.
  EXPECT_EQ(ft::memory_counted_as("adapt", "float"), "ste");
  EXPECT_EQ(ft::memory_counted_as("adapt", "qpu"), "sqpu");
  EXPECT_EQ(ft::memory_counted_as("msq", "float"), "fp32");
  EXPECT_EQ(ft::memory_counted_as("hteqpu", "float"), "hteqpu");
  const json adapt = ft::describe_model(model->describe(), "adapt", "float", "sr", 8, 8, true, 16);
  EXPECT_EQ(adapt["config"]["memory_counted_as"], "ste");
  const std::string adapt_text = ft::describe_model_text(adapt);
  EXPECT_NE(adapt_text.find("8-bit parameters"), std::string::npos) << adapt_text;
  EXPECT_NE(adapt_text.find("(method adapt is counted as ste at its start format"), std::string::npos) << adapt_text;
}

// ---- short runs on the Debian Fashion-MNIST ----------------------------------------

// Debian's dataset-fashion-mnist, or FXP_FASHION_MNIST (scripts/gpu_check.sh carries a copy).
const std::string kFashion = std::getenv("FXP_FASHION_MNIST") ? std::getenv("FXP_FASHION_MNIST")
                                                                : "/usr/share/datasets/fashion-mnist";

class TrainRun : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ft::path_exists(kFashion + "/train-images-idx3-ubyte.gz") &&
        !ft::path_exists(kFashion + "/train-images-idx3-ubyte")) {
      GTEST_SKIP() << "Fashion-MNIST is not in " << kFashion
                   << " (apt-get install dataset-fashion-mnist, or set FXP_FASHION_MNIST)";
    }
    dir_ = temp_dir();
    config_.data_dir = kFashion;
    config_.train_limit = 2000;
    config_.val_limit = 500;
    config_.epochs = 1;
    config_.threads = 1;
  }
  void TearDown() override {
    if (!dir_.empty()) remove_tree(dir_);
  }
  json run(const std::string& name, ft::TrainConfig config, bool resume = false) {
    config.output_dir = dir_ + "/" + name;
    ft::RunOptions options;
    options.resume = resume;
    return ft::run_training(config, options);
  }
  std::vector<json> metrics(const std::string& name) {
    std::vector<json> lines;
    std::ifstream in(dir_ + "/" + name + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    return lines;
  }
  void make_dirs_for(const std::string& name) { ft::make_dirs(dir_ + "/" + name); }
  static json without_timing(json record) {
    for (const char* key : {"epoch_time_s", "train_time_s", "images_per_s"}) record.erase(key);
    return record;
  }
  // Issue 6: packed storage changes memory, never a number. Runs c with float
  // and with packed storage and checks that both give the same epochs, bit for
  // bit; plain and packed get their summaries (callers check memory).
  void run_plain_and_packed(const std::string& name, ft::TrainConfig c, json& plain, json& packed) {
    c.packed = false;
    plain = run(name, c);
    c.packed = true;
    packed = run(name + "-packed", c);
    const auto a = metrics(name), b = metrics(name + "-packed");
    ASSERT_EQ(a.size(), static_cast<size_t>(c.epochs));
    ASSERT_EQ(b.size(), static_cast<size_t>(c.epochs));
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(without_timing(a[i]), without_timing(b[i])) << name << " " << i;
    EXPECT_EQ(plain["best_val_accuracy"], packed["best_val_accuracy"]);
    EXPECT_EQ(packed["run_name"].get<std::string>(), plain["run_name"].get<std::string>() + "-packed");
  }
  std::string dir_;
  ft::TrainConfig config_;
};

TEST_F(TrainRun, OneEpochWritesEveryField) {
  const json summary = run("sqpu", config_);
  const auto lines = metrics("sqpu");
  ASSERT_EQ(lines.size(), 1u);
  const json& e = lines[0];
  for (const char* key : {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_time_s", "images_per_s",
                          "layers", "vanished_update_fraction"}) {
    EXPECT_TRUE(e.contains(key)) << key;
  }
  EXPECT_EQ(e["epoch"], 1);
  EXPECT_GT(e["val_accuracy"].get<double>(), 0.3);  // learns something in one epoch of 2,000 images
  EXPECT_LT(e["train_loss"].get<double>(), 2.3);
  EXPECT_GT(e["images_per_s"].get<double>(), 0);
  for (const char* layer : {"conv1", "conv2", "fc1", "fc2"}) {
    const json& l = e["layers"][layer];
    EXPECT_GE(l["output_saturated"].get<int64_t>(), 0) << layer;
    EXPECT_GE(l["param_saturated"].get<int64_t>(), 0) << layer;
  }
  const double vanished = e["vanished_update_fraction"];
  EXPECT_GT(vanished, 0.0);
  EXPECT_LT(vanished, 1.0);

  for (const char* key : {"best_val_accuracy", "best_epoch", "final_val_accuracy", "stop_reason", "wall_time_s",
                          "memory_model", "measured_memory", "config", "train_images_per_s"}) {
    EXPECT_TRUE(summary.contains(key)) << key;
  }
  EXPECT_EQ(summary["stop_reason"], "epochs");
  EXPECT_EQ(summary["best_val_accuracy"], e["val_accuracy"]);
  EXPECT_EQ(summary["train_images"], 2000);
  EXPECT_GT(summary["measured_memory"]["process_peak_rss_bytes"].get<int64_t>(), 0);
  EXPECT_GT(summary["memory_model"]["paper"]["total_bytes"].get<double>(), 0);
  // The files on disk are complete JSON, equal to what the run returned.
  EXPECT_EQ(json::parse(ft::read_text(dir_ + "/sqpu/summary.json")), summary);
  EXPECT_EQ(json::parse(ft::read_text(dir_ + "/sqpu/config.json"))["method"], "sqpu");
  EXPECT_TRUE(ft::path_exists(dir_ + "/sqpu/checkpoint.pt"));

  // The same run again is done already: its summary comes back, nothing trains.
  const auto before = ft::read_text(dir_ + "/sqpu/metrics.jsonl");
  EXPECT_EQ(run("sqpu", config_), summary);
  EXPECT_EQ(ft::read_text(dir_ + "/sqpu/metrics.jsonl"), before);
  // Other settings in the same directory need --resume (more epochs) or --overwrite.
  ft::TrainConfig more = config_;
  more.epochs = 2;
  expect_error([&] { run("sqpu", more); }, "holds a finished run with other settings (epochs (1 in the run, 2 now)); "
                                           "pass --resume to extend it to more epochs");
  // --resume is offered only where it would be accepted.
  more = config_;
  more.lr = 0.02;
  expect_error([&] { run("sqpu", more); }, "holds a finished run with other settings (lr (0.01 in the run, 0.02 now)); "
                                           "pass --overwrite to replace it or choose another --output-dir");
  // An unfinished run (a checkpoint, no summary) needs --resume or --overwrite; with other settings, --overwrite.
  ft::remove_file(dir_ + "/sqpu/summary.json");
  expect_error([&] { run("sqpu", config_); }, "holds an unfinished run; pass --resume");
  expect_error([&] { run("sqpu", more); }, "holds an unfinished run with other settings (lr (0.01 in the run, 0.02 "
                                           "now)); pass --overwrite to start again or choose another --output-dir");
}

// --resume is not offered for fewer epochs than the run has done: it would refuse them (Note [Resume adds epochs]).
TEST_F(TrainRun, ResumeIsNotOfferedForFewerEpochs) {
  ft::TrainConfig two = config_;
  two.train_limit = 256;
  two.val_limit = 128;
  two.epochs = 2;
  run("two", two);
  ft::TrainConfig one = two;
  one.epochs = 1;
  expect_error([&] { run("two", one); }, "holds a finished run with other settings (epochs (2 in the run, 1 now)); "
                                         "pass --overwrite to replace it or choose another --output-dir");
  ft::remove_file(dir_ + "/two/summary.json");
  expect_error([&] { run("two", one); }, "holds an unfinished run that has done 2 epochs, more than epochs 1; pass "
                                         "--overwrite to start again or choose another --output-dir");
  expect_error([&] { run("two", one, /*resume=*/true); }, "the run has done 2 epochs, more than epochs 1");
}

TEST_F(TrainRun, SameSeedSameInitialWeightsForEveryMethod) {
  // Zero epochs of training are not allowed, so compare the first epoch's
  // validation of a run with a tiny lr: all methods start from one init, and
  // fp32 and STE (whose master copy is that init) see identical inputs.
  ft::TrainConfig c = config_;
  c.train_limit = 64;
  c.lr = 1e-12;
  c.method = "fp32";
  const double fp32 = run("fp32", c)["final_val_loss"];
  c.method = "ste";
  c.param_bits = c.out_bits = 32;
  c.param_frac = c.out_frac = 24;
  c.inference_rounding = "hte";
  const double ste = run("ste", c)["final_val_loss"];
  EXPECT_NEAR(fp32, ste, 1e-5);  // 24 fractional bits: the rounding changes the loss only slightly
  c.method = "sqpu";
  EXPECT_NEAR(fp32, run("sqpu", c)["final_val_loss"].get<double>(), 1e-5);
}

TEST_F(TrainRun, DeterministicWithTheSameSeedAndThreads) {
  config_.method = "sqpu";
  config_.epochs = 2;
  run("a", config_);
  run("b", config_);
  const auto a = metrics("a"), b = metrics("b");
  ASSERT_EQ(a.size(), 2u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(without_timing(a[i]), without_timing(b[i]));
  config_.seed = 1;
  run("c", config_);
  EXPECT_NE(metrics("c")[1]["train_loss"], a[1]["train_loss"]);
}

TEST_F(TrainRun, ResumeEqualsAnUninterruptedRun) {
  for (const std::string method : {"sqpu", "ste"}) {
    ft::TrainConfig c = config_;
    c.method = method;
    c.scheduler = "plateau";
    c.plateau_patience = 0;  // the lr changes between epochs, so the scheduler state must resume too
    c.epochs = 3;
    const json whole = run(method + "-whole", c);
    c.epochs = 1;
    run(method + "-split", c);
    c.epochs = 3;
    const json resumed = run(method + "-split", c, /*resume=*/true);
    const auto a = metrics(method + "-whole"), b = metrics(method + "-split");
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(b.size(), 3u);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(without_timing(a[i]), without_timing(b[i])) << method << " " << i;
    EXPECT_EQ(whole["best_val_accuracy"], resumed["best_val_accuracy"]);
    EXPECT_EQ(whole["final_lr"], resumed["final_lr"]);
    // The weights themselves, bit for bit.
    auto load = [&](const std::string& name) {
      torch::serialize::InputArchive archive, model;
      archive.load_from(dir_ + "/" + name + "/checkpoint.pt");
      archive.read("model", model);
      fxp::nn::PaperCNN m(fxp::nn::QuantConfig{});
      m->load(model);
      return m->parameters();
    };
    const auto wa = load(method + "-whole"), wb = load(method + "-split");
    for (size_t i = 0; i < wa.size(); ++i) EXPECT_TRUE(torch::equal(wa[i], wb[i])) << method << " tensor " << i;
  }
}

TEST_F(TrainRun, PackedRunIsBitIdenticalToFloatStorage) {
  for (const std::string method : {"sqpu", "hteqpu", "ste"}) {
    ft::TrainConfig c = config_;
    c.method = method;
    c.epochs = 2;
    c.train_limit = 500;
    json plain, packed;
    run_plain_and_packed(method, c, plain, packed);
    ASSERT_FALSE(HasFatalFailure());
    // ... and packing happened: fewer activation bytes for every method (the
    // saved layer inputs: MeasuredBytesMatchTheModel), fewer parameter bytes for QPU.
    const json& m_plain = plain["measured_memory"]["step"];
    const json& m_packed = packed["measured_memory"]["step"];
    EXPECT_LT(m_packed["activations_bytes"].get<int64_t>(), m_plain["activations_bytes"].get<int64_t>()) << method;
    if (method != "ste") {
      EXPECT_LT(m_packed["parameters_bytes"].get<int64_t>(), m_plain["parameters_bytes"].get<int64_t>()) << method;
    }
  }
}

// LeNet-5 packs its QPU weights and momentum (its saved activations are off any grid).
TEST_F(TrainRun, PackedLeNet5IsBitIdenticalToFloatStorage) {
  for (const std::string method : {"sqpu", "hteqpu"}) {
    ft::TrainConfig c = config_;
    c.model = "lenet5";
    c.method = method;
    c.epochs = 2;
    c.train_limit = 500;
    json plain, packed;
    run_plain_and_packed("lenet5-" + method, c, plain, packed);
    ASSERT_FALSE(HasFatalFailure());
    const json& m_plain = plain["measured_memory"]["step"];
    const json& m_packed = packed["measured_memory"]["step"];
    // int16 codes: half the parameter bytes (and a 4-byte stand-in for each of the 10 packed tensors),
    // half the momentum bytes; the activations as they were.
    EXPECT_EQ(m_packed["parameters_bytes"].get<int64_t>(), m_plain["parameters_bytes"].get<int64_t>() / 2 + 10 * 4)
        << method;
    EXPECT_EQ(m_packed["optimizer_state_bytes"].get<int64_t>() * 2, m_plain["optimizer_state_bytes"].get<int64_t>())
        << method;
    EXPECT_EQ(m_packed["activations_bytes"], m_plain["activations_bytes"]) << method;
  }
}

// At 16 bits the codes are int16; at 12 they are bit streams (Note [Bit-stream storage]).
TEST_F(TrainRun, PackedRunResumesBitForBit) {
  for (const int64_t bits : {16, 12}) {
    const std::string name = std::to_string(bits);
    ft::TrainConfig c = config_;
    c.packed = true;
    c.train_limit = 500;
    c.param_bits = bits, c.out_bits = bits, c.out_frac = bits - 8;
    c.epochs = 2;
    run("whole" + name, c);
    c.epochs = 1;
    run("split" + name, c);
    c.epochs = 2;
    run("split" + name, c, /*resume=*/true);
    const auto a = metrics("whole" + name), b = metrics("split" + name);
    ASSERT_EQ(b.size(), 2u);
    EXPECT_EQ(without_timing(a[1]), without_timing(b[1])) << bits;
  }
}

// The measured bytes of a known model: PaperCNN (184,490 parameters, 6 tensors), batch 16.
TEST_F(TrainRun, MeasuredBytesMatchTheModel) {
  ft::TrainConfig c = config_;
  c.train_limit = 64;
  c.batch_size = 16;
  const int64_t params = 184490, batch = 16;
  const json plain = run("plain", c)["measured_memory"]["step"];
  c.packed = true;
  const json packed = run("packed", c)["measured_memory"]["step"];
  EXPECT_EQ(plain["source"], "cpu tracking allocator");
  EXPECT_EQ(plain["parameters_bytes"], params * 4);
  EXPECT_EQ(plain["gradients_bytes"], params * 4);
  EXPECT_EQ(plain["optimizer_state_bytes"], params * 4);
  EXPECT_EQ(packed["parameters_bytes"], params * 2 + 6 * 4);  // int16 codes, and a 4-byte stand-in per tensor
  EXPECT_EQ(packed["gradients_bytes"], params * 4);          // gradients stay float32
  EXPECT_EQ(packed["optimizer_state_bytes"], params * 2);    // int16 momentum codes
  // Saved per sample: conv2's 32x12x12 and fc1's 1024 inputs go from float32
  // to int16; fc2's 128 (also kept by its ReLU as float32) gains int16 codes.
  // Each ReLU + max-pool keeps a byte per output in both (fxp::relu_max_pool2d).
  const int64_t saved_per_sample = (32 * 12 * 12 + 1024) * (4 - 2) - 128 * 2;
  EXPECT_EQ(plain["activations_bytes"].get<int64_t>() - packed["activations_bytes"].get<int64_t>(),
            batch * saved_per_sample);
  EXPECT_EQ(packed["total_bytes"], packed["parameters_bytes"].get<int64_t>() + packed["gradients_bytes"].get<int64_t>() +
                                       packed["optimizer_state_bytes"].get<int64_t>() +
                                       packed["activations_bytes"].get<int64_t>());
  EXPECT_GE(packed["step_peak_bytes"].get<int64_t>(), packed["total_bytes"].get<int64_t>() -
                                                          packed["optimizer_state_bytes"].get<int64_t>());

  // At 12 bits (Note [Bit-stream storage]) codes cost 12 bits: parameters and
  // momentum are streams of ceil(numel * 12 / 8) bytes per tensor, and the
  // three saved inputs are streams instead of int16.
  c.param_bits = 12, c.param_frac = 6, c.out_bits = 12, c.out_frac = 4;
  const json packed12 = run("packed12", c)["measured_memory"]["step"];
  int64_t stream_bytes = 0;
  for (const auto& p : fxp::nn::PaperCNN(fxp::nn::QuantConfig{})->parameters()) {
    stream_bytes += (p.numel() * 12 + 7) / 8;
  }
  EXPECT_LT(stream_bytes, params * 2 * 3 / 4 + 6);
  EXPECT_EQ(packed12["parameters_bytes"], stream_bytes + 6 * 4);
  EXPECT_EQ(packed12["optimizer_state_bytes"], stream_bytes);
  const int64_t saved_inputs = batch * (32 * 12 * 12 + 1024 + 128);
  EXPECT_EQ(packed["activations_bytes"].get<int64_t>() - packed12["activations_bytes"].get<int64_t>(),
            saved_inputs * 2 - saved_inputs * 12 / 8);
}

TEST_F(TrainRun, ResumeRefusesChangedSettings) {
  run("r", config_);
  ft::TrainConfig c = config_;
  c.lr = 0.5;
  expect_error([&] { run("r", c, true); }, "lr (0.01 in the run, 0.5 now)");
}

// What only changes how a run executes may change on resume; a setting of the run may not.
TEST(TrainConfig, CudaGraphsMayChangeOnResume) {
  ft::TrainConfig eager;
  ft::TrainConfig graphs = eager;
  graphs.cuda_graphs = true;
  graphs.device = "cuda";
  const json stored = ft::to_json(eager), current = ft::to_json(graphs);
  EXPECT_EQ(ft::differing_settings(stored, current, false), "device (\"cpu\" in the run, \"cuda\" now)");
  graphs.device = eager.device;
  EXPECT_EQ(ft::differing_settings(stored, ft::to_json(graphs), false), "");
  EXPECT_TRUE(ft::key_may_change_on_resume("cuda_graphs"));
}

// init_from names a file: the same file written another way (relative, with `..`, through a
// symbolic link) is the same setting, so a sweep that writes its sources through ${out} keeps
// runs finished with a relative path; another file is another setting.
TEST(TrainConfig, InitFromComparesTheFileItNames) {
  const std::string dir = temp_dir();
  ASSERT_EQ(::mkdir((dir + "/fp32").c_str(), 0755), 0);
  ASSERT_EQ(::symlink((dir + "/fp32").c_str(), (dir + "/link").c_str()), 0);
  ft::TrainConfig stored, current;
  stored.init_from = dir + "/fp32/checkpoint.pt";
  for (const std::string& same : {dir + "/x/../fp32/checkpoint.pt", dir + "/link/checkpoint.pt",
                                  dir + "//fp32/./checkpoint.pt"}) {
    current.init_from = same;
    EXPECT_EQ(ft::differing_settings(ft::to_json(stored), ft::to_json(current), false), "") << same;
  }
  // A symbolic link past a part that does not exist stays as it is (weakly_canonical).
  for (const std::string& other : {dir + "/fp32/other.pt", std::string(), dir + "/missing/../link/checkpoint.pt"}) {
    current.init_from = other;
    EXPECT_NE(ft::differing_settings(ft::to_json(stored), ft::to_json(current), false).find("init_from ("),
              std::string::npos) << other;
  }
  EXPECT_TRUE(ft::key_names_a_file("init_from"));
  EXPECT_FALSE(ft::key_names_a_file("data_dir"));  // it may change on resume anyway
  EXPECT_TRUE(ft::same_file_path("", ""));
  EXPECT_FALSE(ft::same_file_path("", "checkpoint.pt"));
  // Relative paths are taken from the working directory, whether their file exists or not.
  char* working = ::getcwd(nullptr, 0);  // not std::filesystem (docs/design.md)
  const std::string cwd = working;
  std::free(working);
  EXPECT_TRUE(ft::same_file_path("nothere/x/../checkpoint.pt", cwd + "/nothere/checkpoint.pt"));
}

// Note [The forward's key on a GPU]: the device's generator draws with mix_seed(seed, 0), not the
// QPU step's key (seed), from counter 0; the CPU generator keeps the run's seed, so CPU runs keep
// their bits. "Cuda" in the name: scripts/gpu_check.sh runs these first.
TEST(TrainSetupCuda, TheForwardsKeyIsNotTheUpdatesKey) {
  ft::TrainConfig c;
  c.method = "sqpu";
  c.seed = 7;
  const ft::Training on_cpu = ft::set_up_training(c, torch::Device(torch::kCPU));
  EXPECT_EQ(at::detail::getDefaultCPUGenerator().current_seed(), 7u);
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine (the CPU half ran)";
  const torch::Device cuda(torch::kCUDA, 0);
  const ft::Training on_gpu = ft::set_up_training(c, cuda);
  at::Generator g = fxp::nn::default_generators(cuda).back();
  EXPECT_EQ(g.current_seed(), ft::mix_seed(7, 0));
  EXPECT_EQ(g.get_offset(), 0u);
  EXPECT_EQ(at::detail::getDefaultCPUGenerator().current_seed(), 7u);
}

// Note [Deferred pack checks in training]: a packed run's steps count on the device what packed
// storage cannot hold (a NaN saved input, a NaN update); the check after the step (every step on
// the CPU) ends the epoch there as a diverged run.
TEST(TrainEpoch, PackedStorageCountsOnTheDeviceAndTheEpochsCheckStopsTheRun) {
  for (const char* method : {"sqpu", "ste"}) {
    SCOPED_TRACE(method);
    ft::TrainConfig c;
    c.method = method;
    c.packed = true;
    c.batch_size = 8;
    const torch::Device cpu(torch::kCPU);
    ft::Training t = ft::set_up_training(c, cpu);
    ASSERT_TRUE(t.packed_counts.defined());
    int counting_layers = 0;
    for (const auto& [name, layer] : t.model->quantized_layers()) {
      if (!layer->packed.saved_input_format) continue;
      // The run's counts' first two slots, shared by every such layer.
      EXPECT_EQ(layer->packed.pack_counts.data_ptr(), t.packed_counts.data_ptr()) << name;
      EXPECT_EQ(layer->packed.pack_counts.numel(), 2) << name;
      ++counting_layers;
    }
    EXPECT_EQ(counting_layers, 3);  // conv2, fc1, fc2
    if (t.qpu) {
      EXPECT_TRUE(t.qpu->capturable());  // NaN updates are counted, not raised
    }

    torch::manual_seed(1);
    ft::Split train{torch::randn({32, 1, 28, 28}), torch::randint(0, 10, {32})};
    std::optional<ft::StepMemory> memory = ft::StepMemory{0, 0, 0, 0, 0};  // measured already: no probe
    std::ostringstream log;
    ft::RunOptions options;
    options.log = &log;
    const ft::EpochResult healthy = ft::train_epoch(t, train, c, 1, cpu, memory, options);
    EXPECT_FALSE(healthy.diverged);
    EXPECT_TRUE(std::isfinite(healthy.loss));
    EXPECT_EQ(log.str(), "");

    // One NaN image, in one batch of every epoch: its activations reach conv2's saved input, and
    // with QPU its gradients reach the update.
    train.images[5].fill_(std::numeric_limits<float>::quiet_NaN());
    const ft::EpochResult diverged = ft::train_epoch(t, train, c, 2, cpu, memory, options);
    EXPECT_TRUE(diverged.diverged);
    EXPECT_TRUE(std::isnan(diverged.loss));
    const std::string text = log.str();
    EXPECT_NE(text.find("stopping: packed storage cannot hold what the steps since the last check made: "),
              std::string::npos)
        << text;
    EXPECT_EQ(text.find("made: 0 saved layer-input elements were NaN"), std::string::npos) << text;
    EXPECT_NE(text.find(" 0 were off their format's grid"), std::string::npos) << text;
    if (t.qpu) {
      EXPECT_EQ(text.find("and 0 updated values were NaN"), std::string::npos) << text;
    } else {
      EXPECT_NE(text.find("and 0 updated values were NaN"), std::string::npos) << text;
    }
    EXPECT_EQ(t.packed_counts.narrow(0, 0, 2).sum().item<int64_t>(), 0);  // the read starts the counts again
    if (t.qpu) {
      EXPECT_EQ(t.packed_counts[2].item<int64_t>(), 0);
    }
  }

  // The check runs after every step on the CPU, not only at the epoch's end: with every image NaN,
  // the epoch stops after its first step (of 4).
  ft::TrainConfig c;
  c.packed = true;
  c.batch_size = 8;
  ft::Training t = ft::set_up_training(c, torch::Device(torch::kCPU));
  ft::Split nan_images{torch::full({32, 1, 28, 28}, std::numeric_limits<float>::quiet_NaN()),
                       torch::randint(0, 10, {32})};
  std::optional<ft::StepMemory> memory = ft::StepMemory{0, 0, 0, 0, 0};
  EXPECT_TRUE(ft::train_epoch(t, nan_images, c, 1, torch::Device(torch::kCPU), memory, {}).diverged);
  t.qpu->sync_steps();
  EXPECT_EQ(static_cast<const fxp::optim::QpuSgdOptions&>(t.qpu->param_groups()[0].options()).step(), 1);
}

// Issue 11: a damaged checkpoint, or one of other settings, is never resumed from.
TEST_F(TrainRun, ResumeRefusesDamagedOrForeignCheckpoints) {
  run("r", config_);
  const std::string checkpoint = dir_ + "/r/checkpoint.pt";
  const std::string good = ft::read_text(checkpoint);
  ft::TrainConfig more = config_;
  more.epochs = 2;
  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x10;
  ft::atomic_write(checkpoint, flipped);
  expect_error([&] { run("r", more, true); }, "checkpoint " + checkpoint + " is corrupted");
  ft::atomic_write(checkpoint, good.substr(0, good.size() / 2));
  expect_error([&] { run("r", more, true); }, "checkpoint " + checkpoint + " has no checksum");
  // Without config.json, the checkpoint itself says which settings it belongs to.
  ft::atomic_write(checkpoint, good);
  ft::remove_file(dir_ + "/r/config.json");
  ft::TrainConfig other = more;
  other.lr = 0.5;
  expect_error([&] { run("r", other, true); }, "written with other settings: lr (0.01 in the run, 0.5 now)");
  EXPECT_EQ(run("r", more, true)["epochs_completed"], 2);  // the same settings resume
  // --resume to no more epochs than the run has: refused, its files untouched (it would train nothing).
  const std::string summary = dir_ + "/r/summary.json";
  const std::string finished = ft::read_text(summary), settings = ft::read_text(dir_ + "/r/config.json");
  expect_error([&] { run("r", config_, true); },
               "the run has done 2 epochs, more than epochs 1 (--resume adds epochs; --overwrite trains it again)");
  EXPECT_EQ(ft::read_text(summary), finished);
  EXPECT_EQ(ft::read_text(dir_ + "/r/config.json"), settings);
  // A damaged summary is named.
  ft::atomic_write(summary, "[1, 2]\n");
  expect_error([&] { run("r", more, true); }, summary + " is not a run summary");
  ft::atomic_write(summary, "{x");
  expect_error([&] { run("r", more, true); }, summary + " is not valid JSON");
  // Note [Resume adds epochs]: an unfinished run (killed before its summary) too.
  ft::remove_file(summary);
  expect_error([&] { run("r", config_, true); }, "the run has done 2 epochs, more than epochs 1");
  EXPECT_EQ(ft::read_text(dir_ + "/r/config.json"), settings);
  EXPECT_FALSE(ft::path_exists(summary));
}

// Note [Resume adds epochs]: a run that stopped early is finished as it is, even when asked for more epochs.
TEST_F(TrainRun, ResumingARunThatStoppedEarlyLeavesItAsItIs) {
  ft::TrainConfig diverging = config_;
  diverging.method = "fp32";
  diverging.lr = 1e12;
  const json stopped = run("nan", diverging);
  ASSERT_EQ(stopped["stop_reason"], "non_finite_loss");
  const std::string config = ft::read_text(dir_ + "/nan/config.json");
  diverging.epochs = 3;
  EXPECT_EQ(run("nan", diverging, true), stopped);
  EXPECT_EQ(ft::read_text(dir_ + "/nan/config.json"), config);
}

TEST_F(TrainRun, ASecondRunOnTheSameDirectoryIsRefused) {
  make_dirs_for("busy");
  const ft::DirectoryLock held(dir_ + "/busy");
  try {
    run("busy", config_);
    ADD_FAILURE() << "expected DirectoryBusy";
  } catch (const ft::DirectoryBusy& e) {
    EXPECT_NE(std::string(e.what()).find("is in use by another fxp-train"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(ft::path_exists(dir_ + "/busy/config.json"));  // refused before it touched the run
}

TEST_F(TrainRun, EarlyStoppingAndItsMinimum) {
  ft::TrainConfig c = config_;
  c.train_limit = 128;
  c.lr = 1e-12;  // the weights do not move, and HTE inference makes every validation pass identical,
  c.inference_rounding = "hte";  // so nothing improves after the first epoch
  c.epochs = 10;
  c.early_stopping = true;
  c.early_stopping_patience = 2;
  c.early_stopping_min_epochs = 4;
  const json s = run("stop", c);
  EXPECT_EQ(s["stop_reason"], "early_stopping");
  EXPECT_EQ(s["epochs_completed"], 4);  // patience ran out at epoch 3, the minimum held it to 4
}

// The published split's size is checked when a run is planned (TrainConfig::validate); files that hold fewer
// images (a subset, a dataset of one's own) are checked when they are read, naming them.
TEST(TrainSetup, ALimitBeyondTheFilesImagesNamesThem) {
  const std::string dir = temp_dir();
  const auto write_idx = [&](const std::string& name, const std::vector<uint32_t>& dims, size_t count) {
    const auto bytes = fxp::testing::idx_bytes(0x08, dims, std::vector<uint8_t>(count, 1));
    std::ofstream(dir + "/" + name, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                             static_cast<std::streamsize>(bytes.size()));
  };
  write_idx("train-images-idx3-ubyte", {10, 28, 28}, 10 * 28 * 28);
  write_idx("train-labels-idx1-ubyte", {10}, 10);
  ft::TrainConfig c;
  c.data_dir = dir;
  c.train_limit = 20;
  c.validate();  // within Fashion-MNIST's published 60,000
  expect_error([&] { ft::load_split(c, true, c.train_limit, torch::kCPU); },
               "train_limit 20 is larger than the 10 images of " + dir + " (fashion-mnist, training split)");
  EXPECT_EQ(ft::load_split(c, true, 4, torch::kCPU).labels.size(0), 4);
  remove_tree(dir);
}

TEST_F(TrainRun, MissingDataIsAClearError) {
  ft::TrainConfig c = config_;
  c.data_dir = dir_ + "/nowhere";
  expect_error([&] { run("x", c); }, dir_ + "/nowhere");
  c = config_;
  c.train_limit = 70000;
  expect_error([&] { run("y", c); }, "train_limit: must be at most 60000, the images of fashion-mnist's training split "
                                     "(0: all of them), but got 70000");
  c = config_;
  c.device = "cuda";
  if (!torch::cuda::is_available()) expect_error([&] { run("z", c); }, "no CUDA device is available");
}

// Note [MSQ export format]: the export holds each MSQ layer's weight at n + 1
// bits, and a network loaded from it computes the trained network's outputs
// bit for bit with plain float layers.
TEST(MsqExport, LoadingTheExportGivesTheSameOutputsBitForBit) {
  torch::manual_seed(4);
  auto trained = fxp::nn::make_network("resnet20", fxp::nn::QuantConfig{}, 1, 10);
  fxp::msq::MsqOptions o;
  o.start_bits = 3;
  fxp::msq::Controller controller(*trained, o);
  {  // a training step, so that batch norm's statistics and the weights are not the initial ones
    torch::optim::SGD sgd(trained->parameters(), torch::optim::SGDOptions(0.05));
    const auto loss = torch::nn::functional::cross_entropy(trained->forward(torch::randn({8, 1, 32, 32})),
                                                           torch::randint(0, 10, {8}));
    (loss + controller.penalty()).backward();
    sgd.step();
  }
  const std::string path = temp_dir() + "/model.msq";
  const ft::ExportSizes sizes = ft::export_msq_model(controller, *trained, path);
  int64_t packed_bytes = 0, other_bytes = 0;
  for (const auto& l : controller.layers()) packed_bytes += (l.weight.numel() * 4 + 7) / 8;  // 3 bits + sign
  for (const auto& p : trained->named_parameters()) {
    bool is_msq = false;
    for (const auto& l : controller.layers()) is_msq |= l.weight.is_same(p.value());
    if (!is_msq) other_bytes += static_cast<int64_t>(p.value().nbytes());
  }
  for (const auto& b : trained->named_buffers()) other_bytes += static_cast<int64_t>(b.value().nbytes());
  EXPECT_GT(sizes.file_bytes, packed_bytes + other_bytes);
  EXPECT_LT(sizes.file_bytes, packed_bytes + other_bytes + 20000) << "the header is small";
  EXPECT_GT(static_cast<double>(sizes.model_bytes) / static_cast<double>(sizes.file_bytes), 4.0);

  auto loaded = fxp::nn::make_network("resnet20", fxp::nn::QuantConfig{}, 1, 10);
  ft::load_msq_export(path, *loaded);
  trained->eval();
  loaded->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({4, 1, 32, 32});
  EXPECT_TRUE(torch::equal(loaded->forward(x), trained->forward(x)));
  // A network of another model is refused, naming the tensor.
  auto other = fxp::nn::make_network("lenet5", fxp::nn::QuantConfig{}, 1, 10);
  expect_error([&] { ft::load_msq_export(path, *other); }, "conv1.conv.weight has shape [16, 1, 3, 3]");
  expect_error([&] { ft::load_msq_export(temp_dir() + "/missing.msq", *loaded); }, "missing.msq");
}

}  // namespace
