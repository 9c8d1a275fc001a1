// fxp-train: see `fxp-train --help` and docs/train.md.
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>

#include "nn/models.h"
#include "train/bookkeeping.h"
#include "train/cli.h"
#include "train/distributed.h"
#include "train/fleet.h"
#include "train/io.h"
#include "train/setup.h"
#include "train/trainer.h"

namespace {

// Each non-blank line of a file of settings (--print-configs, --fleet; "-": stdin) with its number.
template <class Fn>
void for_each_settings_line(const std::string& file, std::istream& stdin_stream, const Fn& fn) {
  std::ifstream opened;
  if (file != "-") {
    // A directory opens as a stream whose reads fail: no lines, and exit 0, without this.
    if (fxp::train::is_directory(file)) throw std::invalid_argument(file + " is a directory, not a file of settings");
    opened.open(file);
    if (!opened) throw std::invalid_argument("cannot open " + file);
  }
  std::istream& in = file == "-" ? stdin_stream : opened;
  int64_t line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") != std::string::npos) fn(line, line_number);
  }
}

// --print-configs: one JSON line out per JSON line in (Note [Run names come from fxp-train]):
// {"run_name", "output_dir", "config", "fleet_group", "epoch_images" ({"train", "validation"}:
// TrainConfig::epoch_images, for scripts/sweep --estimate), "invalid" (only when a value is bad)},
// or {"error"} for a line that is not a JSON object.
int print_configs(const std::string& file, const fxp::train::TrainConfig& base, std::istream& stdin_stream,
                  std::ostream& out) {
  using nlohmann::json;
  for_each_settings_line(file, stdin_stream, [&](const std::string& line, int64_t line_number) {
    json result;
    try {
      const json settings = fxp::train::parse_json_strict(line, file + " line " + std::to_string(line_number));
      if (!settings.is_object()) throw std::invalid_argument("settings: expected a JSON object");
      // Each key alone, so that a bad value still leaves a named run (whose
      // "invalid" says why it would fail), as fxp-train -c would report it.
      fxp::train::TrainConfig c = base;
      std::string invalid;
      for (const auto& [key, value] : settings.items()) {
        try {
          fxp::train::apply_json(c, json{{key, value}}, "settings");
        } catch (const std::exception& e) {
          invalid += (invalid.empty() ? "" : "; ") + std::string(e.what());
        }
      }
      if (invalid.empty()) {
        try {
          c.validate();
        } catch (const std::exception& e) {
          invalid = e.what();
        }
      }
      json config = fxp::train::to_json(c);
      config["output_dir"] = fxp::train::output_dir_for(c);
      result = {{"run_name", c.run_name()}, {"output_dir", config["output_dir"]}, {"config", config}};
      // Runs of one fleet_group can train as one fleet (scripts/sweep --fleet); null: never.
      const auto group = fxp::train::fleet_group(c);
      result["fleet_group"] = group ? nlohmann::json(*group) : nlohmann::json(nullptr);
      const auto [train_images, val_images] = c.epoch_images();
      result["epoch_images"] = {{"train", train_images}, {"validation", val_images}};
      if (!invalid.empty()) result["invalid"] = invalid;
      // What the run does not read (Note [Settings without effect]): runs that differ only there are one run.
      json unread = json::array();
      for (const auto& [key, why] : c.unread_settings()) unread.push_back(key);
      result["unread"] = unread;
    } catch (const std::exception& e) {
      result = {{"error", e.what()}};
    }
    out << result.dump() << "\n";
  });
  return 0;
}

// --fleet: the members' settings, one JSON object per line over `base`.
std::vector<fxp::train::TrainConfig> fleet_configs(const std::string& file, const fxp::train::TrainConfig& base,
                                                   std::istream& stdin_stream) {
  std::vector<fxp::train::TrainConfig> members;
  for_each_settings_line(file, stdin_stream, [&](const std::string& line, int64_t line_number) {
    const std::string origin = file + " line " + std::to_string(line_number);
    nlohmann::json settings;
    try {
      settings = fxp::train::parse_json_strict(line, origin);  // a key given twice: an error naming the line
    } catch (const nlohmann::json::parse_error& e) {
      throw std::invalid_argument(origin + ": not JSON: " + e.what());
    }
    if (!settings.is_object()) throw std::invalid_argument(origin + ": expected a JSON object of settings");
    fxp::train::TrainConfig c = base;
    fxp::train::apply_json(c, settings, origin);
    try {
      c.validate();
    } catch (const std::exception& e) {
      throw std::invalid_argument(origin + ": " + e.what());
    }
    members.push_back(std::move(c));
  });
  if (members.empty()) throw std::invalid_argument(file + " holds no member settings");
  // run_fleet checks this too; here it is the usage error it is.
  if (const std::string why = fxp::train::fleet_incompatibility(members); !why.empty()) {
    throw std::invalid_argument(file + ": these runs cannot train as one fleet: " + why);
  }
  return members;
}

