#include "train/resume.h"

#include <stdexcept>

#include "train/checkpoint.h"
#include "train/config.h"
#include "train/io.h"

namespace fxp::train {

using nlohmann::json;

namespace {

// A finished run's summary.json, or an error that names it.
json read_summary(const std::string& path) {
  json summary;
  try {
    summary = json::parse(read_text(path));
  } catch (const json::exception& e) {
    throw std::invalid_argument(path + " is not valid JSON (" + e.what() + "); --overwrite replaces the run");
  }
  if (!summary.is_object() || !summary.contains("config") || !summary["config"].is_object()) {
    throw std::invalid_argument(path + " is not a run summary (a JSON object with a \"config\" object); "
                                "--overwrite replaces the run");
  }
  return summary;
}

}  // namespace

RunStart decide_start(const RunFiles& files, const json& settings, const RunOptions& options) {
  const bool have_checkpoint = path_exists(files.checkpoint);
  if (options.overwrite) {
    for (const auto& f : {files.checkpoint, files.summary, files.metrics, files.config, files.msq_export}) {
      remove_file(f);
    }
    return {};
  }
  if (path_exists(files.summary)) {
    json summary = read_summary(files.summary);
    // Finished with these very settings: nothing to train, with or without
    // --resume (a requeued job resumes what may have finished).
    if (differing_settings(summary["config"], settings, /*epochs_may_differ=*/false).empty()) {
      if (options.log) *options.log << files.dir << " already holds this finished run; --overwrite trains it again\n";
      return {false, summary};
    }
  }
  if (!options.resume && path_exists(files.summary)) {
    throw std::invalid_argument("output directory " + files.dir +
                                " holds a finished run with other settings; pass --resume to extend it to more epochs, "
                                "--overwrite to replace it, or choose another --output-dir");
  }
  if (!options.resume && have_checkpoint) {
    throw std::invalid_argument("output directory " + files.dir +
                                " holds an unfinished run; pass --resume to continue it or --overwrite to start again");
  }
  if (!have_checkpoint) return {};  // --resume without a checkpoint starts the run
  // The checkpoint's own record of its settings decides: config.json may be gone, or edited.
  const json stored = checkpoint_settings(files.checkpoint);
  const std::string differ = differing_settings(stored, settings, /*epochs_may_differ=*/true);
  if (!differ.empty()) {
    throw std::invalid_argument("cannot resume from " + files.checkpoint + ": it was written with other settings: " +
                                differ);
  }
  if (path_exists(files.summary)) {
    // A finished run that --resume cannot extend: it would train nothing, yet rewrite its files with the new epochs.
    const json summary = read_summary(files.summary);
    const json done = summary.value("epochs_completed", json()), reason = summary.value("stop_reason", json());
    if (reason.is_string() && reason != "epochs") {
      throw std::invalid_argument("output directory " + files.dir + " holds a run that stopped (" +
                                  reason.get<std::string>() + ") after " + done.dump() +
                                  " epochs; more epochs would train nothing. --overwrite trains it again");
    }
    if (done.is_number_integer() && settings.value("epochs", json()).is_number_integer() &&
        settings["epochs"].get<int64_t>() <= done.get<int64_t>()) {
      throw std::invalid_argument("output directory " + files.dir + " holds a run finished after " + done.dump() +
                                  " epochs; --resume extends it only to more epochs, but epochs is " +
                                  settings["epochs"].dump());
    }
  }
  if (options.log && stored.value("world_size", json(1)) != settings.value("world_size", json(1))) {
    *options.log << "note: resuming with " << settings.value("world_size", json(1)) << " processes instead of "
                 << stored.value("world_size", json(1))
                 << "; the shares and their draws change, so the result differs from an uninterrupted run\n";
  }
  if (options.log && stored.value("threads", json()) != settings["threads"]) {
    *options.log << "note: resuming with threads " << settings["threads"] << " instead of " << stored["threads"]
                 << "; the result may differ in the last bits from an uninterrupted run\n";
  }
  return {true, std::nullopt};
}

}  // namespace fxp::train
