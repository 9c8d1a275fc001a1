// The fused ReLU + max-pool ops' registrations: CPU, Meta, the forward for
// every backend, and Autograd (CUDA in pool_register_cuda.cpp). The ops are
// written once in pool_op.h; the kernels are in kernels/pool.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/backend.h"
#include "ops/not_differentiable.h"
#include "ops/ops.h"
#include "ops/pool/pool_op.h"

namespace fxp {
namespace {

struct CpuBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = false;
  static void launch(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw) {
    kernels::relu_max_pool2d_cpu(x, out, positions, kh, kw);
  }
  static int64_t launch_backward(const at::Tensor& g, const at::Tensor& positions, const at::Tensor& grad_x, int kh,
                                 int kw) {
    return kernels::relu_max_pool2d_backward_cpu(g, positions, grad_x, kh, kw);
  }
};


// Shapes and checks only.
struct MetaBackend {
  using DeviceGuard = NoDeviceGuard;
  static constexpr bool kIsMeta = true;
  static void launch(const at::Tensor&, const at::Tensor&, const at::Tensor&, int, int) {}
  static int64_t launch_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, int, int) { return 0; }
};


using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// relu_max_pool2d for every backend: the output of its parts.
at::Tensor relu_max_pool2d_forward(const at::Tensor& x, at::IntArrayRef kernel_size) {
  return std::get<0>(relu_max_pool2d_with_positions(x, kernel_size));
}

// Note [Fused ReLU and max-pool]
// Autograd of max_pool2d(relu(x)) keeps relu's float output and the pool's
// int64 indices: 12 bytes per input element for 2x2 windows. With
// non-overlapping windows the gradient only needs, per output, where in its
// window the maximum was and whether it was positive: one byte. The backward
// rebuilds what ATen's does: the pool's backward adds the output gradient to
// a zero (0 + g, so -0 becomes +0), and relu's keeps it where the maximum is
// positive; every other input gets +0. The kernels are in kernels/pool*.
class ReluMaxPool2dFunction : public torch::autograd::Function<ReluMaxPool2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef kernel_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, positions] = relu_max_pool2d_with_positions(x, kernel_size);
    ctx->save_for_backward({positions});
    ctx->saved_data["input_sizes"] = x.sizes().vec();
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto sizes = ctx->saved_data["input_sizes"].toIntVector();
    const at::Tensor grad_x =
        relu_max_pool2d_backward(grad_outputs[0], ctx->get_saved_variables()[0],
                                 ctx->saved_data["kernel_size"].toIntVector(), c10::fromIntArrayRefSlow(sizes));
    return {grad_x, at::Tensor()};
  }
};

// Note [Double backward of the fused pool]
// The backward scatters each output's gradient to its window position, so its
// own gradient gathers: ggo = ggx at the position, 0 where the maximum was
// not positive; the positions are piecewise constant in x, so x gets none.
// That is what ATen's pair gives (max_pool's double backward gathers at its
// indices, relu's masks where its output is not positive). MSQ's Hessian
// traces (Hessian-vector products, create_graph) need it.
at::Tensor gather_at_positions(const at::Tensor& ggx, const at::Tensor& positions, at::IntArrayRef kernel_size) {
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t n = positions.size(0), c = positions.size(1), oh = positions.size(2), ow = positions.size(3);
  const at::Tensor windows = ggx.narrow(2, 0, oh * kh)
                                 .narrow(3, 0, ow * kw)
                                 .reshape({n, c, oh, kh, ow, kw})
                                 .permute({0, 1, 2, 4, 3, 5})
                                 .reshape({n, c, oh, ow, kh * kw});
  const at::Tensor pos = positions.to(at::kLong);
  const at::Tensor not_positive = pos.eq(kernels::kNotPositive);
  return windows.gather(4, pos.masked_fill(not_positive, 0).unsqueeze(4)).squeeze(4).masked_fill(not_positive, 0);
}

class ReluMaxPool2dBackwardFunction : public torch::autograd::Function<ReluMaxPool2dBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& positions,
                            at::IntArrayRef kernel_size, c10::SymIntArrayRef input_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({positions});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    return relu_max_pool2d_backward(grad_out, positions, kernel_size, input_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor ggo = gather_at_positions(grad_outputs[0], ctx->get_saved_variables()[0],
                                               ctx->saved_data["kernel_size"].toIntVector());
    return {ggo, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor relu_max_pool2d_backward_autograd(const at::Tensor& grad_out, const at::Tensor& positions,
                                             at::IntArrayRef kernel_size, c10::SymIntArrayRef input_size) {
  if (!(at::GradMode::is_enabled() && grad_out.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return relu_max_pool2d_backward(grad_out, positions, kernel_size, input_size);
  }
  return ReluMaxPool2dBackwardFunction::apply(grad_out, positions, kernel_size, input_size);
}

at::Tensor relu_max_pool2d_autograd(const at::Tensor& x, at::IntArrayRef kernel_size) {
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(relu_max_pool2d_with_positions(x, kernel_size));
  }
  return ReluMaxPool2dFunction::apply(x, kernel_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(fxp, CPU, m) { FXP_REGISTER_POOL_OPS(m, CpuBackend); }

TORCH_LIBRARY_IMPL(fxp, Meta, m) { FXP_REGISTER_POOL_OPS(m, MetaBackend); }

TORCH_LIBRARY_IMPL(fxp, CompositeExplicitAutograd, m) { m.impl("relu_max_pool2d", &relu_max_pool2d_forward); }

TORCH_LIBRARY_IMPL(fxp, Autograd, m) {
  m.impl("relu_max_pool2d", &relu_max_pool2d_autograd);
  m.impl("relu_max_pool2d_backward", &relu_max_pool2d_backward_autograd);  // Note [Double backward of the fused pool]
  register_not_differentiable(m, {"relu_max_pool2d_with_positions"});
}

}  // namespace fxp
