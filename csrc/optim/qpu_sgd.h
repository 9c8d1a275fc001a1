// fxp::optim::QpuSgd: SGD with quantized parameter updates (SQPU / HTEQPU) for
// LibTorch, over the fused op fxp::qpu_sgd_step_. The semantics, the random
// streams and the state match fxp.optim.QPUSGD in Python (docs/design.md).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fxp::optim {

struct QpuSgdOptions : public torch::optim::OptimizerCloneableOptions<QpuSgdOptions> {
  explicit QpuSgdOptions(double lr) : lr_(lr) {}
  TORCH_ARG(double, lr);
  TORCH_ARG(double, momentum) = 0;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, nesterov) = false;
  TORCH_ARG(int64_t, total_bits) = 16;  // parameter format FxP(total_bits, frac_bits)
  TORCH_ARG(int64_t, frac_bits) = 10;
  TORCH_ARG(int64_t, momentum_total_bits) = -1;  // -1: the parameter format
  TORCH_ARG(int64_t, momentum_frac_bits) = -1;
  TORCH_ARG(std::string, rounding) = "stochastic";  // or "nearest_even" (HTEQPU)
  TORCH_ARG(std::string, momentum_form) = "standard";  // or "paper_eq6"
  // Philox key of this group; unset: the optimizer's seed (0 if unset too) + the group's index, set when added.
  TORCH_ARG(std::optional<int64_t>, seed) = std::nullopt;
  TORCH_ARG(int64_t, step) = 0;  // steps taken by this group; part of the state

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
  friend bool operator==(const QpuSgdOptions& lhs, const QpuSgdOptions& rhs);
};

struct QpuSgdParamState : public torch::optim::OptimizerCloneableParamState<QpuSgdParamState> {
  TORCH_ARG(torch::Tensor, momentum_buffer);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const QpuSgdParamState& lhs, const QpuSgdParamState& rhs);
};

// Group i's Philox key when the groups share the defaults: seed + i modulo
// 2^64 (as fxp.optim.QPUSGD has it), without signed overflow at INT64_MAX.
inline int64_t group_seed(int64_t seed, size_t group) {
  return static_cast<int64_t>(static_cast<uint64_t>(seed) + static_cast<uint64_t>(group));
}

