// CUDA kernel of the fused QPU SGD step, with multi-tensor chunking in the
// style of PyTorch's multi_tensor_apply: the tensor pointers and a
// (tensor, chunk) table for every CUDA block travel as a kernel argument, so
// one launch updates many tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "common/fxp_math.h"
#include "qpu_sgd/qpu_sgd_kernel_cuda.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTensors = 32;  // keeps the kernel argument under 4 KB, like PyTorch's
constexpr int kMaxBlocks = 256;
constexpr int64_t kChunkElems = 65536;  // elements per CUDA block and chunk

// Untyped pointers: the storage of each list is a kernel parameter
// (QpuSgdParams), so one kernel serves float and packed storage; the switch on
// it is uniform across the grid.
struct TensorListMeta {
  void* w[kMaxTensors];
  const void* g[kMaxTensors];
  void* v[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t stream[kMaxTensors];  // Philox stream index (Note [QPU random streams])
  int32_t row[kMaxTensors];     // position in the op's lists: the row of counts
  int32_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// The bytes a kernel's parameters take, each aligned as the ABI lays them out.
template <typename... Args>
constexpr size_t kernel_parameter_bytes(void (*)(Args...)) {
  size_t bytes = 0;
  ((bytes = (bytes + alignof(Args) - 1) / alignof(Args) * alignof(Args) + sizeof(Args)), ...);
  return bytes;
}

// Stores a grid value; a NaN cannot be a code, so packed storage keeps the old
// code and counts it (Note [Packed QPU step]).
__device__ __forceinline__ unsigned store_or_count(void* p, Storage s, int64_t i, double v, double scale) {
  if (is_packed(s) && v != v) return 1u;
  store_value(p, s, i, v, scale);
  return 0u;
}

template <Rounding R, MomentumForm Form, bool kMomentum, bool kNesterov>
__global__ void __launch_bounds__(kThreads)
    qpu_sgd_kernel(TensorListMeta meta, QpuSgdParams p, FxpSpec<double> wspec,
                   FxpSpec<double> vspec, unsigned long long* counts, unsigned long long* nan_count) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t chunk_begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunkElems;
  const int64_t n = meta.numel[t];
  const int64_t chunk_end = min(n, chunk_begin + kChunkElems);
  const int64_t row = meta.row[t];
  const uint64_t woff = qpu_param_offset(p.step, meta.stream[t]), voff = qpu_momentum_offset(p.step, meta.stream[t]);
  void* w = meta.w[t];
  const void* g = meta.g[t];
  void* v = meta.v[t];
  unsigned long long saturated = 0, vanished = 0, nans = 0;
  // One Philox block (four elements) per thread and iteration; chunks start on
  // a multiple of four, so blocks never straddle chunks.
  for (int64_t i0 = chunk_begin + 4 * static_cast<int64_t>(threadIdx.x); i0 < chunk_end;
       i0 += 4 * kThreads) {
    PhiloxBlock wbits{{0u, 0u, 0u, 0u}}, vbits{{0u, 0u, 0u, 0u}};
    if constexpr (R == Rounding::Stochastic) {
      wbits = philox4x32_10(p.seed, woff, static_cast<uint64_t>(i0 / 4));
      if constexpr (kMomentum || Form == MomentumForm::PaperEq6) {
        vbits = philox4x32_10(p.seed, voff, static_cast<uint64_t>(i0 / 4));
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t i = i0 + l;
      if (i < chunk_end) {
        const double vi = kMomentum ? load_value(v, p.momentum_storage, i, vspec.inv_scale) : 0.0;
        const QpuElementResult r = qpu_update_element<R, Form, kMomentum, kNesterov>(
            load_value(w, p.param_storage, i, wspec.inv_scale), load_value(g, p.grad_storage, i, 1.0), vi,
            p.hyper, wspec, vspec, wbits.lane[l], vbits.lane[l]);
        nans += store_or_count(w, p.param_storage, i, r.param, wspec.scale);
        if constexpr (kMomentum) nans += store_or_count(v, p.momentum_storage, i, r.momentum, vspec.scale);
        saturated += r.saturated;
        vanished += r.vanished;
      }
    }
  }
  for (int delta = 16; delta > 0; delta /= 2) {
    saturated += __shfl_down_sync(0xffffffffu, saturated, delta);
    vanished += __shfl_down_sync(0xffffffffu, vanished, delta);
    nans += __shfl_down_sync(0xffffffffu, nans, delta);
  }
  if ((threadIdx.x & 31) == 0) {
    if (saturated != 0) atomicAdd(counts + 2 * row, saturated);
    if (vanished != 0) atomicAdd(counts + 2 * row + 1, vanished);
    if (nans != 0) atomicAdd(nan_count, nans);
  }
}

// The classic 4 KB limit on a kernel's parameters (PyTorch's multi_tensor_apply keeps to it too).
static_assert(kernel_parameter_bytes(&qpu_sgd_kernel<Rounding::Stochastic, MomentumForm::Standard, true, false>) <=
                  4096,
              "the QPU kernel's parameters must fit in 4 KB: lower kMaxTensors or kMaxBlocks");

template <Rounding R, MomentumForm Form, bool kMomentum>
void launch_all(at::TensorList params, at::TensorList grads, at::TensorList momentum, c10::ArrayRef<int64_t> streams,
                const QpuSgdParams& p, const at::Tensor& counts, unsigned long long* nan_ptr) {
  const auto wspec = qpu_storage_spec(p.total_bits, p.frac_bits, p.param_storage);
  const auto vspec = qpu_storage_spec(p.momentum_total_bits, p.momentum_frac_bits, p.momentum_storage);
  auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  TensorListMeta meta{};
  int tensors = 0, blocks = 0;
  auto launch = [&] {
    if (blocks == 0) return;
    if (p.hyper.nesterov) {
      qpu_sgd_kernel<R, Form, kMomentum, true>
          <<<blocks, kThreads, 0, stream>>>(meta, p, wspec, vspec, count_ptr, nan_ptr);
    } else {
      qpu_sgd_kernel<R, Form, kMomentum, false>
          <<<blocks, kThreads, 0, stream>>>(meta, p, wspec, vspec, count_ptr, nan_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t n = params[k].numel();
    if (n == 0) continue;
    meta.w[tensors] = params[k].data_ptr();
    meta.g[tensors] = grads[k].const_data_ptr();
    meta.v[tensors] = kMomentum ? momentum[k].data_ptr() : nullptr;
    meta.numel[tensors] = n;
    meta.stream[tensors] = streams[k];
    meta.row[tensors] = static_cast<int32_t>(k);
    const int64_t chunks = (n + kChunkElems - 1) / kChunkElems;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = tensors;
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      if (++blocks == kMaxBlocks) {  // full: launch, keep this tensor for the next launch
        launch();
        blocks = 0;
        meta.w[0] = meta.w[tensors];
        meta.g[0] = meta.g[tensors];
        meta.v[0] = meta.v[tensors];
        meta.numel[0] = meta.numel[tensors];
        meta.stream[0] = meta.stream[tensors];
        meta.row[0] = meta.row[tensors];
        tensors = 0;
      }
    }
    // A tensor whose last chunk ended a launch is done; otherwise keep its slot.
    if (blocks > 0 && meta.block_tensor[blocks - 1] == tensors) ++tensors;
    if (tensors == kMaxTensors) {
      launch();
      blocks = 0;
      tensors = 0;
    }
  }
  launch();
}

template <Rounding R>
void dispatch_form(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                   c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                   unsigned long long* nan_ptr) {
  const bool paper = p.form == MomentumForm::PaperEq6;
  if (!momentum.empty()) {
    paper ? launch_all<R, MomentumForm::PaperEq6, true>(params, grads, momentum, streams, p, counts, nan_ptr)
          : launch_all<R, MomentumForm::Standard, true>(params, grads, momentum, streams, p, counts, nan_ptr);
  } else {
    paper ? launch_all<R, MomentumForm::PaperEq6, false>(params, grads, momentum, streams, p, counts, nan_ptr)
          : launch_all<R, MomentumForm::Standard, false>(params, grads, momentum, streams, p, counts, nan_ptr);
  }
}

}  // namespace

void qpu_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                  c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                  const at::Tensor& nan_count) {
  if (params.empty()) return;
  // Float storage never counts NaNs, so the kernel may take a null counter.
  auto* nan_ptr = nan_count.defined() ? reinterpret_cast<unsigned long long*>(nan_count.data_ptr<int64_t>()) : nullptr;
  if (p.rounding == Rounding::Stochastic) {
    dispatch_form<Rounding::Stochastic>(params, grads, momentum, streams, p, counts, nan_ptr);
  } else {
    dispatch_form<Rounding::NearestEven>(params, grads, momentum, streams, p, counts, nan_ptr);
  }
}

}  // namespace fxp::kernels
