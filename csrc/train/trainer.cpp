#include "train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "data/idx.h"
#include "nn/modules.h"
#include "ops.h"
#include "optim/qpu_sgd.h"
#include "train/bookkeeping.h"
#include "train/io.h"
#include "train/memory.h"
#include "train/progress.h"

namespace fxp::train {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr double kNone = std::numeric_limits<double>::max();  // "no best value yet"

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Split {
  torch::Tensor images;  // float32 [n, 1, 28, 28], normalized, on the training device
  torch::Tensor labels;  // int64 [n]
  int64_t size() const { return labels.size(0); }
};

Split load_split(const TrainConfig& c, const std::string& split, int64_t limit, const torch::Device& device) {
  data::MnistSplit s = data::read_mnist_split(c.data_dir, split);
  const int64_t n = s.labels.size(0);
  if (limit > n) {
    throw std::invalid_argument((split == "train" ? "train_limit " : "val_limit ") + std::to_string(limit) +
                                " is larger than the " + std::to_string(n) + " images of " + c.data_dir + " (" +
                                split + ")");
  }
  if (limit > 0) {
    s.images = s.images.narrow(0, 0, limit);
    s.labels = s.labels.narrow(0, 0, limit);
  }
  torch::Tensor x = s.images.to(torch::kFloat32).div_(255.0f);
  x = x.sub_(static_cast<float>(c.normalize_mean)).div_(static_cast<float>(c.normalize_std)).unsqueeze(1);
  return {x.to(device).contiguous(), s.labels.to(device)};
}

// Note [Shuffling]: the order of epoch e is randperm from a generator seeded
// with mix(seed, e) alone, so a resumed run shuffles exactly as an
// uninterrupted one, without checkpointing a generator.
uint64_t mix(uint64_t seed, uint64_t epoch) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + epoch + 0x632BE59BD9B4E019ull;  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

torch::Tensor epoch_order(int64_t seed, int64_t epoch, int64_t n, const torch::Device& device) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(mix(static_cast<uint64_t>(seed), epoch));
  return torch::randperm(n, generator, torch::kLong).to(device);
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const TrainConfig& c, nn::PaperCNN& model) {
  const double lr = c.initial_lr();
  if (is_qpu(c.method)) {
    return std::make_unique<optim::QpuSgd>(
        model->parameters(), optim::QpuSgdOptions(lr)
                                 .momentum(c.momentum)
                                 .weight_decay(c.weight_decay)
                                 .total_bits(c.param_bits)
                                 .frac_bits(c.param_frac)
                                 .rounding(update_rounding(c.method))
                                 .momentum_form(c.momentum_form)
                                 .seed(c.seed));
  }
  return std::make_unique<torch::optim::SGD>(
      model->parameters(), torch::optim::SGDOptions(lr).momentum(c.momentum).weight_decay(c.weight_decay));
}

