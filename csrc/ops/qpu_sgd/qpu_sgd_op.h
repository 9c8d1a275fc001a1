// The fused QPU SGD step op, written once over a Backend (see quantize/quantize_op.h
// for the pattern): Backend::launch(params, grads, momentum, streams, p, counts,
// nan_count, prologue), Backend::DeviceGuard and Backend::kIsMeta. The plain
// form takes lr and step as numbers; the capturable one as device tensors
// (Note [Capturable QPU step]); the adapt one adds AdaPT's gradient work
// (Note [AdaPT's fused QPU step]).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "ops/adapt_step/adapt_step_op.h"
#include "ops/backend.h"
#include "ops/bit_pack/code_storage.h"
#include "ops/qpu_sgd/qpu_sgd_args.h"

namespace fxp {

namespace detail {

// Whether the parameters or the momentum are stored as bit streams (Note [Bit-stream storage]).
inline bool any_bit_stream(at::TensorList params, at::TensorList momentum_buffers) {
  return is_bit_stream(params[0]) || (!momentum_buffers.empty() && is_bit_stream(momentum_buffers[0]));
}

// The update of checked lists: counts (int64 [n, 2]) receive (saturated,
// vanished) per tensor, nan_count (where defined) the NaN results that packed
// storage could not hold.
template <class Backend>
void run_qpu_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const kernels::QpuSgdParams& p, const std::vector<int64_t>& streams, int64_t total_bits,
                 int64_t momentum_total_bits, const at::Tensor& counts, const at::Tensor& nan_count) {
  typename Backend::DeviceGuard guard(params[0].device());
  if (any_bit_stream(params, momentum_buffers)) {
    // Note [Bit-stream storage]: one tensor at a time, decoded, updated
    // and re-encoded (check_qpu_sgd checked the streams); the draws depend
    // only on each tensor's stream index.
    for (size_t k = 0; k < params.size(); ++k) {
      const at::IntArrayRef sizes = grads[k].sizes();
      const at::Tensor param_codes = load_codes(params[k], total_bits, sizes);
      std::vector<at::Tensor> momentum_codes;
      if (!momentum_buffers.empty()) {
        momentum_codes.push_back(load_codes(momentum_buffers[k], momentum_total_bits, sizes));
      }
      Backend::launch({param_codes}, {grads[k]}, momentum_codes, {streams[k]}, p,
                      counts.narrow(0, static_cast<int64_t>(k), 1), nan_count, kernels::GradientPrologue{});
      assign_codes(params[k], param_codes, total_bits);
      if (!momentum_codes.empty()) assign_codes(momentum_buffers[k], momentum_codes[0], momentum_total_bits);
    }
  } else {
    Backend::launch(params, grads, momentum_buffers, streams, p, counts, nan_count, kernels::GradientPrologue{});
  }
}

inline bool any_packed(const kernels::QpuSgdParams& p) {
  return is_packed(p.param_storage) || is_packed(p.momentum_storage);
}

// Note [Capturable QPU step]: the plain forms take lr and step by value, so a
// CUDA graph would replay one step's lr and random streams at every replay
// (and the packed forms read a NaN count back, which a capture does not
// allow). Refused before any work, with the way out, as torch's optimizers
// refuse a capture without capturable=True. The capture is looked for on
// `on`'s device, whatever the current one.
inline void refuse_capture(const char* op, const at::Tensor& on, const char* way_out) {
  TORCH_CHECK(!capturing_on(on.device()), op,
              ": this form takes lr and step by value, so a CUDA graph would replay one step's lr and random "
              "numbers; ", way_out);
}

}  // namespace detail

