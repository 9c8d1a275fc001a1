#include "train/fleet.h"

#include <c10/core/DeviceGuard.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>

#include "nn/fleet.h"
#include "optim/fleet_sgd.h"
#include "train/checkpoint.h"
#include "train/epoch.h"
#include "train/io.h"
#include "train/memory.h"
#include "train/progress.h"
#include "train/resume.h"
#include "train/schedule.h"
#include "train/setup.h"
#include "train/summary.h"
#include "train/validate.h"

namespace fxp::train {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Keys every member of a fleet shares: what the stacked model, the shared
// data and the shared batches need. The rest (seed, formats, rounding, lr,
// momentum, weight decay, schedule, early stopping, epochs, output_dir) is
// each member's own.
const std::vector<std::string>& shared_keys() {
  static const std::vector<std::string> keys = {
      "model",     "dataset",     "method",          "momentum_form",  "batch_size",     "device",
      "threads",   "data_dir",    "train_limit",     "val_limit",      "eval_batch_size", "normalize_mean",
      "normalize_std", "bn_recalibration_batches"};
  return keys;
}

// The shared_keys a run reads, with its values: one it does not read (bn_recalibration_batches
// on a model without batch norm, Note [Settings without effect]) cannot set members apart.
json shared_settings(const TrainConfig& c) {
  const json j = to_json(c);
  std::set<std::string> unread;
  for (const auto& [key, why] : c.unread_settings()) unread.insert(key);
  json shared = json::object();
  for (const auto& key : shared_keys()) {
    if (!unread.count(key)) shared[key] = j.at(key);
  }
  return shared;
}

// Member m's run: its settings, files, solo model and optimizer (whose
// parameters view the fleet's stacks), bookkeeping and generators.
struct Member {
  explicit Member(const TrainConfig& c) : config(c), files(output_dir_for(c)), settings(to_json(c)) {}
  TrainConfig config;
  RunFiles files;
  json settings;
  std::optional<DirectoryLock> lock;
  RunStart start;
  Training training;
  RunState state;
  std::vector<at::Generator> generators;  // clones of nn::default_generators(device): the solo run's
  json summary;
  bool done = false;
};

// Member m's generators take the default generators' place while its solo
// model validates or its checkpoint is written (they read and save those).
class MemberGeneratorsInstalled {
 public:
  MemberGeneratorsInstalled(Member& member, const torch::Device& device)
      : member_(member), defaults_(nn::default_generators(device)) {
    for (size_t i = 0; i < defaults_.size(); ++i) copy_state(member_.generators[i], defaults_[i]);
  }
  ~MemberGeneratorsInstalled() {
    for (size_t i = 0; i < defaults_.size(); ++i) copy_state(defaults_[i], member_.generators[i]);
  }

 private:
  static void copy_state(at::Generator& from, at::Generator& to) {
    torch::Tensor state;
    {
      std::lock_guard<std::mutex> lock(from.mutex());
      state = from.get_state();
    }
    std::lock_guard<std::mutex> lock(to.mutex());
    to.set_state(state);
  }
  Member& member_;
  std::vector<at::Generator> defaults_;
};

// While a member's checkpoint is written its parameters hold copies: a view
// of the stacks would save every member's rows.
class ParametersDetached {
 public:
  explicit ParametersDetached(torch::nn::Module& model) : params_(model.parameters()) {
    torch::NoGradGuard no_grad;
    for (auto& p : params_) {
      views_.push_back(p.detach());
      p.set_data(p.detach().clone());
    }
  }
  ~ParametersDetached() {
    for (size_t k = 0; k < params_.size(); ++k) params_[k].set_data(views_[k]);
  }

