// run_training: one run of the paper's experiments, epoch by epoch. Each step
// lives in its own file: resume.cpp (how the run starts), setup.cpp (data,
// model, optimizer), epoch.cpp (training), validate.cpp (validation and
// per-layer statistics), schedule.cpp (lr, early stopping), checkpoint.cpp,
// summary.cpp.
#include <c10/core/DeviceGuard.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <set>
#include <stdexcept>

#include "train/checkpoint.h"
#include "train/distributed.h"
#include "train/epoch.h"
#include "train/export.h"
#include "train/io.h"
#include "train/resume.h"
#include "train/schedule.h"
#include "train/setup.h"
#include "train/summary.h"
#include "train/trainer.h"
#include "train/validate.h"

namespace fxp::train {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

torch::Device parse_device(const std::string& name) {
  torch::Device device(name);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw std::invalid_argument("device " + name + " was requested, but no CUDA device is available" +
#if defined(FXP_WITH_CUDA)
                                std::string("")
#else
                                std::string(" (and this fxp build has no CUDA kernels)")
#endif
    );
  }
  return device;
}

// AdaPT's per-layer state at the end of an epoch (docs/adapt.md): each
// layer's format, lookback, resolution, switches so far, the gradient
// diversity and PD's minimum at its last switch, and its sparsity.
json adapt_record(const adapt::Controller& controller) {
  json layers = json::array();
  for (const auto& l : controller.layers()) {
    layers.push_back({{"name", l.name},
                      {"bits", l.format.bits},
                      {"frac", l.format.frac},
                      {"lookback", l.lookback},
                      {"resolution", l.resolution},
                      {"switches", l.switches},
                      {"gradient_diversity", l.switches ? json(l.gradient_diversity) : json(nullptr)},
                      {"min_bits", l.minimum.bits},
                      {"min_frac", l.minimum.frac},
                      {"parameters", l.work.parameters},
                      {"sparsity", controller.sparsity(l)},
                      // Cumulative: the word length weighted by samples, for mean bit widths per epoch.
                      {"samples", l.work.samples},
                      {"bit_samples", l.work.dense_units * 32}});
  }
  const auto work = controller.work();
  const adapt::TrainingCost cost = adapt::training_cost(work, controller.options().l1 > 0);
  return {{"strategy", adapt::to_string(controller.strategy())},
          {"layers", layers},
          {"performance",
           {{"cost", cost.adapt},
            {"float32_cost", cost.float32},
            {"training_speedup", cost.speedup()},
            {"model_size", adapt::model_size_ratio(work)},
            {"inference_speedup", adapt::inference_speedup(work)}}}};
}

// MSQ's per-layer state at the end of an epoch: width, LSB sparsity now,
// Hessian trace at the last check, scale; the compression rate.
json msq_record(const msq::Controller& controller) {
  json layers = json::array();
  for (const msq::MsqLayerRecord& r : controller.records()) {
    layers.push_back({{"name", r.name},
                      {"bits", r.bits},
                      {"weights", r.weights},
                      {"lsb_sparsity", r.lsb_sparsity},
                      {"check_sparsity", r.check_sparsity},
                      {"hessian_trace", r.hessian_trace},
                      {"scale", r.scale}});
  }
  return {{"layers", layers}, {"compression_rate", controller.compression_rate()}, {"frozen", controller.frozen()}};
}

// Note [One run across processes]
// fxp-train --distributed runs one process per device (torchrun or srun
// start them with the same arguments). Rank 0 alone owns the output
// directory: it takes the lock, decides whether the run starts, resumes or is
// already finished, and publishes that decision, with its settings, in the
// rendezvous store; the other ranks check their settings against rank 0's and
// answer, and all start or all stop with the reason (start_together). Every
// rank loads the data and builds the same model from the seed; a resumed run
// reads the checkpoint on every rank (the output directory must be on a file
// system all nodes share). Before the first step every rank compares its
// parameters, buffers and optimizer state, its epochs done and lr, and its
// splits' checksums, bit for bit with rank 0's. No parameter is broadcast,
// then or later: Note [Data-parallel steps] (epoch.cpp) keeps the replicas
// identical, and after every epoch the same comparison (with a hash of the
// state that steers the next epochs: lr, early stopping, AdaPT's formats,
// MSQ's widths) stops the run naming any tensor that differs. Each rank
// validates its share of the test split, and the figures are summed (Note
// [Sharded validation], validate.cpp); rank 0 writes metrics, checkpoints and
// the summary.
constexpr std::chrono::minutes kDistributedTimeout{30};  // torch.distributed's default

