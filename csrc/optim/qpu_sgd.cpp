#include "optim/qpu_sgd.h"

#include <torch/autograd.h>

#include <algorithm>
#include <memory>

#include "ops/backend.h"  // capturing_on
#include "ops/ops.h"
#include "ops/bit_pack/code_storage.h"
#include "ops/format_args.h"  // packed_dtype
#include "ops/qpu_sgd/qpu_sgd_args.h"  // check_no_nan_results

namespace fxp::optim {

void QpuSgdOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(total_bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(frac_bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_total_bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_frac_bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_form);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
}

void QpuSgdOptions::serialize(torch::serialize::InputArchive& archive) {
  // torch's macro asserts on a missing key ("report a bug to PyTorch"): another optimizer's checkpoint.
  const std::vector<std::string> keys = archive.keys();
  for (const char* key : {"lr", "momentum", "weight_decay", "nesterov", "total_bits", "frac_bits", "momentum_total_bits",
                          "momentum_frac_bits", "rounding", "momentum_form", "seed", "step"}) {
    TORCH_CHECK(std::find(keys.begin(), keys.end(), key) != keys.end(), "fxp::optim::QpuSgd: a param group of the "
                "checkpoint lacks '", key, "', which every QpuSgd group has (is it another optimizer's checkpoint?)");
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, total_bits);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, frac_bits);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, momentum_total_bits);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, momentum_frac_bits);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, rounding);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, momentum_form);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG_OPTIONAL(int64_t, seed);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, step);
}

bool operator==(const QpuSgdOptions& a, const QpuSgdOptions& b) {
  return a.lr() == b.lr() && a.momentum() == b.momentum() && a.weight_decay() == b.weight_decay() &&
         a.nesterov() == b.nesterov() && a.total_bits() == b.total_bits() &&
         a.frac_bits() == b.frac_bits() && a.momentum_total_bits() == b.momentum_total_bits() &&
         a.momentum_frac_bits() == b.momentum_frac_bits() && a.rounding() == b.rounding() &&
         a.momentum_form() == b.momentum_form() && a.seed() == b.seed() && a.step() == b.step();
}

void QpuSgdParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
}

void QpuSgdParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, momentum_buffer);
}

bool operator==(const QpuSgdParamState& a, const QpuSgdParamState& b) {
  return torch::equal(a.momentum_buffer(), b.momentum_buffer());
}

