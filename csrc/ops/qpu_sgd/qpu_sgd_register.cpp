// The fused QPU SGD step's registrations, both forms: CPU, Meta, the call without
// tensors, and Autograd (CUDA in qpu_sgd_register_cuda.cpp). The op is written once in qpu_sgd_op.h.
#include <torch/library.h>

#include <ATen/MemoryOverlap.h>

#include <limits>
#include <vector>

#include "ops/aliasing.h"
#include "ops/backend.h"
#include "ops/format_args.h"
#include "ops/not_differentiable.h"
#include "ops/ops.h"
#include "ops/qpu_sgd/qpu_sgd_op.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr bool kRunsMembersOnThreads = true;  // Note [Members over the threads]
  static void launch(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     c10::ArrayRef<int64_t> streams, const kernels::QpuSgdParams& p, const at::Tensor& counts,
                     const at::Tensor& nan_count, const kernels::GradientPrologue& prologue) {
    kernels::qpu_sgd_cpu(params, grads, momentum, streams, p, counts, nan_count, prologue);
  }
};

// Argument checks and the counts' shape.
struct MetaBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static constexpr bool kRunsMembersOnThreads = false;  // Note [Members over the threads]
  static void launch(at::TensorList, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                     const kernels::QpuSgdParams&, const at::Tensor&, const at::Tensor&,
                     const kernels::GradientPrologue&) {}
};

// A call with empty lists has no backend for the dispatcher to pick; its
// CompositeExplicitAutograd kernel checks the arguments and does nothing. (The
// CPU, CUDA and Meta kernels take precedence whenever there are tensors.)
struct NoTensorsBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr bool kRunsMembersOnThreads = false;  // Note [Members over the threads]
  static void launch(at::TensorList params, at::TensorList, at::TensorList, c10::ArrayRef<int64_t>,
                     const kernels::QpuSgdParams&, const at::Tensor&, const at::Tensor&,
                     const kernels::GradientPrologue&) {
    TORCH_CHECK(false, "fxp::qpu_sgd_step_ has no kernel for tensors on ", params[0].device());
  }
};

// Note [QPU initialization]
// QPU keeps no float copy, so a model's parameters are put on the grid once,
// with the update rounding: tensor k of the model (in parameter order) with
// Philox key seed + kInitKeyDelta and offset k. One offset per tensor of the
// whole model: restarting k at 0 per layer would give layers the same draws.
// The Python and C++ front ends both call this op.
void quantize_parameters(at::TensorList params, at::IntArrayRef total_bits, at::IntArrayRef frac_bits,
                         c10::string_view rounding, int64_t seed) {
  constexpr const char* op = "fxp::quantize_parameters_";
  TORCH_CHECK(total_bits.size() == params.size() && frac_bits.size() == params.size(), op,
              ": expected a format per parameter (", params.size(), "), but got ", total_bits.size(), " total_bits and ",
              frac_bits.size(), " frac_bits");
  parse_rounding(op, rounding);  // also with no parameters (a model without quantized layers)
  const auto key = static_cast<int64_t>(static_cast<uint64_t>(seed) + kernels::kInitKeyDelta);
  for (size_t k = 0; k < params.size(); ++k) {
    quantize_seeded_(const_cast<at::Tensor&>(params[k]), total_bits[k], frac_bits[k], rounding, key,
                     static_cast<int64_t>(k));
  }
}

