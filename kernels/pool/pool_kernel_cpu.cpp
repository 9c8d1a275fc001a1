// CPU kernels of the fused ReLU + max-pool: planes spread over the threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "pool/pool_kernel.h"
#include "pool/pool_window.h"

namespace fxp::kernels {
namespace {

// About ATen's grain (32K elements) per task: a batch-1 layer runs on one thread.
int64_t planes_per_task(int64_t plane_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane_elems)); }

// Note [Four 2x2 windows at once]
// 2x2 windows of float32 (the paper CNN's and AlexNet's pools) take an SSE2
// path, four outputs per step, that scans each window exactly as
// relu_max_window does: relu(v) = max_ps(0, v), which is v < 0 ? +0 : v
// (NaN and -0 pass, as v < 0 is false for them); the first value always wins
// against the running -inf; each later one wins when greater or NaN, so a NaN
// maximum stays unless a later NaN replaces it. The backward writes each
// window's four gradients (0 + g at the position, +0 elsewhere) as two
// interleaved pairs, so it needs no zero fill first. Windows left over at a
// row's end take the scalar scan; the tests compare both with ATen's ops.
#if defined(__SSE2__)
inline __m128 select_ps(__m128 mask, __m128 a, __m128 b) { return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b)); }
inline __m128i select_epi32(__m128i mask, __m128i a, __m128i b) {
  return _mm_or_si128(_mm_and_si128(mask, a), _mm_andnot_si128(mask, b));
}
#endif

// One output row of 2x2 windows over input rows a and b; returns the windows done.
int64_t relu_max_pool2x2_row_sse(const float* a, const float* b, int64_t out_w, float* y, uint8_t* pos) {
  int64_t ow = 0;
#if defined(__SSE2__)
  const __m128 zero = _mm_setzero_ps();
  for (; ow + 4 <= out_w; ow += 4) {
    const __m128 a_lo = _mm_loadu_ps(a + 2 * ow), a_hi = _mm_loadu_ps(a + 2 * ow + 4);
    const __m128 b_lo = _mm_loadu_ps(b + 2 * ow), b_hi = _mm_loadu_ps(b + 2 * ow + 4);
    // The windows' four values in scan order: (0,0), (0,1), (1,0), (1,1).
    const __m128 r[4] = {_mm_max_ps(zero, _mm_shuffle_ps(a_lo, a_hi, _MM_SHUFFLE(2, 0, 2, 0))),
                         _mm_max_ps(zero, _mm_shuffle_ps(a_lo, a_hi, _MM_SHUFFLE(3, 1, 3, 1))),
                         _mm_max_ps(zero, _mm_shuffle_ps(b_lo, b_hi, _MM_SHUFFLE(2, 0, 2, 0))),
                         _mm_max_ps(zero, _mm_shuffle_ps(b_lo, b_hi, _MM_SHUFFLE(3, 1, 3, 1)))};
    __m128 m = r[0];
    __m128i best = _mm_setzero_si128();
    for (int j = 1; j < 4; ++j) {
      const __m128 wins = _mm_or_ps(_mm_cmpgt_ps(r[j], m), _mm_cmpunord_ps(r[j], r[j]));
      m = select_ps(wins, r[j], m);
      best = select_epi32(_mm_castps_si128(wins), _mm_set1_epi32(j), best);
    }
    const __m128 passes = _mm_or_ps(_mm_cmpgt_ps(m, zero), _mm_cmpunord_ps(m, m));
    const __m128i code = select_epi32(_mm_castps_si128(passes), best, _mm_set1_epi32(kNotPositive));
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(code, code), _mm_setzero_si128());
    const int32_t four = _mm_cvtsi128_si32(bytes);
    std::memcpy(pos + ow, &four, sizeof(four));
    _mm_storeu_ps(y + ow, m);
  }
#else
  (void)a, (void)b, (void)y, (void)pos;
#endif
  return ow;
}

// grad rows a and b of one output row of 2x2 windows; returns the windows done
// and adds the invalid positions met to *bad.
int64_t relu_max_pool2x2_backward_row_sse(const float* g, const uint8_t* pos, int64_t out_w, float* a, float* b,
                                          int64_t* bad) {
  int64_t ow = 0;
#if defined(__SSE2__)
  const __m128 zero = _mm_setzero_ps();
  for (; ow + 4 <= out_w; ow += 4) {
    const __m128 grad = _mm_add_ps(zero, _mm_loadu_ps(g + ow));  // 0 + g, as ATen's pool backward
    int32_t four;
    std::memcpy(&four, pos + ow, sizeof(four));
    const __m128i bytes = _mm_cvtsi32_si128(four);
    const __m128i code = _mm_unpacklo_epi16(_mm_unpacklo_epi8(bytes, _mm_setzero_si128()), _mm_setzero_si128());
    __m128 at[4];
    __m128i valid = _mm_cmpeq_epi32(code, _mm_set1_epi32(kNotPositive));
    for (int j = 0; j < 4; ++j) {
      const __m128i here = _mm_cmpeq_epi32(code, _mm_set1_epi32(j));
      valid = _mm_or_si128(valid, here);
      at[j] = _mm_and_ps(_mm_castsi128_ps(here), grad);
    }
    constexpr int8_t kOnes[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};  // x86-64 has no popcnt before v2
    *bad += kOnes[~_mm_movemask_ps(_mm_castsi128_ps(valid)) & 0xF];
    _mm_storeu_ps(a + 2 * ow, _mm_unpacklo_ps(at[0], at[1]));
    _mm_storeu_ps(a + 2 * ow + 4, _mm_unpackhi_ps(at[0], at[1]));
    _mm_storeu_ps(b + 2 * ow, _mm_unpacklo_ps(at[2], at[3]));
    _mm_storeu_ps(b + 2 * ow + 4, _mm_unpackhi_ps(at[2], at[3]));
  }
#else
  (void)g, (void)pos, (void)a, (void)b, (void)bad;
#endif
  return ow;
}