namespace {

constexpr const char* kName = "fxp::optim::QpuSgd";
// What to do about a sparse gradient (the op and fxp.optim.QPUSGD say the same).
constexpr const char* kDenseHint = "a sparse gradient, as from nn.Embedding(sparse=True), can be made dense with .to_dense()";

// Note [State made under capture]: a CUDA graph records the kernels that make
// the optimizer's state (the momentum's zeros, the step and lr tensors, the
// row index's copy), so every replay would make it again: the momentum reset
// to zero, the step to its captured count. So the first step with this state
// must be eager, as torch's capture recipe warms up on a side stream.
void refuse_state_under_capture(const torch::Device& device, const char* what) {
  TORCH_CHECK(!capturing_on(device), kName, ": ", what, " is made on the first step that needs it, and a CUDA "
              "graph would make it again at every replay; take that step before capturing (warm up on a side "
              "stream)");
}

int64_t momentum_total_bits(const QpuSgdOptions& o) {
  return o.momentum_total_bits() != -1 ? o.momentum_total_bits() : o.total_bits();
}
int64_t momentum_frac_bits(const QpuSgdOptions& o) {
  return o.momentum_total_bits() != -1 ? o.momentum_frac_bits() : o.frac_bits();
}

// Throws e's message under `context` (its own leading "fxp::qpu_sgd_step_: "
// or "fxp::optim::QpuSgd: " dropped), as a c10::ValueError where e is one.
[[noreturn]] void rethrow_as(const c10::Error& e, const std::string& context) {
  std::string message = e.what_without_backtrace();
  for (const std::string& prefix : {std::string("fxp::qpu_sgd_step_: "), std::string(kName) + ": "}) {
    if (message.rfind(prefix, 0) == 0) message.erase(0, prefix.size());
  }
  if (dynamic_cast<const c10::ValueError*>(&e) != nullptr) TORCH_CHECK_VALUE(false, context, message);
  TORCH_CHECK(false, context, message);
}

// Whether `stored` is packed storage's form for codes of `total_bits` bits:
// integer codes of packed_dtype, or a stream where Note [Bit-stream storage] keeps one.
bool holds_codes_of(const torch::Tensor& stored, int64_t total_bits) {
  return stored.scalar_type() == packed_dtype(static_cast<int>(total_bits)) ||
         (is_bit_stream(stored) && stores_bit_stream(total_bits));
}

// A group's Philox key: add_param_group sets the seeds left unset.
int64_t seed_of(const QpuSgdOptions& o) {
  TORCH_CHECK_VALUE(o.seed().has_value(), kName, ": a param group's seed was unset after the group was added; set "
                    "one (a group added without one draws with the optimizer's seed + its index)");
  return *o.seed();
}

// The op's own checks, on a call without tensors (which does nothing else),
// reported as the optimizer's: the options are what the user set.
void check_options(const QpuSgdOptions& o) {
  // The momentum format is both widths or neither (-1 each): one alone was ignored, or checked as the other.
  const bool total_set = o.momentum_total_bits() != -1, frac_set = o.momentum_frac_bits() != -1;
  TORCH_CHECK_VALUE(total_set == frac_set, kName, ": momentum_total_bits and momentum_frac_bits go together (both -1: "
                    "the parameter format), but got ", o.momentum_total_bits(), " and ", o.momentum_frac_bits());
  try {
    qpu_sgd_step_({}, {}, {}, o.lr(), o.momentum(), o.weight_decay(), o.nesterov(), o.total_bits(), o.frac_bits(),
                  momentum_total_bits(o), momentum_frac_bits(o), o.rounding(), o.seed().value_or(0), 0, o.momentum_form());
  } catch (const c10::Error& e) {
    rethrow_as(e, std::string(kName) + ": ");
  }
}

// An expanded tensor (a zero stride) cannot be updated in place; the usual one
// is a packed layer's stand-in whose codes nobody passed.
bool is_expanded(const torch::Tensor& p) {
  if (p.dim() == 0) return false;
  bool every_stride_zero = true;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.stride(d) == 0 && p.size(d) > 1) return true;
    every_stride_zero = every_stride_zero && p.stride(d) == 0;
  }
  return every_stride_zero;
}
}  // namespace

void QpuSgd::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  const size_t index = param_groups_.size();
  torch::optim::Optimizer::add_param_group(param_group);
  auto& options = static_cast<QpuSgdOptions&>(param_groups_.back().options());
  // Without it, groups would draw with group 0's key: the same rounding for the same data.
  if (!param_group.has_options() || !options.seed()) {
    options.seed(group_seed(static_cast<const QpuSgdOptions&>(defaults()).seed().value_or(0), index));
  }
  try {
    check_options(options);
  } catch (...) {
    param_groups_.pop_back();
    throw;
  }
}

QpuSgd::QpuSgd(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
               QpuSgdOptions defaults)
    : torch::optim::Optimizer(std::vector<torch::optim::OptimizerParamGroup>{},
                              std::make_unique<QpuSgdOptions>(defaults)) {
  check_options(defaults);
  // Through this class's add_param_group (the base constructor would call torch's): each its own seed.
  for (const auto& group : param_groups) add_param_group(group);
}

torch::Tensor QpuSgd::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  step_groups(nullptr);
  return loss;
}

void QpuSgd::step_normalized(const Normalization& normalization) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(!capturable_, kName, ": the normalized step (AdaPT's) has no capturable form");
  TORCH_CHECK(normalization.accumulated.size() == param_groups_.size(), kName, ": the normalized step needs the "
              "accumulators of every group (", param_groups_.size(), "), but got ", normalization.accumulated.size());
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    TORCH_CHECK(normalization.accumulated[g].size() == param_groups_[g].params().size(), kName, ": group ", g,
                " has ", param_groups_[g].params().size(), " parameters, but ", normalization.accumulated[g].size(),
                " accumulators");
  }
  // Refused before any group takes its step (the op would refuse after the step count advanced).
  TORCH_CHECK(packed_codes_.empty(), kName, ": the normalized step (AdaPT's) takes float storage, not packed codes");
  step_groups(&normalization);
}