template <class Backend>
at::Tensor qpu_sgd_step(at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers, double lr, double momentum,
                        double weight_decay, bool nesterov, int64_t total_bits, int64_t frac_bits,
                        int64_t momentum_total_bits, int64_t momentum_frac_bits,
                        c10::string_view rounding, int64_t seed, int64_t step,
                        c10::string_view momentum_form, at::OptionalIntArrayRef stream_indices) {
  const QpuSgdArgs args{lr,        momentum,   weight_decay, nesterov,  total_bits,    frac_bits,
                        momentum_total_bits, momentum_frac_bits, rounding, seed, step, momentum_form,
                        stream_indices};
  const auto p = check_qpu_sgd(params, grads, momentum_buffers, args, !Backend::kIsMeta);
  const std::vector<int64_t> streams = qpu_stream_indices(args.op, params.size(), stream_indices);
  const auto options = params.empty() ? at::TensorOptions(at::kLong) : params[0].options().dtype(at::kLong);
  // (saturated, vanished) per tensor; see kernels/qpu_sgd/qpu_sgd_kernel.h.
  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size()), 2}, options);
  if constexpr (!Backend::kIsMeta) {
    if (!params.empty()) {
      const bool packed = detail::any_packed(p);
      detail::refuse_capture("fxp::qpu_sgd_step_", params[0],
                                      "capture the capturable form instead (qpu_sgd_step_.capturable, "
                                      "fxp.optim.QPUSGD(capturable=True), fxp::optim::QpuSgd::set_capturable)");
      // Note [Packed QPU step]: NaN results are counted (one device-to-host read
      // on CUDA; the capturable form leaves the count on the device).
      const at::Tensor nan_count = packed ? at::zeros({}, options) : at::Tensor();
      detail::run_qpu_sgd<Backend>(params, grads, momentum_buffers, p, streams, total_bits, momentum_total_bits,
                                   counts, nan_count);
      if (packed) check_no_nan_results(nan_count.item<int64_t>());
    }
  }
  return counts;
}

// Note [AdaPT's fused QPU step] (kernels/qpu_sgd/qpu_sgd_kernel.h): the plain
// step on the normalized gradient, with the accumulation, in one pass. Float
// storage only; accumulated[k] is shaped and typed as grads[k], norms float64
// [num_layers] as layer_gradient_norms returns it, layers[k] tensor k's layer.
template <class Backend>
at::Tensor qpu_sgd_step_adapt(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              at::TensorList accumulated, const at::Tensor& norms, at::IntArrayRef layers, double l1,
                              double lr, double momentum, double weight_decay, bool nesterov, int64_t total_bits,
                              int64_t frac_bits, int64_t momentum_total_bits, int64_t momentum_frac_bits,
                              c10::string_view rounding, int64_t seed, int64_t step, c10::string_view momentum_form,
                              at::OptionalIntArrayRef stream_indices) {
  constexpr const char* op = "fxp::qpu_sgd_step_.adapt";
  const QpuSgdArgs args{lr,        momentum,   weight_decay, nesterov,  total_bits,    frac_bits,
                        momentum_total_bits, momentum_frac_bits, rounding, seed, step, momentum_form,
                        stream_indices, op};
  const int64_t num_layers = adapt_step_detail::check_norms(op, norms, params);
  adapt_step_detail::check_lists(op, {{grads, "grads"}, {accumulated, "accumulated"}}, layers, num_layers,
                                 !Backend::kIsMeta);
  adapt_step_detail::check_l1(op, l1);
  const auto p = check_qpu_sgd(params, grads, momentum_buffers, args, !Backend::kIsMeta,
                               {{accumulated, "accumulated", true}, {norms, "norms", false}});
  TORCH_CHECK(!detail::any_packed(p), op, ": params and momentum_buffers must be float tensors like the grads; "
              "AdaPT's formats change, and packed storage cannot follow them");
  const std::vector<int64_t> streams = qpu_stream_indices(op, params.size(), stream_indices);
  const auto options = params.empty() ? at::TensorOptions(at::kLong) : params[0].options().dtype(at::kLong);
  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size()), 2}, options);
  if constexpr (!Backend::kIsMeta) {
    if (!params.empty()) {
      detail::refuse_capture(op, params[0], "it has no capturable form (AdaPT reads values back "
                                      "within a step): run it eagerly");
      typename Backend::DeviceGuard guard(params[0].device());
      const kernels::GradientPrologue prologue{accumulated, norms.const_data_ptr<double>(), layers, l1};
      Backend::launch(params, grads, momentum_buffers, streams, p, counts, at::Tensor(), prologue);
    }
  }
  return counts;
}

