// CPU kernels of the fused ReLU + max-pool: one task per (n, c) plane.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <atomic>

#include "pool/pool_kernel.h"
#include "pool/pool_window.h"

namespace fxp::kernels {

void relu_max_pool2d_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw) {
  const int64_t planes = x.size(0) * x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  uint8_t* pos = positions.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_relu_max_pool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* plane = xp + p * height * width;
        for (int64_t oh = 0; oh < out_h; ++oh) {
          for (int64_t ow = 0; ow < out_w; ++ow) {
            const int64_t o = (p * out_h + oh) * out_w + ow;
            yp[o] = relu_max_window<scalar_t, acc_t>(plane, width, oh * kh, ow * kw, kh, kw, pos + o);
          }
        }
      }
    });
  });
}

int64_t relu_max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& positions,
                                     const at::Tensor& grad_x, int kh, int kw) {
  const int64_t planes = grad_x.size(0) * grad_x.size(1), height = grad_x.size(2), width = grad_x.size(3);
  const int64_t out_h = grad_out.size(2), out_w = grad_out.size(3);
  const int window = kh * kw;
  const uint8_t* pos = positions.const_data_ptr<uint8_t>();
  std::atomic<int64_t> invalid{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "fxp_relu_max_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      int64_t bad = 0;
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* plane = gx + p * height * width;
        std::fill(plane, plane + height * width, scalar_t(0));
        for (int64_t oh = 0; oh < out_h; ++oh) {
          for (int64_t ow = 0; ow < out_w; ++ow) {
            const int64_t o = (p * out_h + oh) * out_w + ow;
            if (pos[o] == kNotPositive) continue;
            if (pos[o] >= window) {  // would address another window, or memory past the plane
              ++bad;
              continue;
            }
            // ATen's pool backward adds the gradient to a zero: 0 + g (so -0 becomes +0).
            plane[(oh * kh + pos[o] / kw) * width + ow * kw + pos[o] % kw] =
                static_cast<scalar_t>(acc_t(0) + static_cast<acc_t>(gp[o]));
          }
        }
      }
      invalid += bad;
    });
  });
  return invalid.load();
}

}  // namespace fxp::kernels
