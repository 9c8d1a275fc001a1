// fxp-train: see `fxp-train --help` and docs/train.md.
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <iostream>

#include "nn/modules.h"
#include "train/bookkeeping.h"
#include "train/cli.h"
#include "train/io.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  using namespace fxp::train;
  Command command;
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (auto code = parse_command_line(args, command, std::cout, std::cerr)) return *code;
    const TrainConfig& c = command.config;
    if (command.mode == Mode::PrintConfig) {
      auto config = to_json(c);
      config["output_dir"] = output_dir_for(c);
      std::cout << config.dump(2) << "\n";
      return 0;
    }
    if (command.mode == Mode::DescribeModel) {
      fxp::nn::QuantConfig qc;
      qc.weight_mode = fxp::nn::weight_mode_for(c.method);
      fxp::nn::PaperCNN model(qc);
      const auto report = describe_model(model->describe(), c.method, c.inference_rounding, c.param_bits, c.out_bits,
                                         c.momentum > 0, c.batch_size);
      std::cout << (command.json ? report.dump(2) + "\n" : describe_model_text(report));
      return 0;
    }
    RunOptions options;
    options.resume = command.resume;
    options.overwrite = command.overwrite;
    options.progress = !command.quiet && !command.no_progress && isatty(STDERR_FILENO);
    options.log = command.quiet ? nullptr : &std::cout;
    if (!command.quiet) std::cout << "fxp-train " << c.run_name() << " -> " << output_dir_for(c) << "\n";
    const auto summary = run_training(c, options);
    if (!command.quiet) std::cout << summary_text(summary);
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
