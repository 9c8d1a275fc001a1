// Fused ReLU + max-pool over non-overlapping windows: compute only.
// Note [Fused ReLU and max-pool] (csrc/ops/pool/pool_register.cpp) says why.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fxp::kernels {

// The window-position code of an output whose maximum is not positive (its
// gradient is zero); positions are otherwise 0 .. kh*kw - 1, row-major.
constexpr uint8_t kNotPositive = 255;

// out = max_pool2d(relu(x), (kh, kw), stride (kh, kw)) and each output's
// window position (uint8). x contiguous [N, C, H, W]; out and positions
// contiguous [N, C, H / kh, W / kw]. The scan is ATen's: row-major through
// the window, a value wins when it is greater than the running maximum
// (which starts at -inf) or NaN; relu(v) = v < 0 ? 0 : v.
void relu_max_pool2d_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw);

// grad_x (contiguous [N, C, H, W]) = 0 + grad_out at each output's position,
// +0 elsewhere and where the position is kNotPositive. Returns the number of
// positions that are neither below kh * kw nor kNotPositive (they write nothing).
int64_t relu_max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& positions,
                                     const at::Tensor& grad_x, int kh, int kw);

void relu_max_pool2d_cuda(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw);
// As the CPU kernel, but invalid positions are not counted (a check would
// cost a device-to-host copy per call); they select no element, so they can
// never address memory outside grad_x.
void relu_max_pool2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& positions, const at::Tensor& grad_x,
                                   int kh, int kw);

}  // namespace fxp::kernels
