// The quantize ops' registrations: CPU, Meta and Autograd (CUDA in
// quantize_register_cuda.cpp). The ops themselves are written once in quantize_op.h.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <mutex>

#include "ops/backend.h"
#include "ops/not_differentiable.h"
#include "ops/ops.h"
#include "ops/quantize/quantize_op.h"

namespace fxp {
namespace {

struct CpuBackend {
  struct Philox {
    uint64_t seed = 0;
    uint64_t offset = 0;
  };
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static constexpr bool kRunsMembersOnThreads = true;  // Note [Members over the threads]

  // A fresh 64-bit key per call, drawn from the CPU generator under its lock.
  static Philox from_generator(const std::optional<at::Generator>& generator, const at::Tensor& /*x*/) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    return Philox{gen->random64(), 0};
  }
  static Philox from_seed(uint64_t seed, uint64_t offset) { return Philox{seed, offset}; }

  static void launch(const at::Tensor& x, const at::Tensor& out, const kernels::QuantizeParams& params,
                     const Philox& philox, const at::Tensor& saturated,
                     const at::Tensor& saturated_count) {
    kernels::quantize_cpu(x, out, params, philox.seed, philox.offset, saturated, saturated_count);
  }
  static void launch_pack(const at::Tensor& x, const at::Tensor& codes, const kernels::QuantizeParams& params,
                          const Philox& philox, bool exact, const at::Tensor& counts) {
    const kernels::PackCounts found = kernels::pack_cpu(x, codes, params, philox.seed, philox.offset, exact);
    int64_t* total = counts.data_ptr<int64_t>();  // contiguous int64 [2]
    total[0] += found.nan;
    total[1] += found.off_grid;
  }
  static int64_t launch_unpack(const at::Tensor& codes, const at::Tensor& out, int total_bits, int frac_bits) {
    return kernels::unpack_cpu(codes, out, total_bits, frac_bits);
  }
};


// Shapes, dtypes and argument checks only, for FakeTensor, torch.compile and opcheck.
struct MetaBackend {
  struct Philox {};
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static constexpr bool kRunsMembersOnThreads = false;  // Note [Members over the threads]

  static Philox from_generator(const std::optional<at::Generator>&, const at::Tensor&) { return {}; }
  static Philox from_seed(uint64_t, uint64_t) { return {}; }
  static void launch(const at::Tensor&, const at::Tensor&, const kernels::QuantizeParams&,
                     const Philox&, const at::Tensor&, const at::Tensor&) {}
  static void launch_pack(const at::Tensor&, const at::Tensor&, const kernels::QuantizeParams&, const Philox&, bool,
                          const at::Tensor&) {}
  static int64_t launch_unpack(const at::Tensor&, const at::Tensor&, int, int) { return 0; }
};


// --- autograd: the straight-through estimator, in C++ so that C++ programs
// (fxp-train) get the same gradient as Python ---------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class QuantizeSTE : public torch::autograd::Function<QuantizeSTE> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t total_bits,
                            int64_t frac_bits, c10::string_view rounding, c10::string_view overflow,
                            const std::optional<at::Generator>& generator,
                            bool zero_grad_saturated) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (!zero_grad_saturated) {
      return quantize(x, total_bits, frac_bits, rounding, overflow, generator);
    }
    auto [out, saturated] = quantize_mask(x, total_bits, frac_bits, rounding, overflow, generator);
    ctx->save_for_backward({saturated});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    at::Tensor grad = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    if (!saved.empty()) grad = grad.masked_fill(saved[0], 0);
    // One entry per forward argument; only x is differentiable.
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Note [Per-member quantization]: the fleet's straight-through quantization.
class QuantizeMembersSTE : public torch::autograd::Function<QuantizeMembersSTE> {
 public:
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& x, int64_t member_dim,
                            at::IntArrayRef total_bits, at::IntArrayRef frac_bits,
                            const c10::List<std::string>& rounding, at::IntArrayRef seed, at::IntArrayRef offset,
                            c10::string_view overflow) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return quantize_members_ste(x, member_dim, total_bits, frac_bits, rounding, seed, offset, overflow);
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list grad_outputs) {
    // One entry per forward argument; only x is differentiable.
    return {grad_outputs[0], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor quantize_members_ste_autograd(const at::Tensor& x, int64_t member_dim, at::IntArrayRef total_bits,
                                         at::IntArrayRef frac_bits, const c10::List<std::string>& rounding,
                                         at::IntArrayRef seed, at::IntArrayRef offset, c10::string_view overflow) {
  return QuantizeMembersSTE::apply(x, member_dim, total_bits, frac_bits, rounding, seed, offset, overflow);
}

at::Tensor quantize_ste_autograd(const at::Tensor& x, int64_t total_bits, int64_t frac_bits,
                                 c10::string_view rounding, c10::string_view overflow,
                                 const std::optional<at::Generator>& generator,
                                 bool zero_grad_saturated) {
  return QuantizeSTE::apply(x, total_bits, frac_bits, rounding, overflow, generator,
                            zero_grad_saturated);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_QUANTIZE_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_QUANTIZE_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  m.impl("quantize_ste", &quantize_ste_autograd);
  m.impl("quantize_members_ste", &quantize_members_ste_autograd);
  register_not_differentiable(m, {"quantize", "quantize_", "quantize.out", "quantize_stats", "quantize_mask",
                                  "quantize_seeded", "quantize_seeded_", "quantize_seeded.out",
                                  "quantize_seeded_stats", "quantize_members", "pack", "pack.counted", "pack_seeded",
                                  "unpack"});
}

TORCH_LIBRARY_IMPL(fxp, ADInplaceOrView, m) {
  register_version_bump(m, {"quantize_", "quantize.out", "quantize_seeded_", "quantize_seeded.out", "pack.counted"});
}

}  // namespace fxp
