#include "train/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

#include "nn/network.h"
#include "train/io.h"

namespace fxp::train {
namespace {

using nlohmann::json;

// The run's generators (nn::default_generators) under their names in the archive.
std::vector<std::pair<std::string, at::Generator>> run_generators(const torch::Device& device) {
  static const char* const kNames[] = {"rng_cpu", "rng_cuda"};
  std::vector<std::pair<std::string, at::Generator>> named;
  for (at::Generator& g : nn::default_generators(device)) named.emplace_back(kNames[named.size()], g);
  return named;
}

// A checkpoint's archive, after its checksum is verified.
void read_checkpoint(const std::string& path, torch::serialize::InputArchive& archive,
                     const std::optional<torch::Device>& device) {
  const std::string bytes = without_checksum(read_text(path), path);
  archive.load_from(bytes.data(), bytes.size(), device);
}

}  // namespace

void save_checkpoint(const std::string& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                     const adapt::Controller* adapt, const RunState& state, const json& settings,
                     const torch::Device& device, const msq::Controller* msq) {
  torch::serialize::OutputArchive archive;
  torch::serialize::OutputArchive model_archive, optimizer_archive;
  model.save(model_archive);
  optimizer.save(optimizer_archive);
  archive.write("model", model_archive);
  archive.write("optimizer", optimizer_archive);
  if (adapt) {
    torch::serialize::OutputArchive adapt_archive;
    adapt->save(adapt_archive);
    archive.write("adapt", adapt_archive);
  }
  if (msq) {
    torch::serialize::OutputArchive msq_archive;
    for (const auto& [name, tensor] : msq->state()) msq_archive.write(name, tensor);
    archive.write("msq", msq_archive);
  }
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

CheckpointRecord checkpoint_record(const std::string& path) {
  torch::serialize::InputArchive archive;
  read_checkpoint(path, archive, torch::Device(torch::kCPU));
  c10::IValue stored, state;
  if (!archive.try_read("config", stored) || !archive.try_read("state", state)) {
    throw std::invalid_argument("checkpoint " + path + " does not record its run's settings; start again with "
                                "--overwrite");
  }
  return {json::parse(stored.toStringRef()), json::parse(state.toStringRef()).value("epochs_done", int64_t{0})};
}

void load_model_weights(const std::string& path, torch::nn::Module& model) {
  torch::serialize::InputArchive archive, model_archive;
  read_checkpoint(path, archive, torch::Device(torch::kCPU));
  archive.read("model", model_archive);
  // Module::load replaces tensors whatever their shapes: compare them after.
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (const auto& p : model.named_parameters()) shapes.emplace_back(p.key(), p.value().sizes().vec());
  for (const auto& b : model.named_buffers()) shapes.emplace_back(b.key(), b.value().sizes().vec());
  const auto refuse = [&](const std::string& why) {
    throw std::invalid_argument("init_from " + path + " does not hold this model's weights: " + why);
  };
  try {
    model.load(model_archive);
  } catch (const c10::Error& e) {
    refuse(e.what_without_backtrace());
  }
  for (const auto& [name, sizes] : shapes) {
    const auto* p = model.named_parameters().find(name);
    const auto* b = p ? nullptr : model.named_buffers().find(name);
    const torch::Tensor& t = p ? *p : *b;
    if (t.sizes().vec() != sizes) {
      refuse(name + " has shape " + c10::str(t.sizes()) + ", the model's is " + c10::str(c10::IntArrayRef(sizes)));
    }
  }
}

RunState load_checkpoint(const std::string& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                         adapt::Controller* adapt, const torch::Device& device, msq::Controller* msq) {
  torch::serialize::InputArchive archive;
  read_checkpoint(path, archive, device);
  torch::serialize::InputArchive model_archive, optimizer_archive;
  archive.read("model", model_archive);
  archive.read("optimizer", optimizer_archive);
  model.load(model_archive);
  optimizer.load(optimizer_archive);
  if (adapt) {
    torch::serialize::InputArchive adapt_archive;
    archive.read("adapt", adapt_archive);
    adapt->load(adapt_archive);
  }
  if (msq) {
    torch::serialize::InputArchive msq_archive;
    archive.read("msq", msq_archive);
    msq->load_state([&](const std::string& name) {
      torch::Tensor t;
      return msq_archive.try_read(name, t) ? t : torch::Tensor();
    });
  }
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

}  // namespace fxp::train
