#include "train/setup.h"

#include <sched.h>

#include <algorithm>
#include <mutex>
#include <ostream>
#include <stdexcept>
#include <thread>

#include "data/datasets.h"
#include "train/checkpoint.h"

namespace fxp::train {

Split load_split(const TrainConfig& c, bool train, int64_t limit, const torch::Device& device) {
  data::ImageSplit s = data::read_dataset_split(c.dataset, c.data_directory(), train);
  const int64_t n = s.labels.size(0);
  if (limit > n) {
    throw std::invalid_argument((train ? "train_limit " : "val_limit ") + std::to_string(limit) +
                                " is larger than the " + std::to_string(n) + " images of " + c.data_directory() +
                                " (" + c.dataset + ", " + (train ? "training" : "test") + " split)");
  }
  if (limit > 0) {
    s.images = s.images.narrow(0, 0, limit);
    s.labels = s.labels.narrow(0, 0, limit);
  }
  // Padding comes before normalization, so padded pixels are black like a border.
  torch::Tensor x = data::fit_images(s.images, nn::network_image_size(c.model)).to(torch::kFloat32).div_(255.0f);
  x = x.sub_(static_cast<float>(c.input_mean())).div_(static_cast<float>(c.input_std()));
  return {x.to(device).contiguous(), s.labels.to(device)};
}

std::shared_ptr<nn::NetworkImpl> build_network(const TrainConfig& c) {
  nn::QuantConfig qc;
  qc.param_total_bits = c.param_bits;
  qc.param_frac_bits = c.param_frac;
  qc.act_total_bits = c.out_bits;
  qc.act_frac_bits = c.out_frac;
  if (c.method == "adapt") {
    // AdaPT reads its float32 master copy quantized, as STE does, or keeps
    // none (Note [AdaPT with QPU]); its controller sets every layer's formats
    // (Note [AdaPT's schedule]), all at the start format first.
    qc.weight_mode = c.update == "qpu" ? nn::WeightMode::Qpu : nn::WeightMode::Ste;
    qc.param_total_bits = qc.act_total_bits = c.adapt_start_bits;
    qc.param_frac_bits = qc.act_frac_bits = c.adapt_start_frac;
  } else {
    qc.weight_mode = nn::weight_mode_for(c.method);
  }
  qc.act_rounding = c.inference_rounding;
  const data::DatasetInfo& info = data::dataset_info(c.dataset);
  return nn::make_network(c.model, qc, info.channels, info.classes);
}

int64_t usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
}

void log_settings_notes(std::ostream& log, const TrainConfig& c, const nn::NetworkImpl& model,
                        const std::string& prefix) {
  for (const auto& line : c.settings_without_effect()) log << prefix << "note: " << line << "\n";
  const int64_t cpus = usable_cpus();
  if (c.device == "cpu" && c.threads > cpus) {
    log << prefix << "note: threads = " << c.threads << " is more than the " << cpus
        << " CPUs this process may use: OpenMP's waiting threads spin, so threads that share a core can make the run "
           "several times slower (docs/train.md, \"Threads and a busy machine\")\n";
  }
  if (c.method == "msq" && c.init_from.empty()) {
    log << prefix << "note: MSQ starts from random weights here: it fixes each layer's scale from the weights it "
                     "starts with, and its paper fine-tunes a trained float32 model; --init-from RUN/checkpoint.pt "
                     "starts from one (docs/msq.md)\n";
  }
  if (c.method != "fp32" && c.bn_recalibration_batches == 0 && model.has_batch_norm()) {
    log << prefix << "note: batch norm's running statistics trail the parameters, and with quantized layers "
                     "validation can understate accuracy by far; --bn-recalibration-batches 10 recomputes them "
                     "before each validation (docs/train.md)\n";
  }
}

