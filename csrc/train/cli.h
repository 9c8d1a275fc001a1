// fxp-train's command line (CLI11): every config key as a flag, a config file,
// and the run modes. Flags override the config file, which overrides the defaults.
#pragma once

#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "train/config.h"

namespace fxp::train {

enum class Mode { Train, DescribeModel, PrintConfig, PrintConfigs, Fleet };

struct Command {
  TrainConfig config;
  Mode mode = Mode::Train;
  bool json = false;  // --describe-model: print JSON instead of text
  bool resume = false, overwrite = false, quiet = false, no_progress = false;
  std::string configs_file;  // --print-configs: JSON lines of settings ("-": stdin)
  std::string fleet_file;    // --fleet: JSON lines of settings, one member per line ("-": stdin)
  double fleet_compact_below = 0.75;  // --fleet-compact-below (train/fleet.h)
  int64_t fleet_chunk = 0;            // --fleet-chunk (train/fleet.h; 0: the trainer's choice)
};

// Parses argv. Returns the exit code when the program should stop (0 after
// --help or --version, 2 after a usage error, with the message written to
// `out`/`err`), or nullopt with `command` filled in.
std::optional<int> parse_command_line(const std::vector<std::string>& args, Command& command, std::ostream& out,
                                      std::ostream& err);

}  // namespace fxp::train