void set_lr(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

// The layer a parameter belongs to: "conv1.conv.weight" -> "conv1".
std::string layer_of(const std::string& parameter_name) { return parameter_name.substr(0, parameter_name.find('.')); }

// The scheduler, early stopping and best-so-far bookkeeping: everything besides
// tensors that a checkpoint must restore.
struct RunState {
  int64_t epochs_done = 0;
  double lr = 0;
  double plateau_best = kNone;
  int64_t plateau_bad = 0;
  double stop_best_loss = kNone;  // early stopping's best loss (its best accuracy is best_accuracy)
  int64_t stop_bad = 0;
  double best_accuracy = -1;
  int64_t best_epoch = 0;
  double wall_time_s = 0;
  std::string stop_reason;  // empty while the run may go on
  json history = json::array();
};
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(RunState, epochs_done, lr, plateau_best, plateau_bad, stop_best_loss,
                                   stop_bad, best_accuracy, best_epoch, wall_time_s, stop_reason,
                                   history)

// Default generators whose state the run's random draws depend on: the CPU one
// (initialization; SR on CPU) and the training device's (SR on CUDA).
std::vector<std::pair<std::string, at::Generator>> run_generators(const torch::Device& device) {
  std::vector<std::pair<std::string, at::Generator>> generators = {
      {"rng_cpu", at::globalContext().defaultGenerator(torch::kCPU)}};
  if (device.is_cuda()) generators.emplace_back("rng_cuda", at::globalContext().defaultGenerator(device));
  return generators;
}

// The settings of a stored run that differ from `current`, as readable text
// (empty: none). Keys that may change on resume are ignored; epochs only when
// epochs_may_differ (extending a run) is set.
std::string differing_settings(const json& stored, const json& current, bool epochs_may_differ) {
  std::string differ;
  for (const auto& key : config_keys()) {
    const bool ignored = key_may_change_on_resume(key) && (epochs_may_differ || key != "epochs");
    if (!ignored && stored.value(key, json()) != current[key]) {
      differ += (differ.empty() ? "" : ", ") + key + " (" + stored.value(key, json()).dump() + " in the run, " +
                current[key].dump() + " now)";
    }
  }
  return differ;
}

// Note [Checkpoints]: the model, the optimizer, the run state, the generators
// and the run's settings, in one file with a checksum (Note [Checksummed files]),
// serialized in memory and written atomically, so a full disk leaves the
// previous checkpoint as it was.
void save_checkpoint(const std::string& path, nn::PaperCNN& model, torch::optim::Optimizer& optimizer,
                     const RunState& state, const json& settings, const torch::Device& device) {
  torch::serialize::OutputArchive archive;
  torch::serialize::OutputArchive model_archive, optimizer_archive;
  model->save(model_archive);
  optimizer.save(optimizer_archive);
  archive.write("model", model_archive);
  archive.write("optimizer", optimizer_archive);
  archive.write("state", c10::IValue(json(state).dump()));
  archive.write("config", c10::IValue(settings.dump()));
  for (auto& [key, generator] : run_generators(device)) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    archive.write(key, generator.get_state());
  }
  std::ostringstream bytes;
  archive.save_to(bytes);
  atomic_write(path, with_checksum(bytes.str()));
}

// A checkpoint's archive, after its checksum is verified (Note [Checksummed files]).
void read_checkpoint(const std::string& path, torch::serialize::InputArchive& archive,
                     const std::optional<torch::Device>& device) {
  const std::string bytes = without_checksum(read_text(path), path);
  archive.load_from(bytes.data(), bytes.size(), device);
}

// The settings a checkpoint was written with, after its checksum is verified.
json checkpoint_settings(const std::string& path) {
  torch::serialize::InputArchive archive;
  read_checkpoint(path, archive, torch::Device(torch::kCPU));
  c10::IValue stored;
  if (!archive.try_read("config", stored)) {
    throw std::invalid_argument("checkpoint " + path + " does not record its run's settings; start again with "
                                "--overwrite");
  }
  return json::parse(stored.toStringRef());
}

RunState load_checkpoint(const std::string& path, nn::PaperCNN& model, torch::optim::Optimizer& optimizer,
                         const torch::Device& device) {
  torch::serialize::InputArchive archive;
  read_checkpoint(path, archive, device);
  torch::serialize::InputArchive model_archive, optimizer_archive;
  archive.read("model", model_archive);
  archive.read("optimizer", optimizer_archive);
  model->load(model_archive);
  optimizer.load(optimizer_archive);
  c10::IValue state;
  archive.read("state", state);
  for (auto& [key, generator] : run_generators(device)) {
    torch::Tensor generator_state;
    archive.read(key, generator_state);
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(generator_state.cpu());
  }
  return json::parse(state.toStringRef()).get<RunState>();
}

std::vector<torch::Tensor> gradients(torch::nn::Module& model) {
  std::vector<torch::Tensor> out;
  for (const auto& p : model.parameters()) out.push_back(p.grad());
  return out;
}

std::vector<torch::Tensor> parameters_and_buffers(torch::nn::Module& model) {
  std::vector<torch::Tensor> out = model.parameters();
  for (const auto& b : model.buffers()) out.push_back(b);
  return out;
}

std::vector<torch::Tensor> optimizer_state(torch::optim::Optimizer& optimizer) {
  std::vector<torch::Tensor> out;
  for (const auto& [key, state] : optimizer.state()) {
    if (auto* s = dynamic_cast<optim::QpuSgdParamState*>(state.get())) out.push_back(s->momentum_buffer());
    if (auto* s = dynamic_cast<torch::optim::SGDParamState*>(state.get())) out.push_back(s->momentum_buffer());
  }
  return out;
}

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

std::string percent(double x) {
  std::ostringstream s;
  s.precision(2);
  s << std::fixed << 100.0 * x << "%";
  return s.str();
}

}  // namespace

