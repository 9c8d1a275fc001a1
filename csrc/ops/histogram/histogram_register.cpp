// fxp::format_histogram's registrations: CPU, Meta and Autograd (CUDA in
// histogram_register_cuda.cpp). The op is written once in histogram_op.h.
#include <torch/library.h>

#include "ops/backend.h"
#include "ops/histogram/histogram_op.h"
#include "ops/not_differentiable.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static void launch(const at::Tensor& x, const kernels::HistogramSpec& spec, const at::Tensor& counts) {
    kernels::format_histogram_cpu(x, spec, counts);
  }
};

// Shapes and checks only.
struct MetaBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static void launch(const at::Tensor&, const kernels::HistogramSpec&, const at::Tensor&) {}
};

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_HISTOGRAM_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_HISTOGRAM_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) { register_not_differentiable(m, {"format_histogram"}); }

}  // namespace fxp
