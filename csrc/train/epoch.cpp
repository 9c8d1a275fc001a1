#include "train/epoch.h"

#include <ATen/CPUGeneratorImpl.h>

#if defined(FXP_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "train/progress.h"

namespace fxp::train {
namespace {

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

// The memory of one training step (docs/memory.md): what the allocator holds
// before it, what the forward leaves for the backward, the gradients, the
// model and the optimizer state after it, and the step's peak.
class StepProbe {
 public:
  StepProbe(Training& t, const torch::Device& device) : t_(t), device_(device) {
    state_before_ = storage_bytes(optimizer_state(t));
    reset_allocator_peak(device);
    before_ = allocator_bytes(device);
  }
  void after_forward() {
    memory_.activations = allocator_bytes(device_).current - before_.current;
  }
  void after_backward() { memory_.gradients = storage_bytes(gradients(*t_.model)); }
  StepMemory after_step() {
    memory_.parameters = storage_bytes(parameters_and_buffers(*t_.model));
    memory_.optimizer_state = storage_bytes(optimizer_state(t_));
    // Everything the step allocated on top of what it found, plus the resident model.
    memory_.step_peak = allocator_bytes(device_).peak - before_.current + memory_.parameters + state_before_;
    return memory_;
  }

 private:
  Training& t_;
  const torch::Device& device_;
  AllocatorBytes before_;
  int64_t state_before_ = 0;
  StepMemory memory_{0, 0, 0, 0, 0};
};

// Note [Data-parallel steps]
// With --distributed, batch_size is the global batch. Batch b of the epoch's
// order (the same order on every rank) is split into contiguous shares:
// rank r of W takes positions [start + size*r/W, start + size*(r+1)/W).
// - Gradients. A rank's loss is its share's summed per-image losses divided
//   by the global batch's size, so each image's gradient gets the factor that
//   one process's mean gives it. One all-reduce (a sum; one flat buffer per
//   dtype) then leaves every rank the global batch's gradient. Gloo and NCCL
//   both send each reduced chunk to all ranks, so the sum is bit-identical on
//   every rank; it differs from one process's gradient only in the order of
//   the summation.
// - Steps. So every rank takes the same optimizer step, and the QPU step's
//   stochastic rounding, keyed by (seed, step) and not by the rank, rounds
//   the same way everywhere: the replicas stay bit-identical without
//   broadcasting parameters after the first time (run.cpp checks every epoch).
// - What would still differ is made the same. Batch norm's running
//   statistics come from each rank's share, so rank 0's are broadcast after
//   each step, as DDP's broadcast_buffers does. MSQ's penalty is added on
//   one rank alone, so the sum counts it once: the last, whose share is never
//   empty (the penalty reads what the forward quantized). AdaPT's strategy
//   reads the global batch's mean loss (one more all-reduce). Packed
//   storage's counts are summed across ranks, and checked after the same
//   steps on every rank.
// - Draws. During an epoch's training, each rank's default generators (the
//   forward's stochastic rounding: activations, STE's and AdaPT's weight
//   reads) are seeded from (seed, epoch, rank), so the shares do not share
//   rounding noise. After it, every rank is seeded from (seed, epoch) alone,
//   so batch norm recalibration and MSQ's check draw alike on every rank and
//   agree without communicating (validation is sharded and summed). A resumed run seeds the same
//   way, so it stays bit-identical to an uninterrupted one.
// A rank whose share of a short last batch is empty runs no forward and adds
// zero gradients. Every parameter leaves the all-reduce with a gradient (zero
// if no rank gave it one), so the step's weight decay and momentum reach a
// parameter one process would skip; fxp's models use every parameter.

// This rank's share of the global batch [start, start + size).
std::pair<int64_t, int64_t> rank_share(const Training& t, int64_t start, int64_t size) {
  if (!t.data_parallel) return {start, size};
  const int64_t r = t.data_parallel->rank(), w = t.data_parallel->size();
  const int64_t begin = start + size * r / w, end = start + size * (r + 1) / w;
  return {begin, end - begin};
}

void seed_forward_generators(const torch::Device& device, uint64_t seed) {
  for (at::Generator& g : nn::default_generators(device)) {
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_current_seed(seed);
  }
}

// Forward, backward and the optimizer's step on one batch (this rank's share
// of a global batch of global_size images); returns the float64 sum of the
// images' losses.
torch::Tensor train_step(Training& t, const torch::Tensor& x, const torch::Tensor& y, int64_t global_size,
                         StepProbe* probe) {
  ProcessGroup* group = t.data_parallel.get();
  torch::Tensor loss, loss_sum;  // what backward starts from; the reported sum
  if (!group) {
    loss = torch::nn::functional::cross_entropy(t.model->forward(x), y);
    loss_sum = loss.detach().to(torch::kFloat64) * static_cast<double>(x.size(0));
  } else if (x.size(0) > 0) {  // Note [Data-parallel steps]
    const torch::Tensor share_sum = torch::nn::functional::cross_entropy(
        t.model->forward(x), y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    loss = share_sum / static_cast<double>(global_size);
    loss_sum = share_sum.detach().to(torch::kFloat64);
  } else {
    loss_sum = torch::zeros({}, torch::dtype(torch::kFloat64).device(x.device()));
  }
  if (probe) probe->after_forward();
  if (t.msq && (!group || group->rank() == group->size() - 1)) {  // the last rank's share is never empty
    const torch::Tensor penalty = t.msq->penalty();
    (loss.defined() ? loss + penalty : penalty).backward();  // the reported loss stays the task's
  } else if (loss.defined()) {
    loss.backward();
  }
  if (probe) probe->after_backward();
  if (group) {
    std::vector<torch::Tensor> grads;
    for (auto& p : t.model->parameters()) {
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      grads.push_back(p.grad());
    }
    group->all_reduce_sum(grads);
  }
  if (t.adapt) {
    double mean_loss = 0;  // syncs: the strategy needs the loss
    if (group) {
      const torch::Tensor global_sum = loss_sum.clone();
      group->all_reduce_sum({global_sum});
      mean_loss = global_sum.item<double>() / static_cast<double>(global_size);
    } else {
      mean_loss = loss.item<double>();
    }
    t.adapt->step(mean_loss, global_size, *t.optimizer);
  } else {
    t.optimizer->step();
  }
  if (group && t.model->has_batch_norm()) group->broadcast_from_rank0(t.model->batch_norm_statistics());
  return loss_sum;
}

// Note [Deferred pack checks in training]
// Packed storage cannot hold NaN, and a saved layer input must lie on its
// format's grid. Checked at each step, that costs a device-to-host read per
// packed layer and step on CUDA, and it cannot be captured in a CUDA graph. So
// a packed run's steps only count, on the device, into Training::packed_counts:
// each layer's saved-input pack (Note [Deferred pack checks]) and the
// capturable QpuSgd's NaN updates. The epoch reads it (one read) after
// every step on the CPU, where reading is free; on a device at most every
// kPackedCheckInterval, whether or not a progress bar draws; and at its end.
// A distributed run sums the counts across ranks at each check, and checks
// after the same steps on every rank: every step on the CPU, every
// kDistributedPackedCheckSteps on a device.
// A count that is not 0 ends the epoch there as a diverged run
// (non_finite_loss): at most kPackedCheckInterval of steps after the NaN,
// not at the step. Any other error of a step propagates.
constexpr std::chrono::milliseconds kPackedCheckInterval{100};
constexpr int64_t kDistributedPackedCheckSteps = 16;

// What the packed run's steps since the last read could not store, if
// anything (and the counts start again from 0).
std::optional<std::string> packed_storage_problem(Training& t) {
  // The NaN updates are the same on every rank (the step is), the saved inputs are each rank's own.
  if (t.data_parallel) t.data_parallel->all_reduce_sum({t.packed_counts.narrow(0, 0, 2)});
  const torch::Tensor host = t.packed_counts.cpu();  // on the CPU, the tensor itself
  const int64_t* n = host.const_data_ptr<int64_t>();
  const int64_t nan_inputs = n[0], off_grid = n[1], nan_updates = n[2];  // read before the zeroing
  if (nan_inputs == 0 && off_grid == 0 && nan_updates == 0) return std::nullopt;
  t.packed_counts.zero_();
  return c10::str("packed storage cannot hold what the steps since the last check made: ", nan_inputs,
                  " saved layer-input elements were NaN, ", off_grid, " were off their format's grid, and ",
                  nan_updates, " updated values were NaN (those elements kept their previous codes)");
}

class PackedStorageCheck {
 public:
  PackedStorageCheck(Training& t, const torch::Device& device) : t_(t), every_step_(device.is_cpu()) {}
  // After step `step` (0-based) of the epoch: a read when one is due.
  std::optional<std::string> after_step(int64_t step) {
    if (!t_.packed) return std::nullopt;
    if (t_.data_parallel) {
      const bool due = every_step_ || (step + 1) % kDistributedPackedCheckSteps == 0;  // the same on every rank
      return due ? packed_storage_problem(t_) : std::nullopt;
    }
    const auto now = std::chrono::steady_clock::now();
    if (!every_step_ && now - last_ < kPackedCheckInterval) return std::nullopt;
    last_ = now;
    return packed_storage_problem(t_);
  }
  std::optional<std::string> at_end() { return t_.packed ? packed_storage_problem(t_) : std::nullopt; }

 private:
  Training& t_;
  bool every_step_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

// The epoch's sums after a step: the batch's summed loss and, for QPU, the
// update counts, one row per parameter in the model's order (the optimizer's
// groups hold the model's parameters in order; rows of parameters without a
// gradient are zero).
void add_to_sums(const Training& t, const torch::Tensor& batch_loss_sum, torch::Tensor& loss_sum,
                 torch::Tensor& update_counts) {
  loss_sum.add_(batch_loss_sum);
  if (t.qpu) update_counts.add_(torch::cat(t.qpu->last_counts()));
}

// Note [CUDA-graph training steps]
// With cuda_graphs an epoch runs on a side stream. Its first
// kGraphWarmupSteps batches run eagerly (PyTorch asks for warm-up steps on
// the capturing stream: lazy initializations such as cuBLAS's workspace
// happen there), then one full batch is captured as a CUDA graph of the whole
// step: the batch's rows of the epoch's order (positions in a static tensor,
// which the graph then advances by a batch), the gather, forward, backward,
// the optimizer's step and the epoch's sums. So each later full batch is one
// replay and nothing else; a short last batch runs eagerly. The graph is captured anew each epoch, so nothing the
// host changes between epochs (a schedule's lr, batch norm recalibration, the
// order, the sums) is stale in it.
// A replay does what an eager step does, kernel for kernel:
// - zero_grad leaves the gradients undefined before the capture, so the
//   captured backward writes them afresh, as an eager step's does;
// - stochastic rounding draws from the default CUDA generator, which
//   CUDAGraph::capture_begin registers: a replay reads the generator's offset
//   and advances it by the graph's total, as the eager calls would (PhiloxCudaState);
// - QpuSgd is capturable (Note [Capturable QPU step]): its step count and lr
//   live on the device, and the step advances the count there; torch's SGD
//   (fp32, ste) reads only the lr, which is fixed within an epoch.
// So a run is meant to give the same bits with and without graphs
// (test_fxp_train.py compares them on a GPU; it has not run on one yet). What
// reads the device from the host within a step is refused by
// TrainConfig::validate: AdaPT (the loss), MSQ. Packed storage reads nothing
// back within a step (Note [Deferred pack checks in training]).
// Memory: the side stream is the run's (Training::graph_stream), so its cuBLAS
// workspace and cached blocks serve every epoch; each epoch's graph has its own
// pool, released by emptyCache before the next capture, when the graph is gone
// and the steps in between have dropped its gradients and counts.
constexpr int64_t kGraphWarmupSteps = 3;

#if defined(FXP_WITH_CUDA)
// Moves the work of its lifetime to a side stream, ordered after the work
// queued before it and before the work queued after it.
class SideStream {
 public:
  SideStream(const torch::Device& device, const c10::Stream& side)
      : origin_(at::cuda::getCurrentCUDAStream(device.index())), side_(at::cuda::CUDAStream(side)) {
    wait(side_, origin_);
    guard_.emplace(side_);
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  ~SideStream() {
    guard_.reset();
    try {
      wait(origin_, side_);
    } catch (...) {  // a CUDA error here has been reported by the work that caused it
    }
  }

 private:
  static void wait(const at::cuda::CUDAStream& waiter, const at::cuda::CUDAStream& on) {
    at::cuda::CUDAEvent event;
    event.record(on);
    event.block(waiter);
  }
  at::cuda::CUDAStream origin_, side_;
  std::optional<c10::cuda::CUDAStreamGuard> guard_;
};

struct CapturedStep {
  at::cuda::CUDAGraph graph;
  torch::Tensor positions;  // the next replay's positions in the epoch's order, advanced by each replay
};

// Captures the step of the full batches from position `start` of `order` on
// (not run yet: each replay runs the next batch).
std::unique_ptr<CapturedStep> capture_step(Training& t, const Split& train, const torch::Tensor& order,
                                           int64_t start, int64_t batch_size, torch::Tensor& loss_sum,
                                           torch::Tensor& update_counts, const torch::Device& device) {
  auto captured = std::make_unique<CapturedStep>();
  captured->positions = torch::arange(start, start + batch_size, order.options());
  t.optimizer->zero_grad();  // undefined: the captured backward allocates them in the graph's pool
  c10::cuda::CUDACachingAllocator::emptyCache();  // the previous epoch's graph pool, now unused
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  try {
    captured->graph.capture_begin();
    const torch::Tensor index = order.index_select(0, captured->positions);
    const torch::Tensor x = train.images.index_select(0, index), y = train.labels.index_select(0, index);
    add_to_sums(t, train_step(t, x, y, batch_size, nullptr), loss_sum, update_counts);
    captured->positions.add_(batch_size);
    captured->graph.capture_end();
  } catch (const std::exception& e) {
    // Leave the stream out of capture mode, so that the error, not a later
    // "operation not permitted when stream is capturing", is what the user sees.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone) {
      cudaGraph_t partial = nullptr;
      if (cudaStreamEndCapture(stream, &partial) == cudaSuccess && partial != nullptr) cudaGraphDestroy(partial);
    }
    (void)cudaGetLastError();
    const auto* error = dynamic_cast<const c10::Error*>(&e);
    throw std::runtime_error(std::string("cuda_graphs: the training step could not be captured as a CUDA graph: ") +
                             (error ? error->what_without_backtrace() : e.what()));
  }
  return captured;
}
#endif

}  // namespace

// Note [Shuffling]: the order of epoch e is randperm from a generator seeded
// with mix_seed(seed, e) alone, so a resumed run shuffles exactly as an
// uninterrupted one, without checkpointing a generator.
torch::Tensor epoch_order(int64_t seed, int64_t epoch, int64_t n, const torch::Device& device) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(mix_seed(static_cast<uint64_t>(seed), epoch));
  return torch::randperm(n, generator, torch::kLong).to(device);
}

void msq_end_epoch(Training& t, const Split& train, const TrainConfig& c, int64_t epoch) {
  if (!t.msq || t.msq->frozen() || train.size() == 0) return;
  const int64_t last_pruning_epoch = c.epochs - c.msq_finetune_epochs;
  if (epoch <= last_pruning_epoch && epoch % c.msq_check_every == 0) {
    const torch::Tensor order = epoch_order(c.seed, epoch, train.size(), train.images.device());
    const torch::Tensor index = order.narrow(0, 0, std::min(c.batch_size, train.size()));
    const torch::Tensor x = train.images.index_select(0, index), y = train.labels.index_select(0, index);
    t.model->eval();
    t.msq->check([&] { return torch::nn::functional::cross_entropy(t.model->forward(x), y); },
                 mix_seed(static_cast<uint64_t>(c.seed) ^ 0x4D5351ull, static_cast<uint64_t>(epoch)));
    t.model->train();
  }
  if (c.msq_finetune_epochs > 0 && epoch >= last_pruning_epoch) t.msq->freeze();
}

void recalibrate_batch_norm(Training& t, const Split& train, const TrainConfig& c, int64_t epoch) {
  if (c.bn_recalibration_batches == 0 || train.size() == 0) return;
  const torch::Tensor order = epoch_order(c.seed, epoch, train.size(), train.images.device());
  // Full batches only: the cumulative average (momentum None) weights every
  // batch alike, so a short last batch would count as much as a full one.
  const int64_t batches = std::min(c.bn_recalibration_batches, std::max<int64_t>(1, train.size() / c.batch_size));
  t.model->recalibrate_batch_norm(batches, [&](int64_t b) {
    const int64_t start = b * c.batch_size;
    return train.images.index_select(0, order.narrow(0, start, std::min(c.batch_size, train.size() - start)));
  });
}

EpochResult train_epoch(Training& t, const Split& train, const TrainConfig& c, int64_t epoch,
                        const torch::Device& device, std::optional<StepMemory>& step_memory,
                        const RunOptions& options) {
  t.model->train();
  const int64_t n_tensors = static_cast<int64_t>(t.model->parameters().size());
  const int64_t batches = (train.size() + c.batch_size - 1) / c.batch_size;
  const torch::Tensor order = epoch_order(c.seed, epoch, train.size(), device);
  torch::Tensor loss_sum = torch::zeros({}, torch::TensorOptions(torch::kFloat64).device(device));
  EpochResult result{0, torch::zeros({n_tensors, 2}, torch::TensorOptions(torch::kLong).device(device)), batches,
                     false};
  // Note [CUDA-graph training steps]: full batches from kGraphWarmupSteps on replay a captured step.
  const int64_t full_batches = train.size() / c.batch_size;
  const bool graphs = c.cuda_graphs && full_batches > kGraphWarmupSteps;
#if defined(FXP_WITH_CUDA)
  std::optional<SideStream> side_stream;
  if (graphs) {
    if (!t.graph_stream) t.graph_stream = at::cuda::getStreamFromPool(false, device.index());
    side_stream.emplace(device, *t.graph_stream);
  }
  std::unique_ptr<CapturedStep> captured;
#else
  if (graphs) throw std::invalid_argument("cuda_graphs: this fxp build has no CUDA support");
#endif
  // Note [Data-parallel steps]: each rank's own draws while it trains, the shared ones after.
  const uint64_t epoch_seed = mix_seed(static_cast<uint64_t>(c.seed), static_cast<uint64_t>(epoch));
  if (t.data_parallel) {
    seed_forward_generators(device, mix_seed(epoch_seed, static_cast<uint64_t>(t.data_parallel->rank()) + 1));
  }
  // Note [Deferred pack checks in training]: a problem ends the epoch, and the run, as diverged.
  PackedStorageCheck packed_check(t, device);
  auto stop_if = [&](const std::optional<std::string>& problem) {
    if (!problem) return;
    if (options.log) *options.log << "stopping: " << *problem << "\n";
    result.diverged = true;
  };
  ProgressBar bar(options.progress, "epoch " + std::to_string(epoch) + "/" + std::to_string(c.epochs), batches);
  int64_t images_here = 0;  // this rank's images so far (all of them in one process)
  for (int64_t b = 0; b < batches && !result.diverged; ++b) {
    const int64_t start = b * c.batch_size, size = std::min(c.batch_size, train.size() - start);
    const auto [share_start, share_size] = rank_share(t, start, size);  // Note [Data-parallel steps]
    images_here += share_size;
    // The session's second step (its first, if an epoch has one batch), so the
    // momentum buffers exist and the previous gradients are gone.
    if (graphs && b >= kGraphWarmupSteps && b < full_batches) {
#if defined(FXP_WITH_CUDA)
      if (!captured) {
        captured = capture_step(t, train, order, start, c.batch_size, loss_sum, result.update_counts, device);
      }
      captured->graph.replay();
      ++result.graph_steps;
#endif
    } else {
      t.optimizer->zero_grad();
      std::optional<StepProbe> probe;
      if (!step_memory.has_value() && (b == 1 || batches == 1)) probe.emplace(t, device);
      const torch::Tensor index = order.narrow(0, share_start, share_size);
      const torch::Tensor x = train.images.index_select(0, index), y = train.labels.index_select(0, index);
      const torch::Tensor batch_loss_sum = train_step(t, x, y, size, probe ? &*probe : nullptr);
      if (probe) step_memory = probe->after_step();
      add_to_sums(t, batch_loss_sum, loss_sum, result.update_counts);
    }
    stop_if(packed_check.after_step(b));
    bar.update(b + 1, [&] {
      return loss_sum.item<double>() / static_cast<double>(std::max<int64_t>(images_here, 1));
    });
  }
  if (!result.diverged) stop_if(packed_check.at_end());
  bar.finish();
  if (t.data_parallel) {
    t.data_parallel->all_reduce_sum({loss_sum});  // each rank summed its shares
    seed_forward_generators(device, epoch_seed);
  }
  result.loss = result.diverged ? std::numeric_limits<double>::quiet_NaN()
                                : loss_sum.item<double>() / static_cast<double>(train.size());
  return result;
}

}  // namespace fxp::train
