// The fused ReLU + max-pool ops behind fxp::relu_max_pool2d, written once over
// a Backend (launch, launch_backward -> the count of invalid positions it met,
// DeviceGuard, kIsMeta), like qpu_sgd_op.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "pool/pool_kernel.h"

namespace fxp {

inline void check_kernel_size(const char* op, at::IntArrayRef kernel_size) {
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1 &&
                  kernel_size[0] * kernel_size[1] < kernels::kNotPositive,
              op, ": kernel_size must be two positive sizes with fewer than 255 positions, but got ", kernel_size);
}

inline void check_relu_max_pool2d(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, but got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D x (N, C, H, W), but got ", x.dim(), "-D");
  check_kernel_size(op, kernel_size);
  TORCH_CHECK(x.sym_size(2) >= kernel_size[0] && x.sym_size(3) >= kernel_size[1], op, ": the input's ",
              x.sym_size(2), "x", x.sym_size(3), " is smaller than the kernel ", kernel_size);
}

template <class Backend>
struct PoolOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, at::IntArrayRef kernel_size) {
    constexpr const char* op = "fxp::relu_max_pool2d_with_positions";
    check_relu_max_pool2d(op, x, kernel_size);
    typename Backend::DeviceGuard guard(x.device());
    const std::vector<c10::SymInt> sizes{x.sym_size(0), x.sym_size(1), x.sym_size(2) / kernel_size[0],
                                         x.sym_size(3) / kernel_size[1]};
    at::Tensor out = at::empty_symint(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor positions = at::empty_symint(sizes, x.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
    if constexpr (!Backend::kIsMeta) {
      Backend::launch(x.contiguous(), out, positions, static_cast<int>(kernel_size[0]), static_cast<int>(kernel_size[1]));
    }
    return {out, positions};
  }

  // A public op: every argument is checked, so that no call can address
  // memory outside grad_x (positions on CUDA: see relu_max_pool2d_backward_cuda).
  static at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& positions, at::IntArrayRef kernel_size,
                             c10::SymIntArrayRef input_size) {
    constexpr const char* op = "fxp::relu_max_pool2d_backward";
    TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), op, ": grad_out must be floating point, but got ",
                grad_out.scalar_type());
    TORCH_CHECK(grad_out.dim() == 4, op, ": expected a 4-D grad_out (N, C, H_out, W_out), but got ", grad_out.dim(),
                "-D");
    TORCH_CHECK(positions.scalar_type() == at::kByte, op, ": positions must be uint8, but got ",
                positions.scalar_type());
    TORCH_CHECK(positions.device() == grad_out.device(), op, ": expected positions on the device of grad_out (",
                grad_out.device(), "), but got ", positions.device());
    TORCH_CHECK(grad_out.sym_sizes() == positions.sym_sizes(), op, ": grad_out has shape ", grad_out.sym_sizes(),
                " but positions has ", positions.sym_sizes());
    check_kernel_size(op, kernel_size);
    TORCH_CHECK(input_size.size() == 4, op, ": input_size must have 4 entries (N, C, H, W), but got ", input_size);
    const c10::SymInt& n = input_size[0];
    const c10::SymInt& c = input_size[1];
    const c10::SymInt& h = input_size[2];
    const c10::SymInt& w = input_size[3];
    TORCH_CHECK(n == grad_out.sym_size(0) && c == grad_out.sym_size(1), op, ": input_size ", input_size,
                " and grad_out ", grad_out.sym_sizes(), " disagree on N and C");
    TORCH_CHECK(h >= kernel_size[0] && w >= kernel_size[1] && h / kernel_size[0] == grad_out.sym_size(2) &&
                    w / kernel_size[1] == grad_out.sym_size(3),
                op, ": an input of size ", input_size, " pooled by ", kernel_size, " does not give grad_out's ",
                grad_out.sym_sizes());
    typename Backend::DeviceGuard guard(grad_out.device());
    at::Tensor grad_x = at::empty_symint(input_size, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
    if constexpr (!Backend::kIsMeta) {
      const int64_t invalid = Backend::launch_backward(grad_out.contiguous(), positions.contiguous(), grad_x,
                                                       static_cast<int>(kernel_size[0]),
                                                       static_cast<int>(kernel_size[1]));
      TORCH_CHECK_VALUE(invalid == 0, op, ": ", invalid, " of ", positions.numel(),
                        " positions are not window positions (each must be below ", kernel_size[0] * kernel_size[1],
                        " = kh * kw, or ", int{kernels::kNotPositive}, " for a maximum that is not positive)");
    }
    return grad_x;
  }
};

#define FXP_REGISTER_POOL_OPS(m, Backend)                                                  \
  do {                                                                                     \
    (m).impl("relu_max_pool2d_with_positions", &::fxp::PoolOps<Backend>::forward);         \
    (m).impl("relu_max_pool2d_backward", &::fxp::PoolOps<Backend>::backward);              \
  } while (false)

}  // namespace fxp