// Note [Per-member QPU step]
// A fleet stacks its K members' tensors along dim 0: params[k][m] is member
// m's tensor k. qpu_sgd_members_step_ steps each active member m exactly as
// qpu_sgd_step_ steps its solo run's group, params[k][m] for every k, with
// member m's lr, momentum, weight decay, formats, rounding, seed and step; the
// draws of an element depend on its member's (seed, step), its tensor's
// stream index and its index in the member's tensor, never on the fleet.
// - momentum_buffers hold every member's rows (or are empty, for a fleet
//   without momentum); a member whose momentum is 0 steps without them, and
//   without Nesterov's look-ahead (which needs momentum), as its solo run would.
// - An inactive member (a run that stopped) is left as it is, with zero
//   counts, and its arguments are not checked.
// - The stacks are checked as wholes, once: contiguous (so each member's rows
//   are, as the kernels need) and nothing written shared with another tensor
//   of the call (so no two members share memory). Then every active member's
//   arguments, without those memory checks again, before any member is stepped.
// - Packed storage: every member is stepped, its NaN results counted; then one
//   error names the members that had any (a solo step raises after writing
//   too). Stacked codes share one dtype, so members share a storage width.
// Each member is one call of the plain step's kernels (one launch on CUDA, as
// its solo run's); a single launch over all members is for later. On the CPU
// the members spread over the threads (Note [Members over the threads]),
// except with bit-stream storage, whose decoding is tensor ops.
template <class Backend>
at::Tensor qpu_sgd_members_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
                                at::ArrayRef<double> weight_decay, bool nesterov, at::IntArrayRef total_bits,
                                at::IntArrayRef frac_bits, at::IntArrayRef momentum_total_bits,
                                at::IntArrayRef momentum_frac_bits, const c10::List<std::string>& rounding,
                                at::IntArrayRef seed, at::IntArrayRef step, const c10::List<bool>& active,
                                c10::string_view momentum_form, at::OptionalIntArrayRef stream_indices) {
  constexpr const char* op = "fxp::qpu_sgd_members_step_";
  TORCH_CHECK_VALUE(!params.empty(), op, ": expected at least one parameter tensor");
  TORCH_CHECK_VALUE(params[0].dim() >= 1, op, ": params[0] needs a member dimension (dim 0), but is a scalar");
  const int64_t members = params[0].size(0);
  auto check_stacks = [&](const char* name, at::TensorList tensors) {
    for (size_t k = 0; k < tensors.size(); ++k) {
      TORCH_CHECK_VALUE(tensors[k].dim() >= 1 && tensors[k].size(0) == members, op, ": ", name, "[", k,
                        "] must hold the ", members, " members of params[0] along dim 0, but has shape ",
                        tensors[k].sizes());
      if constexpr (!Backend::kIsMeta) {
        TORCH_CHECK_VALUE(tensors[k].is_contiguous(), op, ": ", name, "[", k,
                          "] must be contiguous, so that its members do not share memory");
      }
    }
  };
  check_stacks("params", params);
  check_stacks("grads", grads);
  check_stacks("momentum_buffers", momentum_buffers);
  if constexpr (!Backend::kIsMeta) {
    check_no_aliasing(op, {{params, "params", true}, {grads, "grads", false},
                           {momentum_buffers, "momentum_buffers", true}});
  }
  auto check_length = [&](const char* name, size_t n) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(n) == members, op, ": expected one ", name, " per member (",
                      members, "), but got ", n);
  };
  check_length("lr", lr.size());
  check_length("momentum", momentum.size());
  check_length("weight_decay", weight_decay.size());
  check_length("total_bits", total_bits.size());
  check_length("frac_bits", frac_bits.size());
  check_length("momentum_total_bits", momentum_total_bits.size());
  check_length("momentum_frac_bits", momentum_frac_bits.size());
  check_length("rounding", rounding.size());
  check_length("seed", seed.size());
  check_length("step", step.size());
  check_length("active", active.size());
  const std::vector<int64_t> streams = qpu_stream_indices(op, params.size(), stream_indices);
  auto rows = [](at::TensorList tensors, int64_t m) {
    std::vector<at::Tensor> views;
    for (const auto& t : tensors) views.push_back(t.select(0, m));
    return views;
  };
  struct Member {
    int64_t m;
    std::vector<at::Tensor> params, grads, momentum;
    kernels::QpuSgdParams p;
  };
  std::vector<Member> stepped;
  for (int64_t m = 0; m < members; ++m) {
    if (!active.get(m)) continue;
    Member member{m, rows(params, m), rows(grads, m),
                  momentum[m] != 0 ? rows(momentum_buffers, m) : std::vector<at::Tensor>{}, {}};
    const std::string member_rounding = rounding.get(m);  // QpuSgdArgs holds a view of it
    const QpuSgdArgs args{lr[m], momentum[m], weight_decay[m], nesterov && momentum[m] != 0, total_bits[m],
                          frac_bits[m], momentum_total_bits[m], momentum_frac_bits[m], member_rounding, seed[m],
                          step[m], momentum_form, stream_indices, op};
    try {
      // The stacks' memory checks above cover the rows.
      member.p = check_qpu_sgd(member.params, member.grads, member.momentum, args, /*check_memory=*/false);
    } catch (c10::Error& e) {
      e.add_context("member " + std::to_string(m));
      throw;
    }
    stepped.push_back(std::move(member));
  }
  const auto options = params[0].options().dtype(at::kLong);
  at::Tensor counts = at::zeros({members, static_cast<int64_t>(params.size()), 2}, options);
  if constexpr (!Backend::kIsMeta) {
    const bool packed = !stepped.empty() && detail::any_packed(stepped.front().p);
    detail::refuse_capture(op, params[0], "it has no capturable form yet (fleets do not capture CUDA "
                                    "graphs): run it eagerly");
    // Note [Packed QPU step]: each member's NaN results, read once after every member is stepped.
    const at::Tensor nan_counts = packed ? at::zeros({members}, options) : at::Tensor();
    // Each member's rows of the outputs, made here: the threads below run no tensor ops.
    std::vector<at::Tensor> count_rows, nan_rows;
    for (const Member& member : stepped) {
      count_rows.push_back(counts[member.m]);
      nan_rows.push_back(packed ? nan_counts[member.m] : at::Tensor());
    }
    const bool on_threads = Backend::kRunsMembersOnThreads && !detail::any_bit_stream(params, momentum_buffers);
    for_each_op_member(on_threads, static_cast<int64_t>(stepped.size()), [&](int64_t i) {
      const Member& member = stepped[static_cast<size_t>(i)];
      detail::run_qpu_sgd<Backend>(member.params, member.grads, member.momentum, member.p, streams,
                                   total_bits[member.m], momentum_total_bits[member.m], count_rows[i], nan_rows[i]);
    });
    if (packed) {
      const at::Tensor host = nan_counts.cpu();
      const int64_t* n = host.const_data_ptr<int64_t>();
      std::string which;
      int64_t total = 0;
      for (int64_t m = 0; m < members; ++m) {
        if (n[m] > 0) which += (which.empty() ? "" : ", ") + std::to_string(m);
        total += n[m];
      }
      try {
        check_no_nan_results(total, op);
      } catch (c10::Error& e) {
        e.add_context("members " + which + " (every active member was stepped)");
        throw;
      }
    }
  }
  return counts;
}