void QpuSgd::step_groups(const Normalization* normalization) {
  // Before any group steps: every gradient is dense; every group's options pass the op's checks (a value
  // set by hand in a later group would otherwise fail after earlier groups had
  // stepped), checked again only when they changed, and every parameter to
  // update can be written, or has codes.
  checked_options_.resize(param_groups_.size());
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    QpuSgdOptions options = static_cast<const QpuSgdOptions&>(param_groups_[g].options());
    options.step(0);
    if (!checked_options_[g] || !(*checked_options_[g] == options)) {
      check_options(options);
      checked_options_[g] = options;
    }
  }
  last_counts_.clear();
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& group_params = param_groups_[g].params();
    for (size_t k = 0; k < group_params.size(); ++k) {
      const torch::Tensor& p = group_params[k];
      TORCH_CHECK(!p.grad().defined() || p.grad().layout() == torch::kStrided, kName, ": parameter ", k, " of group ",
                  g, " has a ", p.grad().layout(), " gradient; the QPU step takes dense ones (", kDenseHint, ")");
      TORCH_CHECK_VALUE(!p.grad().defined() || packed_codes_.count(p.unsafeGetTensorImpl()) || !is_expanded(p), kName,
                        ": parameter ", k, " of group ", g,
                        " is expanded (a stride is 0), so it cannot be updated in place; a packed layer's stand-in "
                        "needs its codes: set_packed_storage for each of the model's packed_storage()");
    }
  }
  for (size_t group_index = 0; group_index < param_groups_.size(); ++group_index) {
    auto& group = param_groups_[group_index];
    auto& o = static_cast<QpuSgdOptions&>(group.options());
    const int64_t mtb = momentum_total_bits(o), mfb = momentum_frac_bits(o);
    const auto& group_params = group.params();
    std::vector<torch::Tensor> params, grads, buffers, accumulated;
    std::vector<std::pair<torch::Tensor, torch::Tensor>> strided;  // (parameter, its contiguous copy)
    std::vector<int64_t> streams, layers;
    for (size_t k = 0; k < group_params.size(); ++k) {
      const torch::Tensor& p = group_params[k];
      if (!p.grad().defined()) continue;
      const auto packed = packed_codes_.find(p.unsafeGetTensorImpl());
      const bool is_packed = packed != packed_codes_.end();
      // The op takes contiguous storage; a strided parameter is updated in a
      // contiguous copy (logical order, so the draws are those of its values) and copied back.
      torch::Tensor storage = is_packed ? packed->second : p.contiguous();
      if (!storage.is_same(p) && !is_packed) strided.emplace_back(p, storage);
      params.push_back(storage);
      grads.push_back(p.grad().contiguous());
      streams.push_back(static_cast<int64_t>(k));  // Note [QPU random streams]: the position in the group
      if (normalization != nullptr) {
        accumulated.push_back(normalization->accumulated[group_index][k]);
        layers.push_back(static_cast<int64_t>(group_index));
      }
      if (o.momentum() != 0) {
        auto it = state_.find(p.unsafeGetTensorImpl());
        if (it == state_.end()) {
          refuse_state_under_capture(p.device(), "a momentum buffer");
          auto state = std::make_unique<QpuSgdParamState>();
          // Packed: codes of the momentum format, a bit stream where Note [Bit-stream storage] says.
          state->momentum_buffer(is_packed ? stored_zeros(p.sizes(), mtb, p.options())
                                           : torch::zeros_like(p, at::MemoryFormat::Contiguous));
          it = state_.emplace(p.unsafeGetTensorImpl(), std::move(state)).first;
        }
        buffers.push_back(static_cast<QpuSgdParamState&>(*it->second).momentum_buffer());
      }
    }
    if (!params.empty()) {
      // The step counts even if the op raises (Note [Packed QPU step]): the
      // update has happened, and the next step must draw fresh numbers.
      const int64_t step = o.step();
      // Made from the options' step before it advances (first use, or after a load).
      const DeviceScalars* scalars = capturable_ ? &device_scalars(group_index, params[0].device()) : nullptr;
      o.step(step + 1);
      torch::Tensor group_counts;
      if (normalization != nullptr) {
        group_counts = qpu_sgd_step_adapt_(params, grads, buffers, accumulated, normalization->norms, layers,
                                           normalization->l1, o.lr(), o.momentum(), o.weight_decay(), o.nesterov(),
                                           o.total_bits(), o.frac_bits(), mtb, mfb, o.rounding(), seed_of(o), step,
                                           o.momentum_form(), streams);
      } else if (scalars != nullptr) {
        group_counts = qpu_sgd_step_capturable_(params, grads, buffers, scalars->lr, scalars->step, nan_count_,
                                                o.momentum(), o.weight_decay(), o.nesterov(), o.total_bits(),
                                                o.frac_bits(), mtb, mfb, o.rounding(), seed_of(o), o.momentum_form(),
                                                streams);
      } else {
        group_counts = qpu_sgd_step_(params, grads, buffers, o.lr(), o.momentum(), o.weight_decay(), o.nesterov(),
                                     o.total_bits(), o.frac_bits(), mtb, mfb, o.rounding(), seed_of(o), step,
                                     o.momentum_form(), streams);
      }
      for (auto& [parameter, copy] : strided) parameter.copy_(copy);
      if (params.size() == group_params.size()) {
        last_counts_.push_back(group_counts);
      } else {  // a row per parameter of the group; those without a gradient keep zeros
        torch::Tensor counts = torch::zeros({static_cast<int64_t>(group_params.size()), 2}, group_counts.options());
        counts.index_copy_(0, row_index(group_index, streams, counts.device()), group_counts);
        last_counts_.push_back(counts);
      }
    } else {  // no gradients: zeros, on the device the counts of other groups are on
      const auto device = group_params.empty() ? torch::Device(torch::kCPU) : group_params[0].device();
      last_counts_.push_back(
          torch::zeros({static_cast<int64_t>(group_params.size()), 2}, torch::dtype(torch::kLong).device(device)));
    }
  }
}