// What must be identical on every rank, named: parameters, buffers, the
// optimizer's state, and a hash of `host_state` (what `host_label` says it is).
std::vector<std::pair<std::string, torch::Tensor>> replica_state(const Training& t, const torch::Device& device,
                                                                 const std::string& host_label,
                                                                 const std::string& host_state) {
  std::vector<std::pair<std::string, torch::Tensor>> named;
  // A packed parameter is a placeholder: its codes, a buffer, hold its value.
  std::set<const c10::TensorImpl*> placeholders;
  for (const auto& p : t.model->packed_storage()) placeholders.insert(p.parameter.unsafeGetTensorImpl());
  for (const auto& item : t.model->named_parameters()) {
    if (!placeholders.count(item.value().unsafeGetTensorImpl())) {
      named.emplace_back("parameter " + item.key(), item.value());
    }
  }
  for (const auto& item : t.model->named_buffers()) named.emplace_back("buffer " + item.key(), item.value());
  for (auto& entry : named_optimizer_state(t)) named.push_back(std::move(entry));
  const auto hash = static_cast<int64_t>(std::hash<std::string>{}(host_state));
  named.emplace_back(host_label, torch::full({1}, hash, torch::dtype(torch::kLong).device(device)));
  return named;
}

// A split's size and checksums, for ranks to compare what they read.
json split_fingerprint(const Split& s) {
  const torch::Tensor labels = s.labels.to(torch::kLong);
  const torch::Tensor positions = torch::arange(s.size(), labels.options());
  return {{"images", s.size()},
          {"label_sum", labels.sum().item<int64_t>()},
          {"label_positions", labels.mul(positions).sum().item<int64_t>()},
          {"pixel_sum", s.images.sum().item<double>()}};
}

std::string name_list(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

// Note [One run across processes]: rank 0 decides how the run starts and
// publishes it; every other rank checks its settings against rank 0's and
// answers; rank 0 then publishes "go", or the first problem, which every rank
// that answered stops with. A rank that stops waits (up to kAnswerWait) for
// the others to read why before its store goes away.
constexpr std::chrono::seconds kAnswerWait{60};

void wait_for_each(ProcessGroup& group, const std::string& key_prefix, const std::vector<int64_t>& ranks) {
  for (const int64_t r : ranks) group.wait_for(key_prefix + std::to_string(r), kAnswerWait);
}

RunStart start_together(const RunFiles& files, const json& settings, const RunOptions& options, ProcessGroup* group,
                        const torch::Device& device, std::optional<DirectoryLock>& lock) {
  RunStart start;
  std::vector<int64_t> others;
  for (int64_t r = 1; group && r < group->size(); ++r) others.push_back(r);
  if (!group || group->rank() == 0) {
    try {
      make_dirs(files.dir);
      lock.emplace(files.dir);                        // Note [Run directory lock]
      start = decide_start(files, settings, options);  // Note [Resume]
      if (!start.finished) atomic_write(files.config, settings.dump(2) + "\n");
    } catch (const std::exception& e) {
      if (group) {
        group->publish("start", json{{"error", e.what()}}.dump());
        wait_for_each(*group, "answer", others);
      }
      throw;
    }
    if (!group) return start;
    group->publish("start", json{{"settings", settings},
                                 {"threads", at::get_num_threads()},
                                 {"resume", start.resume},
                                 {"finished", start.finished ? *start.finished : json(nullptr)}}
                                .dump());
    std::string problem;
    std::vector<int64_t> waiting;  // the ranks that answered "ok" wait for "go"
    for (const int64_t r : others) {
      const std::string answer = group->wait_for("answer" + std::to_string(r));
      if (answer == "ok") {
        waiting.push_back(r);
      } else if (problem.empty()) {
        problem = "rank " + std::to_string(r) + " " + answer;
      }
    }
    group->publish("go", problem.empty() ? "ok" : problem);
    if (!problem.empty()) {
      wait_for_each(*group, "read_go", waiting);
      throw std::runtime_error("distributed: " + problem);
    }
    return start;
  }
  const std::string rank = std::to_string(group->rank());
  const json published = json::parse(group->wait_for("start"));
  if (published.contains("error")) {
    group->publish("answer" + rank, "stopped");
    throw std::runtime_error("distributed: rank 0 stopped: " + published["error"].get<std::string>());
  }
  std::string differ = differing_settings(published["settings"], settings, /*epochs_may_differ=*/false);
  if (device.is_cpu() && published["threads"] != at::get_num_threads()) {
    // The steps would still agree, but AdaPT's and MSQ's decisions sum on each rank.
    differ += (differ.empty() ? "" : ", ") + std::string("CPU threads (") + published["threads"].dump() +
              " on rank 0, " + std::to_string(at::get_num_threads()) + " here; set --threads on every rank)";
  }
  if (!differ.empty()) {
    const std::string problem = "was started with other settings than rank 0 (\"in the run\" is rank 0's): " + differ;
    group->publish("answer" + rank, problem);
    throw std::invalid_argument("distributed: rank " + rank + " " + problem);
  }
  group->publish("answer" + rank, "ok");
  const std::string go = group->wait_for("go");
  group->publish("read_go" + rank, "");
  if (go != "ok") throw std::runtime_error("distributed: stopping with rank 0, because " + go);
  start.resume = published["resume"].get<bool>();
  if (!published["finished"].is_null()) start.finished = published["finished"];
  return start;
}

// After an error on this rank, stops the process group's pending work.
class AbortOnError {
 public:
  explicit AbortOnError(ProcessGroup* group) : group_(group), exceptions_(std::uncaught_exceptions()) {}
  AbortOnError(const AbortOnError&) = delete;
  AbortOnError& operator=(const AbortOnError&) = delete;
  ~AbortOnError() {
    if (group_ && std::uncaught_exceptions() > exceptions_) group_->abort();
  }

 private:
  ProcessGroup* group_;
  int exceptions_;
};

}  // namespace

