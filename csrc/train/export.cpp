#include "train/export.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "ops/ops.h"
#include "train/io.h"

namespace fxp::train {
namespace {

using json = nlohmann::json;
constexpr char kMagic[] = "FXPMSQ1\n";
constexpr size_t kMagicSize = sizeof(kMagic) - 1;

std::string tensor_bytes(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().cpu().contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.nbytes()));
}

// Every parameter and buffer by name, in the network's order.
std::vector<std::pair<std::string, torch::Tensor>> named_tensors(const nn::NetworkImpl& network) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : network.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : network.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

}  // namespace

ExportSizes export_msq_model(const msq::Controller& controller, const nn::NetworkImpl& network,
                             const std::string& path) {
  std::unordered_map<const c10::TensorImpl*, const msq::MsqLayer*> packed;
  for (const auto& l : controller.layers()) packed[l.weight.unsafeGetTensorImpl()] = &l;
  torch::NoGradGuard no_grad;
  json tensors = json::array();
  std::string payload;
  ExportSizes sizes;
  for (const auto& [name, t] : named_tensors(network)) {
    sizes.model_bytes += static_cast<int64_t>(t.nbytes());
    json entry = {{"name", name}, {"shape", t.sizes().vec()}};
    std::string bytes;
    const auto layer = packed.find(t.unsafeGetTensorImpl());
    if (layer != packed.end()) {
      const msq::MsqLayer& l = *layer->second;
      const torch::Tensor codes = round_clamp_codes(t.detach(), l.scale, l.bits);
      bytes = tensor_bytes(pack_bits(codes, l.bits + 1, /*is_signed=*/true));
      entry.update({{"kind", "packed"}, {"bits", l.bits}, {"scale", l.scale}});
    } else {
      bytes = tensor_bytes(t);
      entry.update({{"kind", "raw"}, {"dtype", c10::toString(t.scalar_type())}});
    }
    entry["bytes"] = bytes.size();
    payload += bytes;
    tensors.push_back(entry);
  }
  const std::string header = json{{"format", "fxp-msq-export"}, {"version", 1}, {"tensors", tensors}}.dump();
  std::string file(kMagic, kMagicSize);
  const uint64_t length = header.size();
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<char>((length >> (8 * i)) & 0xFF));
  file += header;
  file += payload;
  atomic_write(path, file);
  sizes.file_bytes = static_cast<int64_t>(file.size());
  return sizes;
}

void load_msq_export(const std::string& path, nn::NetworkImpl& network) {
  const std::string file = read_text(path);
  const auto refuse = [&](const std::string& why) {
    throw std::invalid_argument("MSQ export " + path + ": " + why);
  };
  if (file.size() < kMagicSize + 8 || file.compare(0, kMagicSize, kMagic) != 0) refuse("not an fxp MSQ export");
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<uint64_t>(static_cast<unsigned char>(file[kMagicSize + i])) << (8 * i);
  if (length > file.size() - kMagicSize - 8) refuse("truncated header");
  json header;
  try {
    header = json::parse(file.substr(kMagicSize + 8, length));
  } catch (const json::exception& e) {
    refuse(std::string("unreadable header (") + e.what() + ")");
  }
  if (!header.is_object() || header.value("format", "") != "fxp-msq-export" || header.value("version", 0) != 1) {
    refuse("not a version 1 fxp-msq-export header");
  }
  size_t offset = kMagicSize + 8 + length;
  std::unordered_map<std::string, torch::Tensor> targets;
  for (auto& [name, t] : named_tensors(network)) targets[name] = t;
  torch::NoGradGuard no_grad;
  for (const auto& entry : header.at("tensors")) {
    const auto name = entry.at("name").get<std::string>();
    const auto shape = entry.at("shape").get<std::vector<int64_t>>();
    const auto bytes = entry.at("bytes").get<size_t>();
    const auto target = targets.find(name);
    if (target == targets.end()) refuse("the network has no tensor " + name);
    torch::Tensor t = target->second;
    targets.erase(target);
    if (t.sizes().vec() != shape) refuse(name + " has shape " + c10::str(c10::IntArrayRef(shape)) + ", the network's " + c10::str(t.sizes()));
    if (bytes > file.size() - offset) refuse("truncated at " + name);
    const auto data = torch::from_blob(const_cast<char*>(file.data() + offset), {static_cast<int64_t>(bytes)},
                                       torch::kUInt8).clone();
    offset += bytes;
    if (entry.at("kind") == "packed") {
      const auto bits = entry.at("bits").get<int64_t>();
      const auto scale = entry.at("scale").get<double>();
      if (bits < 1 || bits > 15 || !(scale > 0) || !std::isfinite(scale)) {
        refuse(name + " has bits " + std::to_string(bits) + " and scale " + std::to_string(scale));
      }
      const double step = scale * std::ldexp(1.0, -static_cast<int>(bits));
      const torch::Tensor codes = unpack_bits(data, bits + 1, shape, /*is_signed=*/true);
      t.copy_((codes.to(torch::kDouble) * step).to(t.scalar_type()));
    } else {
      if (entry.at("dtype").get<std::string>() != c10::toString(t.scalar_type())) {
        refuse(name + " is " + entry.at("dtype").get<std::string>() + ", the network's " + c10::toString(t.scalar_type()));
      }
      if (static_cast<int64_t>(bytes) != static_cast<int64_t>(t.nbytes())) refuse(name + " has the wrong byte count");
      t.copy_(data.view(t.scalar_type()).view(t.sizes()));
    }
  }
  if (offset != file.size()) refuse("bytes after the last tensor");
  if (!targets.empty()) refuse("it lacks the network's " + targets.begin()->first);
}

}  // namespace fxp::train