// The exit status of a mode whose output is what it is for (--print-config,
// --print-configs, --describe-model): a failed write (a full disk) is an
// error, not a success with the output lost. (A closed pipe ends the process
// with SIGPIPE first, as for any filter.)
int printed(int status) {
  std::cout.flush();
  if (std::cout) return status;
  std::cerr << "fxp-train: error: cannot write to standard output\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace fxp::train;
  // A write past the file-size limit then fails with EFBIG and takes the
  // error path of a full disk (atomic_write: the temporary file is removed,
  // the file it replaces kept), instead of killing the process.
  std::signal(SIGXFSZ, SIG_IGN);
  Command command;
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (auto code = parse_command_line(args, command, std::cout, std::cerr)) return *code;
    const TrainConfig& c = command.config;
    if (command.mode == Mode::PrintConfig) {
      auto config = to_json(c);
      config["output_dir"] = output_dir_for(c);
      std::cout << config.dump(2) << "\n";
      return printed(0);
    }
    if (command.mode == Mode::PrintConfigs) {
      int status = 0;
      try {
        status = print_configs(command.configs_file, c, std::cin, std::cout);
      } catch (const std::invalid_argument& e) {  // the file of settings itself: a usage error, as for --fleet
        std::cerr << "fxp-train: --print-configs " << e.what() << "\n";
        return 2;
      }
      return printed(status);
    }
    if (command.mode == Mode::DescribeModel) {
      const auto model = build_network(c);
      // AdaPT is counted at its start format (its layers' formats change as it trains).
      const bool adapt = c.method == "adapt";
      auto report = describe_model(model->describe(), c.method, c.update,
                                   c.inference_rounding, adapt ? c.adapt_start_bits : c.param_bits,
                                   adapt ? c.adapt_start_bits : c.out_bits, c.momentum > 0, c.batch_size);
      report["model"] = c.model;
      report["dataset"] = c.dataset;
      std::cout << (command.json ? report.dump(2) + "\n" : describe_model_text(report));
      return printed(0);
    }
    if (command.mode == Mode::Fleet) {
      std::vector<TrainConfig> members;
      try {
        members = fleet_configs(command.fleet_file, c, std::cin);
      } catch (const std::invalid_argument& e) {  // the members' settings: a usage error, as for -c
        std::cerr << "fxp-train: --fleet " << e.what() << "\n";
        return 2;
      }
      RunOptions options;
      options.resume = command.resume;
      options.overwrite = command.overwrite;
      options.progress = !command.quiet && !command.no_progress && isatty(STDERR_FILENO);
      options.log = command.quiet ? nullptr : &std::cout;
      if (!command.quiet) std::cout << "fxp-train: a fleet of " << members.size() << " runs\n";
      const auto summaries = run_fleet(members, options, FleetOptions{command.fleet_compact_below, command.fleet_chunk});
      if (!command.quiet) {
        for (const auto& s : summaries) std::cout << summary_text(s);
      }
      return 0;
    }
    // Note [One run across processes]: only rank 0 talks.
    const bool quiet = command.quiet || (c.distributed && process_place_from_environment().rank != 0);
    RunOptions options;
    options.resume = command.resume;
    options.overwrite = command.overwrite;
    options.progress = !quiet && !command.no_progress && isatty(STDERR_FILENO);
    options.log = quiet ? nullptr : &std::cout;
    if (!quiet) std::cout << "fxp-train " << c.run_name() << " -> " << output_dir_for(c) << "\n";
    const auto summary = run_training(c, options);
    if (!quiet) std::cout << summary_text(summary);
    return 0;
  } catch (const DirectoryBusy& e) {
    std::cerr << "fxp-train: error: " << e.what() << "\n";
    return kExitBusy;
  } catch (const std::exception& e) {
    // c10::Error carries a C++ backtrace after the first line in some builds; keep the message.
    std::string message = e.what();
    if (auto cut = message.find("\nException raised from"); cut != std::string::npos) message.resize(cut);
    std::cerr << "fxp-train: error: " << message << "\n";
    return 1;
  }
}