RunFiles::RunFiles(const std::string& d)
    : dir(d), config(join_path(d, "config.json")), metrics(join_path(d, "metrics.jsonl")),
      summary(join_path(d, "summary.json")), checkpoint(join_path(d, "checkpoint.pt")) {}

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

  const bool have_checkpoint = path_exists(files.checkpoint), have_summary = path_exists(files.summary);
  json config_json = to_json(config);
  config_json["output_dir"] = files.dir;
  if (options.overwrite) {
    for (const auto& f : {files.checkpoint, files.summary, files.metrics, files.config}) remove_file(f);
  } else if (!options.resume && have_summary) {
    // Running the same command twice is not an error: the run is done.
    json summary = json::parse(read_text(files.summary));
    if (differing_settings(summary["config"], config_json, /*epochs_may_differ=*/false).empty()) {
      if (options.log) *options.log << files.dir << " already holds this finished run; --overwrite trains it again\n";
      return summary;
    }
    throw std::invalid_argument("output directory " + files.dir +
                                " holds a finished run with other settings; pass --resume to extend it to more epochs, "
                                "--overwrite to replace it, or choose another --output-dir");
  } else if (!options.resume && have_checkpoint) {
    throw std::invalid_argument("output directory " + files.dir +
                                " holds an unfinished run; pass --resume to continue it or --overwrite to start again");
  }
  const bool resuming = options.resume && !options.overwrite && have_checkpoint;
  if (resuming) {
    // The checkpoint's own record of its settings decides: config.json may be gone, or edited.
    const json stored = checkpoint_settings(files.checkpoint);
    const std::string differ = differing_settings(stored, config_json, /*epochs_may_differ=*/true);
    if (!differ.empty()) {
      throw std::invalid_argument("cannot resume from " + files.checkpoint + ": it was written with other settings: " +
                                  differ);
    }
    if (options.log && stored.value("threads", json()) != config_json["threads"]) {
      *options.log << "note: resuming with threads " << config.threads << " instead of " << stored["threads"]
                   << "; the result may differ in the last bits from an uninterrupted run\n";
    }
  }
  atomic_write(files.config, config_json.dump(2) + "\n");

  const Split train = load_split(config, "train", config.train_limit, device);
  const Split val = load_split(config, "t10k", config.val_limit, device);

  // Note [Identical initialization]: the model is built on the CPU right after
  // seeding, before anything method-specific, so every method (and device)
  // starts from the same float weights; QPU then rounds them onto the grid.
  torch::manual_seed(static_cast<uint64_t>(config.seed));
  nn::QuantConfig qc;
  qc.weight_mode = nn::weight_mode_for(config.method);
  qc.param_total_bits = config.param_bits;
  qc.param_frac_bits = config.param_frac;
  qc.act_total_bits = config.out_bits;
  qc.act_frac_bits = config.out_frac;
  qc.act_rounding = config.inference_rounding;
  nn::PaperCNN model(qc);
  model->to(device);
  if (is_qpu(config.method)) {
    model->quantize_parameters_(update_rounding(config.method), config.seed);
  }
  // Packed storage (docs/memory.md): QPU weights and momentum as codes, and
  // every saved layer input that is a quantized output as codes. fp32 has no grid.
  const bool packed = config.packed && config.method != "fp32";
  if (packed) model->pack_(/*weights=*/is_qpu(config.method), /*saved_inputs=*/true);
  auto optimizer = make_optimizer(config, model);
  auto* qpu = dynamic_cast<optim::QpuSgd*>(optimizer.get());
  if (qpu) {
    for (const auto& p : model->packed_parameters()) {
      qpu->set_packed_storage(p.parameter, p.codes, p.total_bits, p.frac_bits);
    }
  }

  RunState state;
  state.lr = config.initial_lr();
  if (resuming) {
    state = load_checkpoint(files.checkpoint, model, *optimizer, device);
    set_lr(*optimizer, state.lr);
    if (options.log) *options.log << "resuming " << files.dir << " after epoch " << state.epochs_done << "\n";
  }

  std::vector<std::string> parameter_layers;
  for (const auto& item : model->named_parameters()) parameter_layers.push_back(layer_of(item.key()));
  const int64_t n_params = [&] {
    int64_t n = 0;
    for (const auto& p : model->parameters()) n += p.numel();
    return n;
  }();
  const int64_t batches = (train.size() + config.batch_size - 1) / config.batch_size;
  std::optional<StepMemory> step_memory;  // measured on the session's first training step
  bool diverged = false;                  // packed storage met a NaN

  while (state.stop_reason.empty() && state.epochs_done < config.epochs) {
    const int64_t epoch = state.epochs_done + 1;
    const auto epoch_start = Clock::now();

    // --- train ---
    model->train();
    const torch::Tensor order = epoch_order(config.seed, epoch, train.size(), device);
    torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions(torch::kFloat64).device(device));
    torch::Tensor update_counts = torch::zeros({static_cast<int64_t>(parameter_layers.size()), 2},
                                               torch::TensorOptions(torch::kLong).device(device));
    ProgressBar bar(options.progress, "epoch " + std::to_string(epoch) + "/" + std::to_string(config.epochs), batches);
    for (int64_t b = 0; b < batches; ++b) {
      optimizer->zero_grad();
      // The session's second step (its first, if an epoch has one batch), so the
      // momentum buffers exist and the previous gradients are gone.
      const bool measure = !step_memory.has_value() && (b == 1 || batches == 1);
      AllocatorBytes before;
      int64_t state_before = 0;
      if (measure) {
        state_before = storage_bytes(optimizer_state(*optimizer));
        reset_allocator_peak(device);
        before = allocator_bytes(device);
      }
      const int64_t start = b * config.batch_size;
      const torch::Tensor index = order.narrow(0, start, std::min(config.batch_size, train.size() - start));
      const torch::Tensor x = train.images.index_select(0, index), y = train.labels.index_select(0, index);
      torch::Tensor loss;
      try {
        loss = torch::nn::functional::cross_entropy(model->forward(x), y);
        if (measure) step_memory = StepMemory{0, 0, 0, allocator_bytes(device).current - before.current, 0};
        loss.backward();
        if (measure) step_memory->gradients = storage_bytes(gradients(*model));
        optimizer->step();
      } catch (const c10::ValueError& e) {
        // Packed storage cannot hold NaN (fxp::pack, qpu_sgd_step_): the run has diverged.
        if (!packed) throw;
        if (options.log) *options.log << "stopping: " << e.what_without_backtrace() << "\n";
        diverged = true;
        break;
      }
      if (measure) {
        step_memory->parameters = storage_bytes(parameters_and_buffers(*model));
        step_memory->optimizer_state = storage_bytes(optimizer_state(*optimizer));
        // Everything the step allocated on top of what it found, plus the resident model.
        step_memory->step_peak = allocator_bytes(device).peak - before.current + step_memory->parameters + state_before;
      }
      loss_sum.add_(loss.detach().to(torch::kFloat64) * static_cast<double>(index.size(0)));
      // One row per parameter, in the model's order (the optimizer's groups
      // hold the model's parameters in order; rows of parameters without a gradient are zero).
      if (qpu) update_counts.add_(torch::cat(qpu->last_counts()));
      bar.update(b + 1, [&] { return loss_sum.item<double>() / static_cast<double>(std::min(start + index.size(0), train.size())); });
    }
    const double train_loss =
        diverged ? std::numeric_limits<double>::quiet_NaN() : loss_sum.item<double>() / static_cast<double>(train.size());
    bar.finish();
    const double train_time = seconds_since(epoch_start);

    // --- validate ---
    model->eval();
    double val_loss_sum = 0;
    int64_t correct = 0;
    {
      torch::NoGradGuard no_grad;
      auto stats = model->output_stats();
      for (auto& [name, s] : stats) s->reset(), s->enabled = true;
      torch::Tensor loss_acc = torch::zeros({}, torch::TensorOptions(torch::kFloat64).device(device));
      torch::Tensor correct_acc = torch::zeros({}, torch::TensorOptions(torch::kLong).device(device));
      for (int64_t start = 0; start < val.size(); start += config.eval_batch_size) {
        const int64_t len = std::min(config.eval_batch_size, val.size() - start);
        const torch::Tensor x = val.images.narrow(0, start, len), y = val.labels.narrow(0, start, len);
        const torch::Tensor logits = model->forward(x);
        loss_acc.add_(torch::nn::functional::cross_entropy(
                          logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                          .to(torch::kFloat64));
        correct_acc.add_(logits.argmax(1).eq(y).sum());
      }
      for (auto& [name, s] : stats) s->enabled = false;
      val_loss_sum = loss_acc.item<double>();
      correct = correct_acc.item<int64_t>();
    }
    const double val_loss = val_loss_sum / static_cast<double>(val.size());
    const double val_accuracy = static_cast<double>(correct) / static_cast<double>(val.size());

    // --- per-layer statistics ---
    json layers = json::object();
    for (auto& [name, s] : model->output_stats()) {
      json entry = {{"output_saturated", nullptr}, {"output_saturated_fraction", nullptr}, {"param_saturated", nullptr}};
      if (s->saturated.defined()) {
        const int64_t saturated = s->saturated.item<int64_t>();
        entry["output_saturated"] = saturated;
        entry["output_saturated_fraction"] = static_cast<double>(saturated) / static_cast<double>(s->elements);
      }
      layers[name] = entry;
    }
    json vanished_fraction = nullptr;
    if (qpu) {
      const torch::Tensor counts = update_counts.cpu();
      int64_t vanished = 0;
      for (size_t k = 0; k < parameter_layers.size(); ++k) {
        auto& sat = layers[parameter_layers[k]]["param_saturated"];
        sat = (sat.is_null() ? 0 : sat.get<int64_t>()) + counts[k][0].item<int64_t>();
        vanished += counts[k][1].item<int64_t>();
      }
      vanished_fraction = static_cast<double>(vanished) / (static_cast<double>(n_params) * static_cast<double>(batches));
    } else if (config.method == "ste") {
      // STE's master weights outside the representable range (saturated when read).
      torch::NoGradGuard no_grad;
      size_t k = 0;
      for (const auto& p : model->parameters()) {
        auto& sat = layers[parameter_layers[k++]]["param_saturated"];
        const int64_t n = std::get<1>(quantize_stats(p, config.param_bits, config.param_frac)).item<int64_t>();
        sat = (sat.is_null() ? 0 : sat.get<int64_t>()) + n;
      }
    }

    // --- schedule and stopping ---
    const double lr_used = state.lr;
    if (config.scheduler == "plateau") {
      // torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", factor, patience, threshold=1e-4 rel).
      if (val_loss < state.plateau_best * (1.0 - 1e-4)) {
        state.plateau_best = val_loss;
        state.plateau_bad = 0;
      } else if (++state.plateau_bad > config.plateau_patience) {
        state.lr *= config.plateau_factor;
        state.plateau_bad = 0;
        set_lr(*optimizer, state.lr);
      }
    }
    const bool improved = val_loss < state.stop_best_loss || val_accuracy > state.best_accuracy;
    if (val_loss < state.stop_best_loss) state.stop_best_loss = val_loss;
    state.stop_bad = improved ? 0 : state.stop_bad + 1;
    if (val_accuracy > state.best_accuracy) {
      state.best_accuracy = val_accuracy;
      state.best_epoch = epoch;
    }
    state.epochs_done = epoch;
    if (!std::isfinite(train_loss)) {
      state.stop_reason = "non_finite_loss";
    } else if (config.early_stopping && state.stop_bad >= config.early_stopping_patience &&
               epoch >= config.early_stopping_min_epochs) {
      state.stop_reason = "early_stopping";
    }

    const double epoch_time = seconds_since(epoch_start);
    const json record = {{"epoch", epoch},
                         {"train_loss", std::isfinite(train_loss) ? json(train_loss) : json(nullptr)},
                         {"val_loss", std::isfinite(val_loss) ? json(val_loss) : json(nullptr)},
                         {"val_accuracy", val_accuracy},
                         {"lr", lr_used},
                         {"epoch_time_s", epoch_time},
                         {"train_time_s", train_time},
                         {"images_per_s", static_cast<double>(train.size()) / train_time},
                         {"layers", layers},
                         {"vanished_update_fraction", vanished_fraction}};
    state.history.push_back(record);
    state.wall_time_s += epoch_time;

    std::string lines;
    for (const auto& r : state.history) lines += r.dump() + "\n";
    save_checkpoint(files.checkpoint, model, *optimizer, state, config_json, device);
    atomic_write(files.metrics, lines);
    if (options.log) {
      char line[256];
      std::snprintf(line, sizeof line,
                    "epoch %3lld/%lld  train loss %.4f  val loss %.4f  val acc %6.2f%%  lr %.3g  %.1f s  %.0f img/s\n",
                    static_cast<long long>(epoch), static_cast<long long>(config.epochs), train_loss, val_loss,
                    100.0 * val_accuracy, lr_used, epoch_time, static_cast<double>(train.size()) / train_time);
      *options.log << line << std::flush;
    }
  }
  if (state.stop_reason.empty()) state.stop_reason = "epochs";

  // --- summary ---
  const json& last = state.history.back();
  double images_per_s = 0;
  for (const auto& r : state.history) images_per_s += r["images_per_s"].get<double>();
  images_per_s /= static_cast<double>(state.history.size());
  const ModelCounts counts = model_counts(model->describe());
  json memory_model = json::object();
  for (const std::string accounting : {"paper", "full"}) {
    const auto estimate = [&](const std::string& method) {
      return estimate_memory(counts, accounting, method, config.param_bits, config.out_bits, config.momentum > 0,
                             config.batch_size);
    };
    json j = to_json(estimate(config.method));
    j["ratio_to_ste"] = estimate(config.method).total_bytes() / estimate("ste").total_bytes();
    j["ratio_to_fp32"] = estimate(config.method).total_bytes() / estimate("fp32").total_bytes();
    memory_model[accounting] = j;
  }
  json summary = {{"run_name", config.run_name()},
                  {"status", "finished"},
                  {"stop_reason", state.stop_reason},
                  {"epochs_completed", state.epochs_done},
                  {"best_val_accuracy", state.best_accuracy},
                  {"best_epoch", state.best_epoch},
                  {"final_val_accuracy", last["val_accuracy"]},
                  {"final_val_loss", last["val_loss"]},
                  {"final_train_loss", last["train_loss"]},
                  {"final_lr", state.lr},
                  {"wall_time_s", state.wall_time_s},
                  {"session_time_s", seconds_since(session_start)},
                  {"train_images_per_s", images_per_s},
                  {"train_images", train.size()},
                  {"val_images", val.size()},
                  {"parameters", n_params},
                  {"memory_model", memory_model},
                  {"measured_memory", measured_memory(device, step_memory)},
                  {"device", device.str()},
                  {"threads", at::get_num_threads()},
                  {"torch_version", TORCH_VERSION},
                  {"config", config_json}};
  atomic_write(files.summary, summary.dump(2) + "\n");
  return summary;
}