 private:
  std::vector<torch::Tensor> params_, views_;
};

// The fleet optimizer's state of member m into its solo optimizer, as the
// solo run's optimizer would hold it after as many steps (for its checkpoint).
void export_update_state(Member& member, const optim::FleetSgd& fleet_sgd, int64_t m) {
  auto& optimizer = *member.training.optimizer;
  const auto params = member.training.model->parameters();
  const optim::FleetMemberUpdate& u = fleet_sgd.members()[static_cast<size_t>(m)];
  if (member.training.qpu) static_cast<optim::QpuSgdOptions&>(optimizer.param_groups()[0].options()).step(u.step);
  if (u.momentum == 0 || u.step == 0) return;
  for (size_t k = 0; k < params.size(); ++k) {
    const torch::Tensor buffer = fleet_sgd.momentum_buffer(m, k).clone();
    void* key = params[k].unsafeGetTensorImpl();
    if (member.training.qpu) {
      auto state = std::make_unique<optim::QpuSgdParamState>();
      state->momentum_buffer(buffer);
      optimizer.state()[key] = std::move(state);
    } else {
      auto state = std::make_unique<torch::optim::SGDParamState>();
      state->momentum_buffer(buffer);
      optimizer.state()[key] = std::move(state);
    }
  }
}

// The solo optimizer's state (after a resume) as the fleet's member m starts from.
optim::FleetMemberUpdate import_update_state(const Member& member, std::vector<torch::Tensor>& buffers) {
  const TrainConfig& c = member.config;
  optim::FleetMemberUpdate u;
  u.lr = member.state.lr;
  u.momentum = c.momentum;
  u.weight_decay = c.weight_decay;
  u.total_bits = c.param_bits;
  u.frac_bits = c.param_frac;
  u.rounding = is_qpu(c.method) ? update_rounding(c.method) : "nearest_even";
  u.seed = c.seed;
  auto& optimizer = *member.training.optimizer;
  if (member.training.qpu) u.step = static_cast<optim::QpuSgdOptions&>(optimizer.param_groups()[0].options()).step();
  for (const auto& p : member.training.model->parameters()) {
    const auto it = optimizer.state().find(p.unsafeGetTensorImpl());
    if (it == optimizer.state().end()) continue;
    if (auto* s = dynamic_cast<optim::QpuSgdParamState*>(it->second.get())) buffers.push_back(s->momentum_buffer());
    if (auto* s = dynamic_cast<torch::optim::SGDParamState*>(it->second.get())) buffers.push_back(s->momentum_buffer());
  }
  if (!member.training.qpu && !buffers.empty()) u.step = 1;  // SGD's buffer exists after its first step
  return u;
}

}  // namespace

std::string fleet_incompatibility(const std::vector<TrainConfig>& members) {
  if (members.empty()) return "a fleet needs at least one member";
  const json first = shared_settings(members[0]);
  std::string problems;
  auto add = [&](const std::string& p) { problems += (problems.empty() ? "" : "; ") + p; };
  std::set<std::string> dirs;
  for (size_t m = 0; m < members.size(); ++m) {
    const TrainConfig& c = members[m];
    const json j = shared_settings(c);
    const std::string who = "member " + std::to_string(m);
    for (const auto& key : shared_keys()) {  // null where a run does not read the key (shared_settings)
      const json mine = j.value(key, json()), member0 = first.value(key, json());
      if (mine != member0) {
        add(who + "'s " + key + " is " + mine.dump() + ", member 0's " + member0.dump() + " (fleet members share " +
            key + ")");
      }
    }
    if (!dirs.insert(output_dir_for(c)).second) add(who + " writes to " + output_dir_for(c) + ", as another member");
    if (m > 0) continue;  // the rest is shared: say it once
    if (c.model != "paper_cnn" && c.model != "lenet5") add("fleets train paper_cnn and lenet5 for now, not " + c.model);
    if (c.method == "adapt" || c.method == "msq") add("fleets train fp32, ste, sqpu and hteqpu, not " + c.method);
    if (c.packed) add("fleets do not hold packed storage yet");
    if (c.distributed) add("a fleet runs in one process: distributed is for one large run");
    if (c.cuda_graphs) add("fleets do not capture CUDA graphs yet");
  }
  for (const auto& c : members) {
    if (!c.init_from.empty()) add("fleet members start from their seeds, not init_from");
  }
  return problems;
}