uint64_t mix_seed(uint64_t seed, uint64_t salt) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + salt + 0x632BE59BD9B4E019ull;  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Note [The forward's key on a GPU]
// A CUDA generator draws with its seed as the Philox key, at counters from
// offset 0 up (docs/design.md, "Random numbers"), and torch::manual_seed(seed)
// gives it the run's seed. The QPU step draws with the same key, seed (group
// i: seed + i), at step 0's offsets 0 to 2n − 1: left so, a GPU run's first
// forward roundings and its first update would round on the same words. So
// the device's generator is keyed mix_seed(seed, 0) once the model is built;
// its draws then never meet the update's (design.md, "Random numbers": fxp's
// draws never repeat each other's or torch's). This holds for every method
// (fp32 draws nothing), before the optimizer is built. The CPU
// generator keeps the run's seed (its roundings are keyed by its own draws,
// not by its seed), so a CPU run's bits are those it had before this.
// Checkpoints restore the generator's state, fleets clone it, and
// data-parallel epochs reseed it (Note [Data-parallel steps]).

Training set_up_training(const TrainConfig& c, const torch::Device& device, bool resuming) {
  // Note [Identical initialization]: the model is built on the CPU right after
  // seeding, before anything method-specific, so every method (and device)
  // starts from the same float weights; QPU then rounds them onto the grid.
  torch::manual_seed(static_cast<uint64_t>(c.seed));
  Training t;
  t.model = build_network(c);
  if (!c.init_from.empty() && !resuming) load_model_weights(c.init_from, *t.model);  // a resume reads its checkpoint
  t.model->to(device);
  if (device.is_cuda()) {  // Note [The forward's key on a GPU]
    at::Generator g = nn::default_generators(device).back();
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_current_seed(mix_seed(static_cast<uint64_t>(c.seed), 0));
  }
  const bool adapt_qpu = c.method == "adapt" && c.update == "qpu";
  if (is_qpu(c.method) || adapt_qpu) {
    t.model->quantize_parameters_(adapt_qpu ? "stochastic" : update_rounding(c.method), c.seed);
  }
  // Packed storage (docs/memory.md): QPU weights and momentum as codes, and
  // every saved layer input that is a quantized output as codes. fp32 has no grid.
  t.packed = c.packed && c.method != "fp32";
  if (t.packed) {
    t.model->pack_(/*weights=*/is_qpu(c.method), /*saved_inputs=*/true);
    // Note [Deferred pack checks in training]: the layers and the optimizer count into one tensor.
    t.packed_counts = torch::zeros({3}, torch::dtype(torch::kLong).device(device));
    for (const auto& [name, layer] : t.model->quantized_layers()) {
      if (layer->packed.saved_input_format) layer->packed.pack_counts = t.packed_counts.narrow(0, 0, 2);
    }
  }
  const double lr = c.initial_lr();
  if (c.method == "adapt") t.adapt = std::make_unique<adapt::Controller>(*t.model, adapt_options(c));
  if (c.method == "msq") t.msq = std::make_unique<msq::Controller>(*t.model, msq_options(c));
  if (is_qpu(c.method)) {
    auto qpu = std::make_unique<optim::QpuSgd>(t.model->parameters(), optim::QpuSgdOptions(lr)
                                                                          .momentum(c.momentum)
                                                                          .weight_decay(c.weight_decay)
                                                                          .total_bits(c.param_bits)
                                                                          .frac_bits(c.param_frac)
                                                                          .rounding(update_rounding(c.method))
                                                                          .momentum_form(c.momentum_form)
                                                                          .seed(c.seed));
    for (const auto& p : t.model->packed_storage()) {
      qpu->set_packed_storage(p.parameter, p.codes, p.total_bits, p.frac_bits);
    }
    // Note [CUDA-graph training steps]: step and lr on the device, so a replayed
    // step advances them. Note [Deferred pack checks in training]: a packed
    // step counts NaN updates on the device instead of reading them back.
    qpu->set_capturable(c.cuda_graphs || t.packed);
    if (t.packed) qpu->count_nan_into(t.packed_counts.select(0, 2));
    t.qpu = qpu.get();
    t.optimizer = std::move(qpu);
  } else if (adapt_qpu) {
    const auto defaults = optim::QpuSgdOptions(lr)
                              .momentum(c.momentum)
                              .weight_decay(c.weight_decay)
                              .rounding("stochastic")
                              .momentum_form(c.momentum_form)
                              .seed(c.seed);
    auto qpu = std::make_unique<optim::QpuSgd>(t.adapt->parameter_groups(defaults), defaults);
    // The run's per-parameter statistics read the groups' rows in the model's parameter order.
    std::vector<torch::Tensor> grouped;
    for (const auto& g : qpu->param_groups()) grouped.insert(grouped.end(), g.params().begin(), g.params().end());
    const auto model_params = t.model->parameters();
    bool same_order = grouped.size() == model_params.size();
    for (size_t k = 0; same_order && k < grouped.size(); ++k) same_order = grouped[k].is_same(model_params[k]);
    TORCH_CHECK(same_order, "fxp-train: AdaPT with QPU needs every parameter of ", c.model,
                " in a quantized layer, in the model's order");
    t.adapt->use_quantized_updates(*qpu);
    t.qpu = qpu.get();
    t.optimizer = std::move(qpu);
  } else {
    auto sgd = std::make_unique<torch::optim::SGD>(
        t.model->parameters(), torch::optim::SGDOptions(lr).momentum(c.momentum).weight_decay(c.weight_decay));
    if (t.adapt) t.adapt->use_fused_sgd(*sgd);  // AdaPT's gradient work rides on the update
    t.optimizer = std::move(sgd);
  }
  return t;
}

msq::MsqOptions msq_options(const TrainConfig& c) {
  msq::MsqOptions o;
  o.start_bits = c.msq_start_bits;
  o.min_bits = c.msq_min_bits;
  o.lambda = c.msq_lambda;
  o.alpha = c.msq_alpha;
  o.hessian = c.msq_hessian;
  o.hessian_options = msq::HessianTraceOptions{c.msq_hessian_samples, static_cast<uint64_t>(c.seed)};
  return o;
}

adapt::AdaptOptions adapt_options(const TrainConfig& c) {
  adapt::AdaptOptions o;
  o.start = {c.adapt_start_bits, c.adapt_start_frac};
  o.resolution = {c.adapt_resolution_min, c.adapt_resolution_max};
  o.lookback = {c.adapt_lookback_min, c.adapt_lookback_max};
  o.lookback_momentum = c.adapt_lookback_momentum;
  o.buffer_bits = c.adapt_buffer_bits;
  o.strategy = adapt::strategy_from_string(c.adapt_strategy);
  o.log_form = adapt::log_form_from_string(c.adapt_log);
  o.l1 = c.l1_decay;
  return o;
}

std::vector<std::pair<std::string, torch::Tensor>> named_optimizer_state(const Training& t) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  // In the model's parameter order (the state map's own order follows addresses).
  const auto& state = t.optimizer->state();
  for (const auto& item : t.model->named_parameters()) {
    const auto it = state.find(item.value().unsafeGetTensorImpl());
    if (it == state.end()) continue;
    torch::Tensor momentum;
    if (auto* s = dynamic_cast<optim::QpuSgdParamState*>(it->second.get())) momentum = s->momentum_buffer();
    if (auto* s = dynamic_cast<torch::optim::SGDParamState*>(it->second.get())) momentum = s->momentum_buffer();
    if (momentum.defined()) out.emplace_back("momentum of " + item.key(), momentum);
  }
  if (t.adapt) {
    for (const auto& l : t.adapt->layers()) {
      for (size_t k = 0; k < l.accumulated.size(); ++k) {
        out.emplace_back("AdaPT's accumulated gradient " + std::to_string(k) + " of " + l.name, l.accumulated[k]);
      }
    }
  }
  return out;
}

std::vector<torch::Tensor> optimizer_state(const Training& t) {
  std::vector<torch::Tensor> out;
  for (auto& [name, tensor] : named_optimizer_state(t)) out.push_back(tensor);
  return out;
}

void set_lr(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

}  // namespace fxp::train
