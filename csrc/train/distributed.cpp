#include "train/distributed.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

// Note [Gloo's headers]
// LibTorch's wheel ships ProcessGroupGloo.hpp but not the Gloo headers it
// includes, so fxp builds the Gloo backend against Debian's libgloo-dev
// (scripts/gpu_check.sh --prepare copies them into .deps/include). That Gloo
// is older than the one libtorch_cpu was built with, which is safe for what
// this file does: it calls only functions that libtorch_cpu exports
// (ProcessGroupGloo's and its Options' constructors, createDefaultDevice,
// createDeviceForInterface) and the Backend's virtual collectives, and
// ProcessGroupGloo holds Gloo's types only behind shared_ptr and unique_ptr,
// so its layout does not depend on Gloo's version (the header's
// GLOO_STORE_HAS_STORE_V2 guard covers the one API that changed). NCCL's
// header comes with the nvidia-nccl wheel that torch itself depends on.
#if defined(FXP_HAVE_GLOO)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(FXP_HAVE_NCCL)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <map>
#include <stdexcept>

namespace fxp::train {
namespace {

int64_t integer_variable(const std::string& name, const std::string& text) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw std::invalid_argument("distributed: " + name + " must be an integer, but is '" + text + "'");
  }
  return value;
}

// The first of `names` that is set, as (name, value).
std::optional<std::pair<std::string, std::string>> first_set(const EnvironmentLookup& lookup,
                                                             std::initializer_list<const char*> names) {
  for (const char* name : names) {
    if (auto value = lookup(name); value && !value->empty()) return std::make_pair(std::string(name), *value);
  }
  return std::nullopt;
}

}  // namespace

ProcessPlace process_place_from_environment(const EnvironmentLookup& lookup) {
  ProcessPlace place;
  const auto rank = first_set(lookup, {"RANK", "SLURM_PROCID"});
  const auto world = first_set(lookup, {"WORLD_SIZE", "SLURM_NTASKS"});
  if (!rank || !world) {
    throw std::invalid_argument(
        "distributed: this process's rank and the number of processes are not set; launch fxp-train with torchrun "
        "(RANK, WORLD_SIZE), with srun under SLURM (SLURM_PROCID, SLURM_NTASKS), or set RANK and WORLD_SIZE "
        "(docs/train.md)");
  }
  place.rank = integer_variable(rank->first, rank->second);
  place.world_size = integer_variable(world->first, world->second);
  if (place.world_size < 1) throw std::invalid_argument("distributed: " + world->first + " must be at least 1");
  if (place.rank < 0 || place.rank >= place.world_size) {
    throw std::invalid_argument("distributed: " + rank->first + " " + std::to_string(place.rank) +
                                " is outside 0.." + std::to_string(place.world_size - 1) + " (" + world->first +
                                " " + std::to_string(place.world_size) + ")");
  }
  if (const auto local = first_set(lookup, {"LOCAL_RANK", "SLURM_LOCALID"})) {
    place.local_rank = integer_variable(local->first, local->second);
    if (place.local_rank < 0) throw std::invalid_argument("distributed: " + local->first + " must not be negative");
  }
  const auto addr = first_set(lookup, {"MASTER_ADDR"});
  if (!addr) {
    throw std::invalid_argument(
        "distributed: MASTER_ADDR is not set: it names the host of rank 0, which serves the rendezvous. torchrun "
        "sets it; under SLURM, export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) "
        "(scripts/slurm/distributed.sbatch)");
  }
  place.master_addr = addr->second;
  place.master_port = c10d::TCPStoreOptions::kDefaultPort;  // torch.distributed's default, 29500
  if (const auto port = first_set(lookup, {"MASTER_PORT"})) {
    place.master_port = integer_variable(port->first, port->second);
    if (place.master_port < 1 || place.master_port > 65535) {
      throw std::invalid_argument("distributed: MASTER_PORT must be in 1..65535, but is " + port->second);
    }
  }
  // As torch.distributed does under torchrun: the agent's store, and keys per restart.
  place.agent_store = lookup("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  if (const auto restart = first_set(lookup, {"TORCHELASTIC_RESTART_COUNT"})) {
    place.store_prefix = "fxp/attempt_" + std::to_string(integer_variable(restart->first, restart->second));
  }
  return place;
}

ProcessPlace process_place_from_environment() {
  return process_place_from_environment([](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    return value ? std::optional<std::string>(value) : std::nullopt;
  });
}

struct ProcessGroup::Impl {
  int64_t rank = 0, size = 1;
  std::string backend;
  torch::Device device{torch::kCPU};
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> group;
};