std::string summary_text(const json& s) {
  std::ostringstream out;
  const json& c = s["config"];
  out << "run " << s["run_name"].get<std::string>() << " on " << s["device"].get<std::string>() << " ("
      << s["threads"].get<int64_t>() << " threads), output in " << c["output_dir"].get<std::string>() << "\n";
  out << "  best validation accuracy  " << percent(s["best_val_accuracy"].get<double>()) << " (epoch "
      << s["best_epoch"].get<int64_t>() << ")\n";
  out << "  final validation accuracy " << percent(s["final_val_accuracy"].get<double>()) << " after "
      << s["epochs_completed"].get<int64_t>() << " epochs, stopped by: " << s["stop_reason"].get<std::string>() << "\n";
  char line[256];
  std::snprintf(line, sizeof line, "  wall time %.1f s, %.0f training images/s\n", s["wall_time_s"].get<double>(),
                s["train_images_per_s"].get<double>());
  out << line;
  for (const std::string accounting : {"paper", "full"}) {
    const json& m = s["memory_model"][accounting];
    std::snprintf(line, sizeof line, "  training memory, %s model: %.1f kB (%.3f of STE)\n", accounting.c_str(),
                  m["total_bytes"].get<double>() / 1e3, m["ratio_to_ste"].get<double>());
    out << line;
  }
  if (s["measured_memory"].contains("step")) {
    const json& m = s["measured_memory"]["step"];
    std::snprintf(line, sizeof line,
                  "  measured, one step%s: %.1f kB = parameters %.1f + gradients %.1f + optimizer state %.1f + "
                  "activations %.1f (peak %.1f kB)\n",
                  c.value("packed", false) ? " (packed)" : "", m["total_bytes"].get<double>() / 1e3,
                  m["parameters_bytes"].get<double>() / 1e3, m["gradients_bytes"].get<double>() / 1e3,
                  m["optimizer_state_bytes"].get<double>() / 1e3, m["activations_bytes"].get<double>() / 1e3,
                  m["step_peak_bytes"].get<double>() / 1e3);
    out << line;
  }
  return out.str();
}

}  // namespace fxp::train