RunFiles::RunFiles(const std::string& d)
    : dir(d), config(join_path(d, "config.json")), metrics(join_path(d, "metrics.jsonl")),
      summary(join_path(d, "summary.json")), checkpoint(join_path(d, "checkpoint.pt")),
      msq_export(join_path(d, "model.msq")) {}

std::string output_dir_for(const TrainConfig& config) {
  return config.output_dir.empty() ? join_path("results", config.run_name()) : config.output_dir;
}

json run_training(const TrainConfig& config, const RunOptions& given_options) {
  const auto session_start = Clock::now();
  config.validate();
  // Note [One run across processes]: rank 0 writes; the others stay silent.
  std::optional<ProcessPlace> place;
  if (config.distributed) place = process_place_from_environment();
  const bool writer = !place || place->rank == 0;
  RunOptions options = given_options;
  if (!writer) options.progress = false, options.log = nullptr;
  torch::Device device = parse_device(config.device);
  if (place) {
    if (config.batch_size < place->world_size) {
      throw std::invalid_argument("distributed: batch_size " + std::to_string(config.batch_size) +
                                  " is smaller than the " + std::to_string(place->world_size) +
                                  " processes; each needs a share of every full batch");
    }
    if (device.is_cuda() && !device.has_index()) {
      // One GPU per rank: LOCAL_RANK's, or the only one a rank sees (SLURM's per-task binding).
      const int64_t visible = torch::cuda::device_count();
      const int64_t index = visible == 1 ? 0 : place->local_rank;
      if (index >= visible) {
        throw std::invalid_argument("distributed: local rank " + std::to_string(place->local_rank) + " has no GPU: " +
                                    std::to_string(visible) + " are visible; start one process per GPU");
      }
      device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
    }
  }
  // The run's GPU is the current device for the whole run, so what defaults to
  // the current device (a CUDA generator, a stream) is the run's.
  const c10::OptionalDeviceGuard device_guard(device.is_cuda() ? std::optional(device) : std::nullopt);
  if (device.is_cpu()) install_cpu_memory_tracking(), keep_freed_cpu_memory();
  if (config.threads > 0) at::set_num_threads(static_cast<int>(config.threads));
  // Reproducible GPU runs: deterministic cuDNN algorithms, no autotuning (a
  // small cost for this network).
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setBenchmarkCuDNN(false);
  std::shared_ptr<ProcessGroup> group;
  if (place) group = ProcessGroup::join(*place, device, kDistributedTimeout);
  const AbortOnError abort_on_error(group.get());
  const RunFiles files(output_dir_for(config));
  json settings = to_json(config);
  settings["output_dir"] = files.dir;
  if (group) settings["world_size"] = group->size();  // not a setting: may change on --resume, with a note
  std::optional<DirectoryLock> lock;
  const RunStart start = start_together(files, settings, options, group.get(), device, lock);
  if (start.finished) return *start.finished;

  const Split train = load_split(config, /*train=*/true, config.train_limit, device);
  const Split val = load_split(config, /*train=*/false, config.val_limit, device);
  Training training = set_up_training(config, device, start.resume);
  training.data_parallel = group;
  if (options.log) log_settings_notes(*options.log, config, *training.model);
  RunState state;
  state.lr = config.initial_lr();
  if (start.resume) {
    if (!writer && !path_exists(files.checkpoint)) {
      throw std::runtime_error("distributed: rank " + std::to_string(place->rank) + " cannot read " +
                               files.checkpoint + ", which rank 0 resumes from: every rank reads the checkpoint, so "
                               "the output directory must be on a file system all nodes share");
    }
    state = load_checkpoint(files.checkpoint, *training.model, *training.optimizer, training.adapt.get(), device,
                            training.msq.get());
    set_lr(*training.optimizer, state.lr);
    if (options.log) *options.log << "resuming " << files.dir << " after epoch " << state.epochs_done << "\n";
  }
  if (group) {  // Note [One run across processes]: every rank starts from the same state and data
    const json host_state = {{"epochs_done", state.epochs_done}, {"lr", state.lr},
                             {"stop_reason", state.stop_reason}, {"train", split_fingerprint(train)},
                             {"val", split_fingerprint(val)}};
    const auto differ = replica_differences(
        *group, replica_state(training, device, "the run's state and data (epochs done, lr, the splits' checksums)",
                              host_state.dump()));
    if (!differ.empty()) {
      throw std::runtime_error("distributed: before training, these differ from rank 0's: " + name_list(differ) +
                               " (do all ranks read the same data, and resume from the same checkpoint, on a file "
                               "system all nodes share?)");
    }
  }

  std::optional<StepMemory> step_memory;  // measured on the session's first training step
  int64_t replicated_tensors = 0;         // distributed: what the last replica check compared
  while (state.stop_reason.empty() && state.epochs_done < config.epochs) {
    const int64_t epoch = state.epochs_done + 1;
    const auto epoch_start = Clock::now();
    const EpochResult trained = train_epoch(training, train, config, epoch, device, step_memory, options);
    const double train_time = seconds_since(epoch_start);
    if (std::isfinite(trained.loss)) msq_end_epoch(training, train, config, epoch);  // a diverged run is not pruned
    recalibrate_batch_norm(training, train, config, epoch);
    const Validation validation = validate(training, val, config, device);
    const LayerStatistics statistics = layer_statistics(training, config, trained);
    const double lr = state.lr;
    end_epoch(state, config, epoch, trained.loss, validation.loss, validation.accuracy);
    set_lr(*training.optimizer, state.lr);

    const double epoch_time = seconds_since(epoch_start);
    state.history.push_back(
        epoch_record(epoch, trained, validation, statistics, lr, epoch_time, train_time, train.size()));
    if (training.adapt) state.history.back()["adapt"] = adapt_record(*training.adapt);
    if (training.msq) state.history.back()["msq"] = msq_record(*training.msq);
    state.wall_time_s += epoch_time;
    if (group) {
      // What steers the next epochs; not the validation's figures, which only rank 0 reports.
      const json& record = state.history.back();
      const json host_state = {{"stop_reason", state.stop_reason},     {"lr", state.lr},
                               {"train_loss", record["train_loss"]},    {"adapt", record.value("adapt", json())},
                               {"msq", record.value("msq", json())}};
      const auto replicated = replica_state(
          training, device, "the host's state (lr, early stopping, AdaPT's formats, MSQ's widths)", host_state.dump());
      replicated_tensors = static_cast<int64_t>(replicated.size());
      const auto differ = replica_differences(*group, replicated);
      if (!differ.empty()) {
        throw std::runtime_error("distributed: after epoch " + std::to_string(epoch) +
                                 " the replicas are no longer identical; these differ from rank 0's: " +
                                 name_list(differ) + " (a bug: please report it with the command line)");
      }
    }
    if (writer) {
      std::string lines;
      for (const auto& r : state.history) lines += r.dump() + "\n";
      save_checkpoint(files.checkpoint, *training.model, *training.optimizer, training.adapt.get(), state, settings,
                      device, training.msq.get());
      atomic_write(files.metrics, lines);
    }
    if (options.log) log_epoch(*options.log, state.history.back(), config);
  }
  if (state.stop_reason.empty()) state.stop_reason = "epochs";

  json summary = make_summary({config, settings, state, training, train.size(), val.size(), device, step_memory,
                               seconds_since(session_start)});
  if (group) {
    summary["distributed"] = {{"world_size", group->size()},
                              {"backend", group->backend()},
                              {"replicas_identical_after_every_epoch", true},
                              {"tensors_compared_per_epoch", replicated_tensors}};
  }
  if (!writer) return summary;
  if (training.msq && training.msq->weights_finite()) {
    // The trained model at its true size (Note [MSQ export format]); a diverged run has none.
    const ExportSizes sizes = export_msq_model(*training.msq, *training.model, files.msq_export);
    summary["msq"]["export"] = {{"path", files.msq_export},
                                {"bytes", sizes.file_bytes},
                                {"model_bytes", sizes.model_bytes},
                                {"measured_compression", static_cast<double>(sizes.model_bytes) /
                                                             static_cast<double>(sizes.file_bytes)}};
  }
  atomic_write(files.summary, summary.dump(2) + "\n");
  return summary;
}

}  // namespace fxp::train