// Note [QPU format change]
// A group's format can change between steps (AdaPT without a master copy).
// Its parameters, on the old grid, are rounded onto the new one right away,
// so the next forward reads values of the new format, as a QPU layer expects.
// The momentum buffers, when they follow the parameter format (their format is
// the parameters', in fxp.optim.QPUSGD and fxp::optim::QpuSgd alike), are rounded too, so that the stored
// state is what that format can hold. A finer grid of at
// least the same range changes nothing. Stochastic rounding keeps the values'
// expectation. The draws: parameter k of the group, of n, uses Philox key
// seed + kFormatChangeKeyDelta (a key no step uses) at offset 2 (step n + k),
// its momentum buffer offset 2 (step n + k) + 1, with `step` the group's steps
// so far; one change per step at most, so no two changes share a stream.
// fxp::optim::QpuSgd::change_format and fxp.optim.QPUSGD.change_format both call this op.
void qpu_change_format(at::TensorList params, at::TensorList momentum_buffers, at::IntArrayRef momentum_positions,
                       int64_t total_bits, int64_t frac_bits, c10::string_view rounding, int64_t seed, int64_t step) {
  constexpr const char* op = "fxp::qpu_change_format_";
  check_fxp_format(op, total_bits, frac_bits);
  parse_rounding(op, rounding);
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(step >= 0, op, ": step must be non-negative, but got ", step);
  TORCH_CHECK(n == 0 || step <= (std::numeric_limits<int64_t>::max() / 2 - n) / n, op, ": step ", step,
              " is too large for ", n, " parameters");
  TORCH_CHECK(momentum_positions.size() == momentum_buffers.size(), op, ": expected a position per momentum buffer (",
              momentum_buffers.size(), "), but got ", momentum_positions.size());
  // All checks before anything is rounded (quantize_seeded_ checks each tensor only as it comes).
  std::vector<bool> has_buffer(params.size(), false);
  for (size_t j = 0; j < momentum_buffers.size(); ++j) {
    const int64_t k = momentum_positions[j];
    TORCH_CHECK(k >= 0 && k < n, op, ": momentum_positions[", j, "] is ", k, ", but there are ", n, " parameters");
    TORCH_CHECK(!has_buffer[static_cast<size_t>(k)], op, ": parameter ", k, " has two momentum buffers");
    has_buffer[static_cast<size_t>(k)] = true;
  }
  // From here on a buffer implies a parameter, so params[0] exists wherever a tensor does.
  auto check_tensor = [&](const at::Tensor& t, const char* name, size_t i) {
    TORCH_CHECK(t.defined() && t.is_floating_point(), op, ": ", name, "[", i, "] must be a floating-point tensor, "
                "but got ", t.defined() ? c10::toString(t.scalar_type()) : "an undefined tensor");
    TORCH_CHECK(t.device() == params[0].device(), op, ": ", name, "[", i, "] is on ", t.device(), ", but params[0] on ",
                params[0].device());
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", name, "[", i,
                "] has elements that share memory (an expanded tensor?), so it cannot be rounded in place");
  };
  for (size_t k = 0; k < params.size(); ++k) check_tensor(params[k], "params", k);
  for (size_t j = 0; j < momentum_buffers.size(); ++j) {
    check_tensor(momentum_buffers[j], "momentum_buffers", j);
    const auto k = static_cast<size_t>(momentum_positions[j]);
    TORCH_CHECK(momentum_buffers[j].sizes() == params[k].sizes(), op, ": momentum buffer ", j, " has shape ",
                momentum_buffers[j].sizes(), ", but parameter ", k, " has shape ", params[k].sizes());
    TORCH_CHECK(momentum_buffers[j].scalar_type() == params[k].scalar_type(), op, ": momentum buffer ", j, " is ",
                momentum_buffers[j].scalar_type(), ", but parameter ", k, " is ", params[k].scalar_type());
  }
  // No tensor may share memory with another: each is rounded in place once. (Meta tensors, as fake
  // tensors become in their kernels, have no memory to compare.)
  if (!params.empty() && !params[0].is_meta()) {
    check_no_aliasing(op, {{params, "params", true}, {momentum_buffers, "momentum_buffers", true}});
  }
  const auto key = static_cast<int64_t>(static_cast<uint64_t>(seed) + kernels::kFormatChangeKeyDelta);
  for (int64_t k = 0; k < n; ++k) {
    quantize_seeded_(const_cast<at::Tensor&>(params[static_cast<size_t>(k)]), total_bits, frac_bits, rounding, key,
                     2 * (step * n + k));
  }
  for (size_t j = 0; j < momentum_buffers.size(); ++j) {
    quantize_seeded_(const_cast<at::Tensor&>(momentum_buffers[j]), total_bits, frac_bits, rounding, key,
                     2 * (step * n + momentum_positions[j]) + 1);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<CpuBackend>);
  m.impl("qpu_sgd_step_.capturable", &qpu_sgd_step_capturable<CpuBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<CpuBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<CpuBackend>);
}

TORCH_LIBRARY_IMPL(fxp, Meta, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<MetaBackend>);
  m.impl("qpu_sgd_step_.capturable", &qpu_sgd_step_capturable<MetaBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<MetaBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<MetaBackend>);
}

TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) {
  m.impl("qpu_sgd_step_", &qpu_sgd_step<NoTensorsBackend>);
  m.impl("qpu_sgd_step_.adapt", &qpu_sgd_step_adapt<NoTensorsBackend>);
  m.impl("qpu_sgd_members_step_", &qpu_sgd_members_step<NoTensorsBackend>);  // empty lists: its own error
  m.impl("quantize_parameters_", &quantize_parameters);
  m.impl("qpu_change_format_", &qpu_change_format);
}

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  register_not_differentiable(
      m, {"qpu_sgd_step_", "qpu_sgd_step_.capturable", "qpu_sgd_step_.adapt", "qpu_sgd_members_step_",
                          "quantize_parameters_", "qpu_change_format_"});
}

TORCH_LIBRARY_IMPL(fxp, ADInplaceOrView, m) {
  register_version_bump(m, {"qpu_sgd_step_", "qpu_sgd_step_.capturable", "qpu_sgd_step_.adapt",
                            "qpu_sgd_members_step_"});
}

}  // namespace fxp