std::optional<std::string> fleet_group(const TrainConfig& config) {
  if (!fleet_incompatibility({config}).empty()) return std::nullopt;
  return shared_settings(config).dump();
}

int64_t fleet_chunk(int64_t requested, const c10::Device& device, int64_t batch_size) {
  if (requested > 0) return requested;
  if (!device.is_cpu()) return 0;
  return std::max<int64_t>(1, kFleetChunkImages / std::max<int64_t>(1, batch_size));
}

json run_fleet(const std::vector<TrainConfig>& configs, const RunOptions& options, const FleetOptions& fleet_options) {
  const auto session_start = Clock::now();
  for (const auto& c : configs) c.validate();
  if (const std::string why = fleet_incompatibility(configs); !why.empty()) {
    throw std::invalid_argument("fleet: these runs cannot train as one fleet: " + why);
  }
  const TrainConfig& shared = configs[0];
  const torch::Device device(shared.device);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw std::invalid_argument("device " + shared.device + " was requested, but no CUDA device is available");
  }
  const c10::OptionalDeviceGuard device_guard(device.is_cuda() ? std::optional(device) : std::nullopt);  // as run.cpp's
  if (device.is_cpu()) keep_freed_cpu_memory();  // Note [Freed CPU memory stays in the process]
  if (shared.threads > 0) at::set_num_threads(static_cast<int>(shared.threads));
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setBenchmarkCuDNN(false);

  // Each member's directory as fxp-train would start it (Note [Resume]).
  std::vector<std::unique_ptr<Member>> all;
  for (const auto& c : configs) {
    auto member = std::make_unique<Member>(c);
    member->settings["output_dir"] = member->files.dir;
    make_dirs(member->files.dir);
    member->lock.emplace(member->files.dir);  // Note [Run directory lock]
    member->start = decide_start(member->files, member->settings, options);
    if (member->start.finished) {
      member->summary = *member->start.finished;
      member->done = true;
    } else {
      atomic_write(member->files.config, member->settings.dump(2) + "\n");
    }
    all.push_back(std::move(member));
  }
  std::vector<Member*> training;  // the fleet's members, in stack order
  for (auto& m : all) {
    if (!m->done) training.push_back(m.get());
  }
  json summaries = json::array();
  if (!training.empty()) {
    const Split train = load_split(shared, /*train=*/true, shared.train_limit, device);
    const Split val = load_split(shared, /*train=*/false, shared.val_limit, device);
    // Each member set up as its solo run is (Note [Identical initialization]),
    // then its generators kept as its own.
    for (Member* m : training) {
      m->training = set_up_training(m->config, device, m->start.resume);
      if (options.log) log_settings_notes(*options.log, m->config, *m->training.model, m->config.run_name() + ": ");
      m->state.lr = m->config.initial_lr();
      if (m->start.resume) {
        m->state = load_checkpoint(m->files.checkpoint, *m->training.model, *m->training.optimizer, nullptr, device);
        set_lr(*m->training.optimizer, m->state.lr);
        if (options.log) *options.log << "resuming " << m->files.dir << " after epoch " << m->state.epochs_done << "\n";
      }
      for (at::Generator& g : nn::default_generators(device)) {
        std::lock_guard<std::mutex> lock(g.mutex());
        m->generators.push_back(g.clone());
      }
      m->done = !m->state.stop_reason.empty() || m->state.epochs_done >= m->config.epochs;
    }
    std::vector<std::shared_ptr<nn::NetworkImpl>> models;
    std::vector<at::Generator> draw_generators;  // the forward's: the device's generator
    std::vector<optim::FleetMemberUpdate> updates;
    std::vector<std::vector<torch::Tensor>> resumed_buffers;
    for (Member* m : training) {
      models.push_back(m->training.model);
      draw_generators.push_back(m->generators.back());
      resumed_buffers.emplace_back();
      updates.push_back(import_update_state(*m, resumed_buffers.back()));
      updates.back().active = !m->done;
    }
    nn::NetworkFleet fleet(models, draw_generators);
    optim::FleetSgd fleet_sgd(fleet.parameters(), updates, is_qpu(shared.method), shared.momentum_form);
    for (size_t i = 0; i < training.size(); ++i) {
      if (!resumed_buffers[i].empty()) fleet_sgd.set_momentum_buffers(static_cast<int64_t>(i), resumed_buffers[i]);
    }
    std::vector<Member*> stacked = training;  // the members in the stacks, in order
    const int64_t batches = (train.size() + shared.batch_size - 1) / shared.batch_size;
    const auto tensors = static_cast<int64_t>(fleet.parameters().size());
    const int64_t chunk = fleet_chunk(fleet_options.chunk, device, shared.batch_size);  // Note [Fleet chunk size]
    if (options.log && chunk > 0 && chunk < fleet.size()) {
      *options.log << "fleet: " << fleet.size() << " members, forward and backward in chunks of " << chunk << "\n";
    }

    while (std::any_of(stacked.begin(), stacked.end(), [](const Member* m) { return !m->done; })) {
      // Note [Fleet compaction]: stopped members leave the stacks when enough have.
      int64_t running = 0;
      for (const Member* m : stacked) running += m->done ? 0 : 1;
      if (fleet_options.compact_below > 0 &&
          static_cast<double>(running) <= fleet_options.compact_below * static_cast<double>(stacked.size())) {
        std::vector<int64_t> keep;
        std::vector<Member*> kept;
        for (size_t i = 0; i < stacked.size(); ++i) {
          if (!stacked[i]->done) keep.push_back(static_cast<int64_t>(i)), kept.push_back(stacked[i]);
        }
        fleet.keep_members(keep);
        fleet_sgd.keep_members(keep, fleet.parameters());
        stacked = kept;
        if (options.log) *options.log << "fleet: " << stacked.size() << " members still training\n";
      }
      const auto k = static_cast<int64_t>(stacked.size());
      const auto round_start = Clock::now();
      // Each member's order of its own next epoch (Note [Shuffling]).
      std::vector<torch::Tensor> orders;
      for (Member* m : stacked) {
        orders.push_back(epoch_order(m->config.seed, m->state.epochs_done + 1, train.size(), device));
      }
      const torch::Tensor order = torch::stack(orders);  // [K, n]
      // QPU: each member's (saturated, vanished) counts of the epoch; zeros for SGD, as a solo run reports them.
      torch::Tensor counts_sum = torch::zeros({k, tensors, 2}, torch::dtype(torch::kLong).device(device));
      torch::Tensor losses = torch::zeros({k}, torch::dtype(torch::kFloat64).device(device));
      ProgressBar bar(options.progress, "fleet of " + std::to_string(k), batches);
      for (int64_t b = 0; b < batches; ++b) {
        const int64_t start = b * shared.batch_size, size = std::min(shared.batch_size, train.size() - start);
        const torch::Tensor index = order.narrow(1, start, size).reshape({-1});
        torch::Tensor x = train.images.index_select(0, index);
        x = x.view({k, size, x.size(1), x.size(2), x.size(3)});
        const torch::Tensor y = train.labels.index_select(0, index).view({k, size});
        fleet.forward_backward(x, chunk, [&](const torch::Tensor& logits, const nn::NetworkFleet::MemberRange& r) {
          // The sum of the members' mean losses: each member's gradient is its own.
          const torch::Tensor ys = y.narrow(0, r.first, r.count);
          const torch::Tensor loss = torch::nn::functional::cross_entropy(
                                         logits.reshape({r.count * size, logits.size(2)}), ys.reshape({-1}),
                                         torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
                                     static_cast<double>(size);
          // Each member's reported loss as its solo run computes it (a float32 mean, summed in float64).
          torch::NoGradGuard no_grad;
          std::vector<torch::Tensor> means;
          for (int64_t i = 0; i < r.count; ++i) {
            means.push_back(torch::nn::functional::cross_entropy(logits.select(0, i).detach(), ys.select(0, i)));
          }
          losses.narrow(0, r.first, r.count).add_(torch::stack(means).to(torch::kFloat64) * static_cast<double>(size));
          return loss;
        });
        fleet_sgd.step();
        if (fleet_sgd.last_counts().defined()) counts_sum.add_(fleet_sgd.last_counts());
        bar.update(b + 1, [&] { return losses.sum().item<double>() / static_cast<double>(k * (start + size)); });
      }
      bar.finish();
      const double train_time = seconds_since(round_start);
      const torch::Tensor host_losses = losses.cpu();
      // Each member's end of epoch, as run_training ends a solo run's.
      for (int64_t i = 0; i < k; ++i) {
        Member& m = *stacked[static_cast<size_t>(i)];
        if (m.done) continue;
        const int64_t epoch = m.state.epochs_done + 1;
        const double train_loss = host_losses[i].item<double>() / static_cast<double>(train.size());
        EpochResult trained{train_loss, counts_sum.select(0, i), batches, false};
        const auto member_start = Clock::now();
        Validation validation{};
        LayerStatistics statistics;
        {
          const MemberGeneratorsInstalled installed(m, device);
          validation = validate(m.training, val, m.config, device);
          statistics = layer_statistics(m.training, m.config, trained);
        }
        const double lr = m.state.lr;
        end_epoch(m.state, m.config, epoch, train_loss, validation.loss, validation.accuracy);
        fleet_sgd.members()[static_cast<size_t>(i)].lr = m.state.lr;
        set_lr(*m.training.optimizer, m.state.lr);
        const double epoch_time = train_time + seconds_since(member_start);
        m.state.history.push_back(
            epoch_record(epoch, trained, validation, statistics, lr, epoch_time, train_time, train.size()));
        m.state.history.back()["fleet"] = {{"members", k}};
        m.state.wall_time_s += epoch_time;
        {
          export_update_state(m, fleet_sgd, i);
          const MemberGeneratorsInstalled installed(m, device);
          const ParametersDetached detached(*m.training.model);
          save_checkpoint(m.files.checkpoint, *m.training.model, *m.training.optimizer, nullptr, m.state, m.settings,
                          device);
        }
        std::string lines;
        for (const auto& r : m.state.history) lines += r.dump() + "\n";
        atomic_write(m.files.metrics, lines);
        if (options.log) {
          *options.log << m.config.run_name() << "  ";
          log_epoch(*options.log, m.state.history.back(), m.config);
        }
        if (!m.state.stop_reason.empty() || m.state.epochs_done >= m.config.epochs) {
          m.done = true;
          fleet_sgd.members()[static_cast<size_t>(i)].active = false;
        }
      }
    }
    for (Member* m : training) {
      if (m->state.history.empty()) continue;  // resumed after its last epoch: nothing new to report
      if (m->state.stop_reason.empty()) m->state.stop_reason = "epochs";
      const MemberGeneratorsInstalled installed(*m, device);  // describe() runs a forward
      std::optional<StepMemory> no_step_memory;  // a fleet's step is not one run's
      m->summary = make_summary({m->config, m->settings, m->state, m->training, train.size(), val.size(), device,
                                 no_step_memory, seconds_since(session_start)});
      m->summary["fleet"] = {{"members", static_cast<int64_t>(training.size())}};
      atomic_write(m->files.summary, m->summary.dump(2) + "\n");
    }
  }
  for (const auto& m : all) summaries.push_back(m->summary);
  return summaries;
}

}  // namespace fxp::train
