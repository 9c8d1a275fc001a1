// run_training: one run of the paper's experiments, epoch by epoch. Each step
// lives in its own file: resume.cpp (how the run starts), setup.cpp (data,
// model, optimizer), epoch.cpp (training), validate.cpp (validation and
// per-layer statistics), schedule.cpp (lr, early stopping), checkpoint.cpp,
// summary.cpp.
#include <torch/cuda.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "train/checkpoint.h"
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

// The epoch's line of metrics.jsonl (docs/train.md).
json epoch_record(int64_t epoch, const EpochResult& trained, const Validation& v, const LayerStatistics& stats,
                  double lr, double epoch_time, double train_time, int64_t train_images) {
  return {{"epoch", epoch},
          {"train_loss", std::isfinite(trained.loss) ? json(trained.loss) : json(nullptr)},
          {"val_loss", std::isfinite(v.loss) ? json(v.loss) : json(nullptr)},
          {"val_accuracy", v.accuracy},
          {"lr", lr},
          {"epoch_time_s", epoch_time},
          {"train_time_s", train_time},
          {"images_per_s", static_cast<double>(train_images) / train_time},
          {"cuda_graph_steps", trained.graph_steps},
          {"layers", stats.layers},
          {"vanished_update_fraction", stats.vanished_fraction}};
}

void log_epoch(std::ostream& log, const json& e, int64_t epochs) {
  char line[256];
  std::snprintf(line, sizeof line,
                "epoch %3lld/%lld  train loss %.4f  val loss %.4f  val acc %6.2f%%  lr %.3g  %.1f s  %.0f img/s\n",
                static_cast<long long>(e["epoch"].get<int64_t>()), static_cast<long long>(epochs),
                e["train_loss"].is_null() ? NAN : e["train_loss"].get<double>(),
                e["val_loss"].is_null() ? NAN : e["val_loss"].get<double>(), 100.0 * e["val_accuracy"].get<double>(),
                e["lr"].get<double>(), e["epoch_time_s"].get<double>(), e["images_per_s"].get<double>());
  log << line << std::flush;
}

}  // namespace

RunFiles::RunFiles(const std::string& d)
    : dir(d), config(join_path(d, "config.json")), metrics(join_path(d, "metrics.jsonl")),
      summary(join_path(d, "summary.json")), checkpoint(join_path(d, "checkpoint.pt")),
      msq_export(join_path(d, "model.msq")) {}

std::string output_dir_for(const TrainConfig& config) {
  return config.output_dir.empty() ? join_path("results", config.run_name()) : config.output_dir;
}

json run_training(const TrainConfig& config, const RunOptions& options) {
  const auto session_start = Clock::now();
  config.validate();
  const torch::Device device = parse_device(config.device);
  if (device.is_cpu()) install_cpu_memory_tracking();
  if (config.threads > 0) at::set_num_threads(static_cast<int>(config.threads));
  // Reproducible GPU runs: deterministic cuDNN algorithms, no autotuning (a
  // small cost for this network).
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setBenchmarkCuDNN(false);
  const RunFiles files(output_dir_for(config));
  make_dirs(files.dir);
  const DirectoryLock lock(files.dir);  // Note [Run directory lock]

  json settings = to_json(config);
  settings["output_dir"] = files.dir;
  const RunStart start = decide_start(files, settings, options);  // Note [Resume]
  if (start.finished) return *start.finished;
  atomic_write(files.config, settings.dump(2) + "\n");

  const Split train = load_split(config, /*train=*/true, config.train_limit, device);
  const Split val = load_split(config, /*train=*/false, config.val_limit, device);
  Training training = set_up_training(config, device, start.resume);
  if (options.log && config.method != "fp32" && config.bn_recalibration_batches == 0 &&
      training.model->has_batch_norm()) {
    *options.log << "note: batch norm's running statistics trail the parameters, and with quantized layers "
                    "validation can understate accuracy by far; --bn-recalibration-batches 10 recomputes them "
                    "before each validation (docs/train.md)\n";
  }
  RunState state;
  state.lr = config.initial_lr();
  if (start.resume) {
    state = load_checkpoint(files.checkpoint, *training.model, *training.optimizer, training.adapt.get(), device,
                            training.msq.get());
    set_lr(*training.optimizer, state.lr);
    if (options.log) *options.log << "resuming " << files.dir << " after epoch " << state.epochs_done << "\n";
  }

  std::optional<StepMemory> step_memory;  // measured on the session's first training step
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
    std::string lines;
    for (const auto& r : state.history) lines += r.dump() + "\n";
    save_checkpoint(files.checkpoint, *training.model, *training.optimizer, training.adapt.get(), state, settings,
                    device, training.msq.get());
    atomic_write(files.metrics, lines);
    if (options.log) log_epoch(*options.log, state.history.back(), config.epochs);
  }
  if (state.stop_reason.empty()) state.stop_reason = "epochs";

  json summary = make_summary({config, settings, state, training, train.size(), val.size(), device, step_memory,
                               seconds_since(session_start)});
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