void QpuSgd::set_packed_storage(const torch::Tensor& parameter, const torch::Tensor& codes, int64_t total_bits,
                                int64_t frac_bits) {
  bool found = false;
  for (const auto& group : param_groups_) {
    for (const auto& p : group.params()) {
      if (!p.is_same(parameter)) continue;
      const auto& o = static_cast<const QpuSgdOptions&>(group.options());
      // The codes' format is the group's: the step reads and writes them in it.
      TORCH_CHECK(total_bits == o.total_bits() && frac_bits == o.frac_bits(), kName, ": the codes are of FxP(",
                  total_bits, ",", frac_bits, "), but the parameter's group updates FxP(", o.total_bits(), ",",
                  o.frac_bits(), ")");
      const auto expected = packed_dtype(static_cast<int>(o.total_bits()));
      TORCH_CHECK(holds_codes_of(codes, o.total_bits()), kName, ": codes of FxP(", o.total_bits(), ",",
                  o.frac_bits(), ") must be ", expected,
                  stores_bit_stream(o.total_bits()) ? " or a uint8 bit stream" : "", ", but got ",
                  codes.scalar_type());
      check_stored_codes(kName, "codes", codes, o.total_bits(), parameter.sym_sizes());
      // Refused here, not at the first step (the op's "params[0] must be contiguous").
      TORCH_CHECK(codes.is_contiguous(), kName, ": the codes must be contiguous (the step updates them in place, in "
                  "row-major order)");
      found = true;
    }
  }
  TORCH_CHECK(found, kName, ": set_packed_storage got a parameter this optimizer does not hold");
  packed_codes_[parameter.unsafeGetTensorImpl()] = codes;
}