// Planes [begin, end) of the forward; float 2x2 windows take the SSE2 row first.
template <typename scalar_t>
void relu_max_pool2d_planes(const scalar_t* xp, scalar_t* yp, uint8_t* pos, int64_t begin, int64_t end,
                            int64_t height, int64_t width, int64_t out_h, int64_t out_w, int kh, int kw) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool four_at_once = std::is_same_v<scalar_t, float> && kh == 2 && kw == 2;  // Note [Four 2x2 windows at once]
  for (int64_t p = begin; p < end; ++p) {
    const scalar_t* plane = xp + p * height * width;
    for (int64_t oh = 0; oh < out_h; ++oh) {
      const int64_t row = (p * out_h + oh) * out_w;
      int64_t ow = 0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (four_at_once) {
          const float* a = plane + 2 * oh * width;
          ow = relu_max_pool2x2_row_sse(a, a + width, out_w, yp + row, pos + row);
        }
      }
      for (; ow < out_w; ++ow) {
        yp[row + ow] = relu_max_window<scalar_t, acc_t>(plane, width, oh * kh, ow * kw, kh, kw, pos + row + ow);
      }
    }
  }
}

// Planes [begin, end) of the backward; returns the invalid positions met.
template <typename scalar_t>
int64_t relu_max_pool2d_backward_planes(const scalar_t* gp, const uint8_t* pos, scalar_t* gx, int64_t begin,
                                        int64_t end, int64_t height, int64_t width, int64_t out_h, int64_t out_w,
                                        int kh, int kw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int window = kh * kw;
  const bool four_at_once = std::is_same_v<scalar_t, float> && kh == 2 && kw == 2;  // Note [Four 2x2 windows at once]
  int64_t bad = 0;
  for (int64_t p = begin; p < end; ++p) {
    scalar_t* plane = gx + p * height * width;
    int64_t done = 0;  // windows per row the 2x2 path wrote
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (four_at_once) {
        for (int64_t oh = 0; oh < out_h; ++oh) {
          const int64_t row = (p * out_h + oh) * out_w;
          float* a = plane + 2 * oh * width;
          done = relu_max_pool2x2_backward_row_sse(gp + row, pos + row, out_w, a, a + width, &bad);
          std::fill(a + 2 * done, a + width, 0.0f);  // the scalar windows' and the uncovered columns
          std::fill(a + width + 2 * done, a + 2 * width, 0.0f);
        }
        std::fill(plane + 2 * out_h * width, plane + height * width, 0.0f);
      }
    }
    if (!four_at_once) std::fill(plane, plane + height * width, scalar_t(0));
    for (int64_t oh = 0; oh < out_h; ++oh) {
      for (int64_t ow = done; ow < out_w; ++ow) {
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
  return bad;
}

}  // namespace

void relu_max_pool2d_cpu(const at::Tensor& x, const at::Tensor& out, const at::Tensor& positions, int kh, int kw) {
  const int64_t planes = x.size(0) * x.size(1), height = x.size(2), width = x.size(3);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  uint8_t* pos = positions.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fxp_relu_max_pool2d_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, planes_per_task(height * width), [&](int64_t begin, int64_t end) {
      relu_max_pool2d_planes(xp, yp, pos, begin, end, height, width, out_h, out_w, kh, kw);
    });
  });
}

int64_t relu_max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& positions,
                                     const at::Tensor& grad_x, int kh, int kw) {
  const int64_t planes = grad_x.size(0) * grad_x.size(1), height = grad_x.size(2), width = grad_x.size(3);
  const int64_t out_h = grad_out.size(2), out_w = grad_out.size(3);
  const uint8_t* pos = positions.const_data_ptr<uint8_t>();
  std::atomic<int64_t> invalid{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "fxp_relu_max_pool2d_backward_cpu", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, planes, planes_per_task(height * width), [&](int64_t begin, int64_t end) {
      invalid += relu_max_pool2d_backward_planes(gp, pos, gx, begin, end, height, width, out_h, out_w, kh, kw);
    });
  });
  return invalid.load();
}

}  // namespace fxp::kernels