namespace {

c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& store, const ProcessPlace& place,
                                               const torch::Device& device, std::chrono::milliseconds timeout) {
  const int rank = static_cast<int>(place.rank), size = static_cast<int>(place.world_size);
  if (device.is_cpu()) {
#if defined(FXP_HAVE_GLOO)
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    // As torch.distributed does: GLOO_SOCKET_IFNAME names the interfaces, else the host name's address.
    if (const char* interfaces = std::getenv("GLOO_SOCKET_IFNAME"); interfaces && *interfaces) {
      std::string list = interfaces;
      for (size_t start = 0; start <= list.size();) {
        const size_t comma = std::min(list.find(',', start), list.size());
        if (comma > start) {
          const std::string interface = list.substr(start, comma - start);
          options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(interface));
        }
        start = comma + 1;
      }
    }
    if (options->devices.empty()) options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
#else
    throw std::invalid_argument(
        "distributed: this fxp-train was built without Gloo's headers, which a CPU run needs (apt-get install "
        "libgloo-dev, or scripts/gpu_check.sh --prepare, then rebuild)");
#endif
  }
  if (device.is_cuda()) {
#if defined(FXP_HAVE_NCCL)
    c10::cuda::set_device(device.index());
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
#else
    throw std::invalid_argument(
        "distributed: this fxp-train was built without NCCL (a CUDA build finds nccl.h in the nvidia-nccl wheel "
        "beside torch), which a CUDA run needs");
#endif
  }
  throw std::invalid_argument("distributed: device " + device.str() + " has no process group backend here");
}

// Tensors grouped by dtype, in order of first appearance.
std::vector<std::vector<torch::Tensor>> by_dtype(const std::vector<torch::Tensor>& tensors) {
  std::vector<std::vector<torch::Tensor>> groups;
  std::map<c10::ScalarType, size_t> index;
  for (const auto& t : tensors) {
    auto [it, added] = index.emplace(t.scalar_type(), groups.size());
    if (added) groups.emplace_back();
    groups[it->second].push_back(t);
  }
  return groups;
}

// Waits for a collective; a failure (most often another rank that stopped)
// becomes an error that says so, without Gloo's or NCCL's source location.
void wait_for_collective(const c10::intrusive_ptr<c10d::Work>& work, int64_t rank, const char* what) {
  try {
    work->wait();
  } catch (const c10::Error& e) {
    throw std::runtime_error("distributed: " + std::string(what) + " failed on rank " + std::to_string(rank) +
                             " (has another rank stopped? its error says why): " + e.what_without_backtrace());
  }
}

}  // namespace

ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() {
  try {
    impl_->group->shutdown();  // NCCL's communicators, before the process exits
  } catch (const std::exception&) {
  }
}