class QpuSgd : public torch::optim::Optimizer {
 public:
  // Group i without a seed of its own draws with defaults.seed() + i, as in Python. Parameter k of
  // a group draws from stream k (Note [QPU random streams]), whether or not the
  // others have gradients. Strided parameters are updated through a contiguous copy.
  QpuSgd(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, QpuSgdOptions defaults);
  QpuSgd(std::vector<torch::Tensor> params, QpuSgdOptions defaults)
      : QpuSgd({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

  torch::Tensor step(LossClosure closure = nullptr) override;

  // As torch's, and a group without a seed (given without options, or with options whose seed is unset) gets
  // the seed defaults.seed() + its index, as the constructor's groups do (torch's add_param_group is not
  // virtual: call it on a QpuSgd).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  // AdaPT's gradient work fused into the step (Note [AdaPT's fused QPU step]):
  // each gradient is normalized by its group's norm (with L1's term l1) and
  // added to its accumulator as the step applies it; .grad is only read.
  // Group g is one layer: its gradients divide by norms[g]. Float storage,
  // not capturable.
  struct Normalization {
    torch::Tensor norms;  // float64 [groups], as fxp::layer_gradient_norms gives them
    double l1 = 0;
    // [group][parameter]: contiguous, the parameter's shape and dtype
    std::vector<std::vector<torch::Tensor>> accumulated;
  };
  void step_normalized(const Normalization& normalization);

  void save(torch::serialize::OutputArchive& archive) const override;
  // Refuses, leaving this optimizer as it was, a checkpoint of another optimizer, options the step refuses,
  // another format for a group with packed storage, and momentum buffers that do not fit the parameters.
  void load(torch::serialize::InputArchive& archive) override;

  // Packed storage (Note [Packed QPU step]): `parameter` (a stand-in that
  // receives the gradient, see fxp::nn::PackedStorage) holds its value in
  // `codes`, integer codes of FxP(total_bits, frac_bits), which must be its
  // group's format. The step then updates the codes, and its momentum buffer
  // is kept as codes of the momentum format.
  void set_packed_storage(const torch::Tensor& parameter, const torch::Tensor& codes, int64_t total_bits,
                          int64_t frac_bits);

  // Moves group `group` to FxP(total_bits, frac_bits) (AdaPT's precision
  // switch, Note [QPU format change]): its parameters, and its momentum buffers
  // when they follow the parameter format, are rounded onto the new grid with
  // the group's rounding. Not for packed groups.
  void change_format(size_t group, int64_t total_bits, int64_t frac_bits);

  // Per group, after the last step: int64 [n, 2] of (saturated, vanished)
  // elements, one row per parameter of the group in order (zeros for those
  // without a gradient), on the parameters' device.
  const std::vector<torch::Tensor>& last_counts() const { return last_counts_; }

  // Capturable steps (Note [Capturable QPU step]), as fxp.optim.QPUSGD's
  // capturable=True: each group's step and lr live in device tensors, the step
  // reads nothing back to the host, and NaNs that packed storage cannot hold
  // are counted on the device instead of raising: check_nan() raises the
  // plain step's c10::ValueError where the caller synchronizes anyway. The
  // draws and results are the plain step's. Take a step before capturing a
  // CUDA graph (it makes the device tensors); replays do not advance the
  // options' step: sync_steps() copies the device steps back (save() does).
  void set_capturable(bool capturable) { capturable_ = capturable; }
  bool capturable() const { return capturable_; }
  void check_nan();
  // Capturable: add the NaN results to `counter` (0-dim int64 on the
  // parameters' device), which the caller reads with its own counts and
  // zeroes (fxp-train: a slot of the run's counts), instead of a counter of
  // the optimizer's own. check_nan() reads it too.
  void count_nan_into(const torch::Tensor& counter) { nan_count_ = counter; }
  void sync_steps();

 private:
  // The device scalars of group g (capturable steps): made on first use and
  // when the device changes; lr is refilled when the options' lr changes.
  // Also puts nan_count_ on `device`.
  struct DeviceScalars {
    torch::Tensor step, lr;
    double lr_value = 0;
  };
  DeviceScalars& device_scalars(size_t g, const torch::Device& device);
  // The rows of `streams` as an index tensor on `device`, made once per group
  // and set of streams (a host-to-device copy cannot be captured).
  const torch::Tensor& row_index(size_t g, const std::vector<int64_t>& streams, const torch::Device& device);

  void step_groups(const Normalization* normalization);
  // load's checks of what it read; packed_formats: each group's codes' format before (none: not packed).
  using PackedFormat = std::optional<std::pair<int64_t, int64_t>>;  // (total_bits, frac_bits)
  void check_loaded(const std::vector<PackedFormat>& packed_formats) const;

  std::vector<torch::Tensor> last_counts_;
  // Each group's options (step aside) as last checked: step_groups checks a group again only when they changed.
  std::vector<std::optional<QpuSgdOptions>> checked_options_;
  std::unordered_map<c10::TensorImpl*, torch::Tensor> packed_codes_;
  bool capturable_ = false;
  std::unordered_map<size_t, DeviceScalars> device_scalars_;
  std::unordered_map<size_t, std::pair<std::vector<int64_t>, torch::Tensor>> row_indices_;
  torch::Tensor nan_count_;  // capturable: NaN results since the last check_nan

  template <typename Self, typename Archive>
  static void serialize(Self& self, Archive& archive) {
    torch::optim::serialize<QpuSgdParamState, QpuSgdOptions>(archive, self);
  }
};

}  // namespace fxp::optim