// Note [QPU format change] (ops/qpu_sgd/qpu_sgd_register.cpp): the group's
// parameters, and its momentum buffers when they follow the parameter format,
// rounded onto the new grid by fxp::qpu_change_format_. The momentum follows
// when its format is the parameters' (unset, or set to the same), as
// fxp.optim.QPUSGD.change_format has it; another momentum format stays.
void QpuSgd::change_format(size_t group, int64_t total_bits, int64_t frac_bits) {
  TORCH_CHECK(group < param_groups_.size(), kName, ": change_format of group ", group, ", but there are ",
              param_groups_.size());
  auto& o = static_cast<QpuSgdOptions&>(param_groups_[group].options());
  const bool follows = o.momentum_total_bits() == -1 ||
                       (o.momentum_total_bits() == o.total_bits() && o.momentum_frac_bits() == o.frac_bits());
  QpuSgdOptions changed = o;
  changed.total_bits(total_bits).frac_bits(frac_bits);
  if (follows && o.momentum_total_bits() != -1) changed.momentum_total_bits(total_bits).momentum_frac_bits(frac_bits);
  check_options(changed);
  const auto& params = param_groups_[group].params();
  for (const auto& p : params) {  // before anything changes
    TORCH_CHECK(!packed_codes_.count(p.unsafeGetTensorImpl()), kName,
                ": change_format cannot change the format of packed storage");
  }
  std::vector<torch::Tensor> buffers;
  std::vector<int64_t> positions;
  if (follows) {
    for (size_t k = 0; k < params.size(); ++k) {
      const auto it = state_.find(params[k].unsafeGetTensorImpl());
      if (it == state_.end()) continue;
      buffers.push_back(static_cast<QpuSgdParamState&>(*it->second).momentum_buffer());
      positions.push_back(static_cast<int64_t>(k));
    }
  }
  torch::NoGradGuard no_grad;
  fxp::qpu_change_format_(params, buffers, positions, total_bits, frac_bits, o.rounding(), seed_of(o), o.step());
  o = changed;
}

QpuSgd::DeviceScalars& QpuSgd::device_scalars(size_t g, const torch::Device& device) {
  auto& o = static_cast<QpuSgdOptions&>(param_groups_[g].options());
  DeviceScalars& scalars = device_scalars_[g];
  const auto missing = [&](const torch::Tensor& t) { return !t.defined() || t.device() != device; };
  if (missing(scalars.step) || missing(scalars.lr) || missing(nan_count_)) {
    refuse_state_under_capture(device, "the capturable step's step, lr or NaN count");
  }
  if (missing(scalars.step)) scalars.step = torch::full({}, o.step(), torch::dtype(torch::kLong).device(device));
  if (missing(scalars.lr)) {
    scalars.lr = torch::full({}, o.lr(), torch::dtype(torch::kFloat64).device(device));
    scalars.lr_value = o.lr();
  } else if (scalars.lr_value != o.lr()) {  // a scheduler's change; a fill, no host read
    scalars.lr.fill_(o.lr());
    scalars.lr_value = o.lr();
  }
  if (missing(nan_count_)) nan_count_ = torch::zeros({}, torch::dtype(torch::kLong).device(device));
  return scalars;
}

const torch::Tensor& QpuSgd::row_index(size_t g, const std::vector<int64_t>& streams, const torch::Device& device) {
  auto& entry = row_indices_[g];
  if (entry.first != streams || !entry.second.defined() || entry.second.device() != device) {
    refuse_state_under_capture(device, "the index of the parameters with gradients");
    entry = {streams, torch::tensor(streams, torch::kLong).to(device)};
  }
  return entry.second;
}

void QpuSgd::check_nan() {
  if (!nan_count_.defined()) return;
  const int64_t nans = nan_count_.item<int64_t>();
  nan_count_.zero_();
  check_no_nan_results(nans);
}

void QpuSgd::sync_steps() {
  for (auto& [g, scalars] : device_scalars_) {
    if (!scalars.step.defined()) continue;
    static_cast<QpuSgdOptions&>(param_groups_[g].options()).step(scalars.step.item<int64_t>());
  }
}

void QpuSgd::save(torch::serialize::OutputArchive& archive) const {
  const_cast<QpuSgd*>(this)->sync_steps();  // the device steps are the truth after graph replays
  serialize(*this, archive);
}