std::shared_ptr<ProcessGroup> ProcessGroup::join(const ProcessPlace& place, const torch::Device& device,
                                                 std::chrono::milliseconds timeout) {
  auto impl = std::make_unique<Impl>();
  impl->rank = place.rank;
  impl->size = place.world_size;
  impl->device = device;
  c10d::TCPStoreOptions options;
  options.port = static_cast<uint16_t>(place.master_port);
  options.isServer = place.rank == 0 && !place.agent_store;
  options.numWorkers = static_cast<size_t>(place.world_size);
  options.timeout = timeout;
  try {
    // Everything this run keeps in the store, the backend's rendezvous too, under
    // the prefix: a restarted torchrun attempt does not read the last one's keys.
    impl->store = c10::make_intrusive<c10d::PrefixStore>(
        place.store_prefix, c10::make_intrusive<c10d::TCPStore>(place.master_addr, options));
  } catch (const std::exception& e) {
    const auto* error = dynamic_cast<const c10::Error*>(&e);
    throw std::runtime_error("distributed: rank " + std::to_string(place.rank) + " could not join the rendezvous at " +
                             place.master_addr + ":" + std::to_string(place.master_port) + ": " +
                             (error ? error->what_without_backtrace() : e.what()));
  }
  impl->group = make_backend(impl->store, place, device, timeout);
  impl->backend = device.is_cpu() ? "gloo" : "nccl";
  return std::shared_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

int64_t ProcessGroup::rank() const { return impl_->rank; }
int64_t ProcessGroup::size() const { return impl_->size; }
const std::string& ProcessGroup::backend() const { return impl_->backend; }

void ProcessGroup::all_reduce_sum(const std::vector<torch::Tensor>& tensors) {
  for (const auto& same_dtype : by_dtype(tensors)) {
    // One collective per dtype: a lone contiguous tensor in place, else a flat copy.
    const bool alone = same_dtype.size() == 1 && same_dtype[0].is_contiguous();
    std::vector<torch::Tensor> flat;
    for (const auto& t : same_dtype) flat.push_back(t.reshape(-1));
    std::vector<torch::Tensor> buffer{alone ? flat[0] : torch::cat(flat)};
    wait_for_collective(impl_->group->allreduce(buffer, c10d::AllreduceOptions{}), impl_->rank, "an all-reduce");
    if (alone) continue;
    int64_t offset = 0;
    for (const auto& t : same_dtype) {
      t.copy_(buffer[0].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

void ProcessGroup::broadcast_from_rank0(const std::vector<torch::Tensor>& tensors) {
  // Bytes, not values: one buffer for every dtype (Gloo cannot send int16),
  // each tensor at an 8-byte aligned offset so that its bytes view back as its dtype.
  c10d::BroadcastOptions options;
  options.rootRank = 0;
  if (tensors.size() == 1 && tensors[0].scalar_type() == torch::kUInt8 && tensors[0].is_contiguous()) {
    std::vector<torch::Tensor> alone{tensors[0].view(-1)};  // already bytes: in place, no copy
    wait_for_collective(impl_->group->broadcast(alone, options), impl_->rank, "a broadcast");
    return;
  }
  auto aligned = [](int64_t bytes) { return (bytes + 7) / 8 * 8; };
  int64_t total = 0;
  for (const auto& t : tensors) total += aligned(t.numel() * t.element_size());
  if (total == 0) return;
  torch::Tensor buffer = torch::empty({total}, torch::dtype(torch::kUInt8).device(impl_->device));
  int64_t offset = 0;
  for (const auto& t : tensors) {
    const int64_t bytes = t.numel() * t.element_size();
    if (bytes > 0) buffer.narrow(0, offset, bytes).copy_(t.contiguous().view(-1).view(torch::kUInt8));
    offset += aligned(bytes);
  }
  std::vector<torch::Tensor> one{buffer};
  wait_for_collective(impl_->group->broadcast(one, options), impl_->rank, "a broadcast");
  offset = 0;
  for (const auto& t : tensors) {
    const int64_t bytes = t.numel() * t.element_size();
    if (bytes > 0) t.copy_(buffer.narrow(0, offset, bytes).view(t.scalar_type()).view(t.sizes()));
    offset += aligned(bytes);
  }
}

void ProcessGroup::publish(const std::string& key, const std::string& value) {
  impl_->store->set(key, std::vector<uint8_t>(value.begin(), value.end()));
}

std::string ProcessGroup::wait_for(const std::string& key) {
  const std::vector<uint8_t> value = impl_->store->get(key);  // waits up to the store's timeout
  return std::string(value.begin(), value.end());
}

std::optional<std::string> ProcessGroup::wait_for(const std::string& key, std::chrono::milliseconds timeout) {
  try {
    impl_->store->wait({key}, timeout);
  } catch (const std::exception&) {  // not there in time, or the store is gone
    return std::nullopt;
  }
  return wait_for(key);
}

const torch::Device& ProcessGroup::device() const { return impl_->device; }

void ProcessGroup::abort() {
  try {
    impl_->group->abort();
  } catch (const std::exception&) {  // aborting is best effort: the error that led here is what matters
  }
}

std::vector<std::string> replica_differences(ProcessGroup& group,
                                             const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  // First the list itself (names, dtypes, sizes), as one fixed-size hash, so
  // that ranks whose lists differ still meet in the same collectives.
  std::string layout;
  for (const auto& [name, t] : named) {
    layout += name + '\t' + c10::toString(t.scalar_type()) + '\t' + std::to_string(t.numel()) + '\n';
  }
  const auto layout_hash = static_cast<int64_t>(std::hash<std::string>{}(layout));
  const torch::Tensor my_layout = torch::full({1}, layout_hash, torch::dtype(torch::kLong).device(group.device()));
  torch::Tensor layout_differs = my_layout.clone();
  group.broadcast_from_rank0({layout_differs});
  layout_differs = layout_differs.ne(my_layout).to(torch::kLong);
  group.all_reduce_sum({layout_differs});
  if (layout_differs.item<int64_t>() > 0) return {"the list of tensors itself (their names, dtypes or sizes)"};

  torch::Tensor differs =
      torch::zeros({static_cast<int64_t>(named.size())}, torch::dtype(torch::kLong).device(group.device()));
  for (size_t k = 0; k < named.size(); ++k) {
    // Bits, not values: NaN equals itself and -0 differs from 0.
    const torch::Tensor mine = named[k].second.detach().contiguous().reshape(-1).view(torch::kUInt8);
    torch::Tensor rank0 = mine.clone();
    group.broadcast_from_rank0({rank0});
    if (!torch::equal(mine, rank0)) differs[static_cast<int64_t>(k)].fill_(1);
  }
  group.all_reduce_sum({differs});
  const torch::Tensor host = differs.cpu();
  std::vector<std::string> names;
  for (size_t k = 0; k < named.size(); ++k) {
    if (host[static_cast<int64_t>(k)].item<int64_t>() > 0) names.push_back(named[k].first);
  }
  return names;
}

}  // namespace fxp::train
