#include "train/resume.h"

#include <optional>
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

// What --resume would refuse in a run of `stored` settings that has done
// `done` epochs (Note [Resume adds epochs]): the settings a resume may not
// change, and fewer epochs than done. decide_start's hints offer --resume
// only where this finds nothing, so they name what --resume would take.
struct ResumeRefusal {
  std::string differ;     // the differing settings ("" if none)
  bool fewer_epochs = false;
  bool any() const { return !differ.empty() || fewer_epochs; }
};

ResumeRefusal resume_refusal(const json& stored, int64_t done, const json& settings) {
  const json epochs = settings.value("epochs", json());
  return {differing_settings(stored, settings, /*epochs_may_differ=*/true),
          epochs.is_number_integer() && epochs.get<int64_t>() < done};
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
  // A finished run's summary, read once.
  const std::optional<json> summary =
      path_exists(files.summary) ? std::optional<json>(read_summary(files.summary)) : std::nullopt;
  // Finished with these very settings: nothing to train, with or without
  // --resume (a requeued job resumes what may have finished).
  if (summary && differing_settings((*summary)["config"], settings, /*epochs_may_differ=*/false).empty()) {
    if (options.log) *options.log << files.dir << " already holds this finished run; --overwrite trains it again\n";
    json found = *summary;
    found["config"]["output_dir"] = files.dir;  // where it lies now: a copied or moved run names its new place
    return {false, std::move(found)};
  }
  // --resume is offered only where it would be accepted (resume_refusal, below).
  if (!options.resume && summary) {
    const std::string differ = differing_settings((*summary)["config"], settings, /*epochs_may_differ=*/false);
    const json completed = summary->value("epochs_completed", json());
    const bool resumable = summary->value("stop_reason", json("epochs")) == "epochs" && completed.is_number_integer() &&
                           !resume_refusal((*summary)["config"], completed.get<int64_t>(), settings).any();
    throw std::invalid_argument("output directory " + files.dir + " holds a finished run with other settings (" +
                                differ + "); " +
                                (resumable ? "pass --resume to extend it to more epochs, --overwrite to replace it, "
                                           : "pass --overwrite to replace it ") +
                                "or choose another --output-dir");
  }
  if (!options.resume && have_checkpoint) {
    std::string why_not;  // why --resume would be refused
    try {
      const CheckpointRecord record = checkpoint_record(files.checkpoint);
      const ResumeRefusal refusal = resume_refusal(record.settings, record.epochs_done, settings);
      if (!refusal.differ.empty()) {
        why_not = " with other settings (" + refusal.differ + ")";
      } else if (refusal.fewer_epochs) {
        why_not = " that has done " + std::to_string(record.epochs_done) + " epochs, more than epochs " +
                  settings["epochs"].dump();
      }
    } catch (const std::exception&) {  // an unreadable checkpoint: --resume names what is wrong with it
    }
    throw std::invalid_argument(
        "output directory " + files.dir + " holds an unfinished run" +
        (why_not.empty() ? "; pass --resume to continue it or --overwrite to start again"
                         : why_not + "; pass --overwrite to start again or choose another --output-dir"));
  }
  if (!have_checkpoint) return {};  // --resume without a checkpoint starts the run
  // The checkpoint's own record of its settings decides: config.json may be gone, or edited.
  const CheckpointRecord record = checkpoint_record(files.checkpoint);
  const json& stored = record.settings;
  const ResumeRefusal refusal = resume_refusal(stored, record.epochs_done, settings);
  if (!refusal.differ.empty()) {
    throw std::invalid_argument("cannot resume from " + files.checkpoint + ": it was written with other settings: " +
                                refusal.differ);
  }
  // Note [Resume adds epochs]: resuming to fewer epochs than the checkpoint has
  // done would train nothing, yet rewrite the run's files (and a sweep would
  // then take it for a run of that many epochs); a run that stopped early (early
  // stopping, a non-finite loss) would train nothing either. The first is
  // refused; the second is finished as it is, so that a fleet's other members
  // still go on to their new epochs.
  if (refusal.fewer_epochs) {
    throw std::invalid_argument("cannot resume from " + files.checkpoint + ": the run has done " +
                                std::to_string(record.epochs_done) + " epochs, more than epochs " +
                                settings["epochs"].dump() + " (--resume adds epochs; --overwrite trains it again)");
  }
  const json reason = summary ? summary->value("stop_reason", json()) : json();
  if (reason.is_string() && reason != "epochs") {
    if (options.log) {
      *options.log << files.dir << " holds a run that stopped (" << reason.get<std::string>() << ") after "
                   << record.epochs_done << " epochs; more epochs would train nothing, so it stays as it is\n";
    }
    return {false, *summary};
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