void QpuSgd::load(torch::serialize::InputArchive& archive) {
  // torch's serialize replaces the groups' options and the state it reads, and
  // keeps state the checkpoint lacks: a checkpoint refused below (or half read)
  // leaves this optimizer as it was, from a snapshot of both taken first (the
  // state's tensors themselves, not copies: a captured graph may hold them).
  std::vector<PackedFormat> packed_formats;  // per group: its codes' format, where it holds packed storage
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options_before;
  for (const auto& group : param_groups_) {
    const auto& o = static_cast<const QpuSgdOptions&>(group.options());
    const bool packed = std::any_of(group.params().begin(), group.params().end(), [&](const torch::Tensor& p) {
      return packed_codes_.count(p.unsafeGetTensorImpl()) > 0;
    });
    packed_formats.push_back(packed ? PackedFormat({o.total_bits(), o.frac_bits()}) : std::nullopt);
    options_before.push_back(group.options().clone());
  }
  decltype(state_) state_before;
  for (const auto& [key, value] : state_) state_before.emplace(key, value->clone());
  try {
    serialize(*this, archive);
    check_loaded(packed_formats);
  } catch (...) {
    for (size_t g = 0; g < param_groups_.size(); ++g) param_groups_[g].set_options(std::move(options_before[g]));
    state_ = std::move(state_before);
    throw;
  }
  checked_options_.clear();
  device_scalars_.clear();  // made again from the loaded steps
}

void QpuSgd::check_loaded(const std::vector<PackedFormat>& packed_formats) const {
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const auto& o = static_cast<const QpuSgdOptions&>(param_groups_[g].options());
    try {
      check_options(o);
    } catch (const c10::Error& e) {
      rethrow_as(e, std::string(kName) + ": the checkpoint's group " + std::to_string(g) +
                        " has options the step refuses: ");
    }
    TORCH_CHECK_VALUE(o.seed().has_value(), kName, ": the checkpoint's group ", g, " has no seed (every saved group "
                      "has one: is it another program's checkpoint?)");
    // Codes are in the format they were stored in: read in another, every value would be rescaled.
    // (Float storage may load another format: AdaPT's QPU groups change theirs as they train.)
    const PackedFormat& was = packed_formats.at(g);
    TORCH_CHECK(!was || *was == std::pair(o.total_bits(), o.frac_bits()), kName, ": the checkpoint's group ", g,
                " has format FxP(", o.total_bits(), ",", o.frac_bits(), "), but its packed storage holds codes of FxP(",
                was ? was->first : 0, ",", was ? was->second : 0, ")");
    const auto& params = param_groups_[g].params();
    for (size_t k = 0; k < params.size(); ++k) {
      const torch::Tensor& p = params[k];
      const auto it = state_.find(p.unsafeGetTensorImpl());
      if (it == state_.end()) continue;
      const torch::Tensor& buffer = static_cast<const QpuSgdParamState&>(*it->second).momentum_buffer();
      if (!buffer.defined()) continue;
      const bool packed = packed_codes_.count(p.unsafeGetTensorImpl()) > 0;
      if (packed) {
        const int64_t mtb = momentum_total_bits(o);
        const auto expected = packed_dtype(static_cast<int>(mtb));
        TORCH_CHECK(holds_codes_of(buffer, mtb), kName,
                    ": the checkpoint's momentum buffer of parameter ", k, " of group ", g, " is ",
                    buffer.scalar_type(), ", but the momentum of packed storage is ", expected, " codes",
                    stores_bit_stream(mtb) ? " or a uint8 bit stream of them" : "");
        const std::string name = "the checkpoint's momentum buffer of parameter " + std::to_string(k) + " of group " +
                                 std::to_string(g);
        check_stored_codes(kName, name.c_str(), buffer, mtb, p.sym_sizes());
      } else {
        TORCH_CHECK(buffer.scalar_type() == p.scalar_type() && buffer.sizes() == p.sizes(), kName,
                    ": the checkpoint's momentum buffer of parameter ", k, " of group ", g, " is ",
                    buffer.scalar_type(), " of shape ", buffer.sizes(), ", but the parameter is ", p.scalar_type(),
                    " of shape ", p.sizes());
      }
    }
  }
}

}  // namespace fxp::optim
