// fxp::format_histogram's CUDA registration (the others are in histogram_register.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/histogram/histogram_op.h"

namespace fxp {
namespace {
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr bool kIsMeta = false;
  static void launch(const at::Tensor& x, const kernels::HistogramSpec& spec, const at::Tensor& counts) {
    kernels::format_histogram_cuda(x, spec, counts);
  }
};
}  // namespace

TORCH_LIBRARY_IMPL(fxp, CUDA, m) { FXP_REGISTER_HISTOGRAM_OPS(m, CudaBackend); }

}  // namespace fxp