// Note [Capturable QPU step]
template <class Backend>
at::Tensor qpu_sgd_step_capturable(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                   const at::Tensor& lr, const at::Tensor& step, const at::Tensor& nan_count,
                                   double momentum, double weight_decay, bool nesterov, int64_t total_bits,
                                   int64_t frac_bits, int64_t momentum_total_bits, int64_t momentum_frac_bits,
                                   c10::string_view rounding, int64_t seed, c10::string_view momentum_form,
                                   at::OptionalIntArrayRef stream_indices) {
  check_capturable_scalars(params, lr, step, nan_count);
  // On the CPU the values are read (for free) and checked as the plain op
  // checks them; on a device they stay there, unchecked.
  const bool read_on_host = !Backend::kIsMeta && lr.device().is_cpu();
  const QpuSgdArgs args{read_on_host ? lr.item<double>() : 0.0, momentum, weight_decay, nesterov, total_bits,
                        frac_bits, momentum_total_bits, momentum_frac_bits, rounding, seed,
                        read_on_host ? step.item<int64_t>() : 0, momentum_form, stream_indices,
                        "fxp::qpu_sgd_step_.capturable"};
  auto p = check_qpu_sgd(params, grads, momentum_buffers, args, !Backend::kIsMeta,
                         {{lr, "lr", false}, {step, "step", true}, {nan_count, "nan_count", true}});
  if (!Backend::kIsMeta && !read_on_host) {
    if (lr.scalar_type() == at::kDouble) {
      p.lr_f64_on_device = lr.const_data_ptr<double>();
    } else {
      p.lr_f32_on_device = lr.const_data_ptr<float>();
    }
    p.step_on_device = step.const_data_ptr<int64_t>();
  }
  const std::vector<int64_t> streams = qpu_stream_indices(args.op, params.size(), stream_indices);
  at::Tensor counts = at::zeros({static_cast<int64_t>(params.size()), 2}, lr.options().dtype(at::kLong));
  if constexpr (!Backend::kIsMeta) {
    if (!params.empty()) {
      detail::run_qpu_sgd<Backend>(params, grads, momentum_buffers, p, streams, total_bits, momentum_total_bits,
                                   counts, detail::any_packed(p) ? nan_count : at::Tensor());
    }
    step.add_(1);  // after the launches, on the same stream
  }
  return counts;
}

}  // namespace fxp
