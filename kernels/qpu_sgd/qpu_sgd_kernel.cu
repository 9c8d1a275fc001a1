// CUDA kernel of the fused QPU SGD step, with multi-tensor chunking in the
// style of PyTorch's multi_tensor_apply: the tensor pointers and a
// (tensor, chunk) table for every CUDA block travel as a kernel argument, so
// one launch updates many tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "common/fxp_math.h"
#include "qpu_sgd/qpu_sgd_kernel_cuda.h"

namespace fxp::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxTensors = 32;  // keeps the kernel argument under 4 KB, like PyTorch's
constexpr int kMaxChunks = 256;  // chunks per launch, likewise
// Note [QPU chunk size on CUDA]
// A chunk is a piece of one tensor, listed in the launch's table. Large chunks
// keep the table and the launches few for 1e8 parameters; small ones let a
// small model (the paper's CNN: 184,490 parameters) spread over every SM
// instead of a handful. So the launcher picks, per call, the largest power of
// two in [kMinChunk, kMaxChunk] that still gives about kChunksPerSm chunks per SM.
// A table of kMaxChunks chunks with one block each would hold only 32K threads
// (a quarter of what an H200 keeps in flight), and a memory-bound step then
// waits on latency: the first GPU run measured 0.5 TB/s, SQPU and HTEQPU alike.
// So up to kMaxBlocksPerChunk blocks share a chunk, striding through it
// together, while each thread still gets at least kMinIterations Philox blocks.
// Which thread updates an element changes nothing in its result: the draws are
// keyed by the element's index alone (Note [QPU random streams]).
constexpr int64_t kMinChunk = 4 * kThreads;  // one Philox block per thread
constexpr int64_t kMaxChunk = 65536;
constexpr int64_t kChunksPerSm = 4;
constexpr int64_t kMaxBlocksPerChunk = 8;
constexpr int64_t kMinIterations = 4;

// Untyped pointers: the storage of each list is a kernel parameter
// (QpuSgdParams), so one kernel serves float and packed storage; the switch on
// it is uniform across the grid.
struct TensorListMeta {
  void* w[kMaxTensors];
  const void* g[kMaxTensors];
  void* v[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t stream[kMaxTensors];  // Philox stream index (Note [QPU random streams])
  void* accumulated[kMaxTensors];  // Note [AdaPT's fused QPU step]: null without the prologue
  int32_t layer[kMaxTensors];      // the tensor's layer: its norm is norms[layer]
  int32_t row[kMaxTensors];     // position in the op's lists: the row of counts
  uint8_t chunk_tensor[kMaxChunks];  // the chunk's tensor, a slot above
  int32_t chunk_index[kMaxChunks];   // the chunk's position in its tensor
};
static_assert(kMaxTensors <= 256, "chunk_tensor is a uint8_t");

// The bytes a kernel's parameters take, each aligned as the ABI lays them out.
template <typename... Args>
constexpr size_t kernel_parameter_bytes(void (*)(Args...)) {
  size_t bytes = 0;
  ((bytes = (bytes + alignof(Args) - 1) / alignof(Args) * alignof(Args) + sizeof(Args)), ...);
  return bytes;
}

template <typename S>
struct alignas(4 * sizeof(S)) Vec4 {
  S v[4];
};

// Four elements of one Philox block, loaded as values of compute type T and,
// for packed storage, as codes; one vector load when the block is whole and
// the pointer aligned.
template <typename T>
struct Block4 {
  T value[4];
  int64_t code[4];
};

template <typename T, typename S>
__device__ __forceinline__ void load4_typed(const S* __restrict__ p, int64_t i0, int valid, T inv_scale,
                                            Block4<T>& out) {
  S raw[4] = {S(0), S(0), S(0), S(0)};
  if (valid == 4 && reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<S>) == 0) {
    const Vec4<S> v = reinterpret_cast<const Vec4<S>*>(p + i0)[0];
#pragma unroll
    for (int l = 0; l < 4; ++l) raw[l] = v.v[l];
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < valid) raw[l] = p[i0 + l];
    }
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    if constexpr (std::is_floating_point_v<S>) {
      out.value[l] = static_cast<T>(raw[l]);
      out.code[l] = 0;
    } else {
      out.code[l] = raw[l];
      out.value[l] = static_cast<T>(raw[l]) * inv_scale;
    }
  }
}

template <typename T>
__device__ __forceinline__ void load4(const void* p, Storage s, int64_t i0, int valid, T inv_scale, Block4<T>& out) {
  switch (s) {
    case Storage::Int8: return load4_typed(static_cast<const int8_t*>(p), i0, valid, inv_scale, out);
    case Storage::Int16: return load4_typed(static_cast<const int16_t*>(p), i0, valid, inv_scale, out);
    case Storage::Int32: return load4_typed(static_cast<const int32_t*>(p), i0, valid, inv_scale, out);
    default: return load4_typed(static_cast<const T*>(p), i0, valid, inv_scale, out);  // the grads' dtype
  }
}

// Four values, one vector store when the block is whole and the pointer aligned.
template <typename T>
__device__ __forceinline__ void store4_values(T* __restrict__ p, int64_t i0, int valid, const T (&x)[4]) {
  if (valid == 4 && reinterpret_cast<uintptr_t>(p) % sizeof(Vec4<T>) == 0) {
    Vec4<T> v;
#pragma unroll
    for (int l = 0; l < 4; ++l) v.v[l] = x[l];
    reinterpret_cast<Vec4<T>*>(p + i0)[0] = v;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l < valid) p[i0 + l] = x[l];
    }
  }
}

// Stores four result codes; a NaN is stored as the quiet NaN in float
// storage, and keeps the old code in packed storage (counted: Note [Packed QPU step]).
template <typename T, typename S, typename I>
__device__ __forceinline__ unsigned store4_typed(S* __restrict__ p, int64_t i0, int valid, const I (&code)[4],
                                                 const bool (&nan)[4], const Block4<T>& old, T inv_scale) {
  S raw[4];
  unsigned nans = 0;
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    if constexpr (std::is_floating_point_v<S>) {
      raw[l] = nan[l] ? quiet_nan<S>() : code_to_float<S>(code[l]) * inv_scale;
    } else {
      raw[l] = nan[l] ? static_cast<S>(old.code[l]) : static_cast<S>(static_cast<int32_t>(code[l]));
      nans += nan[l] && l < valid;
    }
  }
  store4_values(p, i0, valid, raw);
  return nans;
}

template <typename T, typename I>
__device__ __forceinline__ unsigned store4(void* p, Storage s, int64_t i0, int valid, const I (&code)[4],
                                           const bool (&nan)[4], const Block4<T>& old, T inv_scale) {
  switch (s) {
    case Storage::Int8: return store4_typed(static_cast<int8_t*>(p), i0, valid, code, nan, old, inv_scale);
    case Storage::Int16: return store4_typed(static_cast<int16_t*>(p), i0, valid, code, nan, old, inv_scale);
    case Storage::Int32: return store4_typed(static_cast<int32_t*>(p), i0, valid, code, nan, old, inv_scale);
    default: return store4_typed(static_cast<T*>(p), i0, valid, code, nan, old, inv_scale);
  }
}

template <typename T, typename I, Rounding R, MomentumForm Form, bool kMomentum, bool kNesterov>
__global__ void __launch_bounds__(kThreads)
    qpu_sgd_kernel(TensorListMeta meta, QpuSgdParams p, QpuConstants<T> host_constants, int64_t chunk_elems,
                   int blocks_per_chunk, unsigned long long* __restrict__ counts,
                   unsigned long long* __restrict__ nan_count, const double* __restrict__ norms, double l1) {
  // Note [QPU chunk size on CUDA]: blocks_per_chunk blocks share each chunk.
  const int entry = static_cast<int>(blockIdx.x) / blocks_per_chunk;
  const int part = static_cast<int>(blockIdx.x) % blocks_per_chunk;
  const int t = meta.chunk_tensor[entry];
  const int64_t chunk_begin = static_cast<int64_t>(meta.chunk_index[entry]) * chunk_elems;
  const int64_t n = meta.numel[t];
  const int64_t chunk_end = min(n, chunk_begin + chunk_elems);
  const int64_t row = meta.row[t];
  // Note [Capturable QPU step]: lr and step from the device, where given.
  QpuConstants<T> c = host_constants;
  if (p.lr_f64_on_device != nullptr) c.lr = static_cast<T>(*p.lr_f64_on_device);
  if (p.lr_f32_on_device != nullptr) c.lr = static_cast<T>(*p.lr_f32_on_device);
  const uint64_t step = p.step_on_device != nullptr ? static_cast<uint64_t>(*p.step_on_device) : p.step;
  const uint64_t woff = qpu_param_offset(step, meta.stream[t]), voff = qpu_momentum_offset(step, meta.stream[t]);
  void* w = meta.w[t];
  const void* g = meta.g[t];
  void* v = meta.v[t];
  // Note [AdaPT's fused QPU step]: the same for the whole block.
  T* accumulated = static_cast<T*>(meta.accumulated[t]);
  const double divisor = accumulated != nullptr ? norm_divisor(norms[meta.layer[t]]) : 1.0;
  const bool float_param = !is_packed(p.param_storage);
  unsigned long long saturated = 0, vanished = 0, nans = 0;
  // One Philox block (four elements) per thread and iteration; chunks start on
  // a multiple of four, so blocks never straddle chunks.
  const int64_t stride = 4 * static_cast<int64_t>(kThreads) * blocks_per_chunk;
  for (int64_t i0 = chunk_begin + 4 * (static_cast<int64_t>(part) * kThreads + threadIdx.x); i0 < chunk_end;
       i0 += stride) {
    const int valid = chunk_end - i0 < 4 ? static_cast<int>(chunk_end - i0) : 4;
    PhiloxBlock wbits{{0u, 0u, 0u, 0u}}, vbits{{0u, 0u, 0u, 0u}};
    if constexpr (R == Rounding::Stochastic) {
      wbits = philox4x32_10(p.seed, woff, static_cast<uint64_t>(i0 / 4));
      if constexpr (kMomentum || Form == MomentumForm::PaperEq6) {
        vbits = philox4x32_10(p.seed, voff, static_cast<uint64_t>(i0 / 4));
      }
    }
    Block4<T> wb, gb, vb;
    load4(w, p.param_storage, i0, valid, c.inv_scale, wb);
    load4(g, p.grad_storage, i0, valid, T(1), gb);
    if constexpr (kMomentum) load4(v, p.momentum_storage, i0, valid, c.momentum_inv_scale, vb);
    if (accumulated != nullptr) {
      Block4<T> ab;
      load4_typed(accumulated, i0, valid, T(1), ab);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        gb.value[l] = normalized_gradient(gradient_with_l1(gb.value[l], wb.value[l], static_cast<T>(l1)), divisor);
        ab.value[l] += gb.value[l];
      }
      store4_values(accumulated, i0, valid, ab.value);
    }
    I wcode[4], vcode[4];
    bool wnan[4], vnan[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const T vi = kMomentum ? vb.value[l] : T(0);
      QpuElementResult<I> r;
      if (float_param) {
        r = qpu_update_element<R, Form, kMomentum, kNesterov, true>(
            wb.value[l], split_exact<I>(wb.value[l] * c.scale, c.param_limit), gb.value[l], vi, c, wbits.lane[l],
            vbits.lane[l]);
      } else {
        const ExactSplit<T, I> code{static_cast<I>(wb.code[l]), T(0)};
        r = qpu_update_element<R, Form, kMomentum, kNesterov, false>(wb.value[l], code, gb.value[l], vi, c,
                                                                     wbits.lane[l], vbits.lane[l]);
      }
      wcode[l] = r.param;
      wnan[l] = r.param_nan;
      vcode[l] = r.momentum;
      vnan[l] = r.momentum_nan;
      saturated += r.saturated && l < valid;
      vanished += r.vanished && l < valid;
    }
    nans += store4(w, p.param_storage, i0, valid, wcode, wnan, wb, c.inv_scale);
    if constexpr (kMomentum) nans += store4(v, p.momentum_storage, i0, valid, vcode, vnan, vb, c.momentum_inv_scale);
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
static_assert(kernel_parameter_bytes(&qpu_sgd_kernel<double, double, Rounding::Stochastic, MomentumForm::Standard,
                                                     true, false>) <= 4096,
              "the QPU kernel's parameters must fit in 4 KB: lower kMaxTensors or kMaxChunks");

// Note [QPU chunk size on CUDA]
int64_t chunk_elems_for(at::TensorList params) {
  int64_t total = 0;
  for (const auto& t : params) total += t.numel();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target = std::max<int64_t>(1, total / (kChunksPerSm * sms));
  int64_t chunk = kMinChunk;
  while (chunk < kMaxChunk && chunk * 2 <= target) chunk *= 2;
  return chunk;
}

int blocks_per_chunk_for(int64_t chunk_elems) {
  return static_cast<int>(
      std::clamp<int64_t>(chunk_elems / (4 * kThreads * kMinIterations), int64_t{1}, kMaxBlocksPerChunk));
}

template <typename T, typename I, Rounding R, MomentumForm Form, bool kMomentum>
void launch_all(at::TensorList params, at::TensorList grads, at::TensorList momentum, c10::ArrayRef<int64_t> streams,
                const QpuSgdParams& p, const at::Tensor& counts, unsigned long long* nan_ptr,
                const GradientPrologue& prologue) {
  const QpuConstants<T> c = qpu_constants<T>(p);
  const int64_t chunk_elems = chunk_elems_for(params);
  const int blocks_per_chunk = blocks_per_chunk_for(chunk_elems);
  auto* count_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  TensorListMeta meta{};
  int tensors = 0, chunks_listed = 0;
  auto launch = [&] {
    if (chunks_listed == 0) return;
    const unsigned grid = static_cast<unsigned>(chunks_listed * blocks_per_chunk);
    if (kMomentum && Form == MomentumForm::Standard && p.hyper.nesterov) {
      qpu_sgd_kernel<T, I, R, Form, kMomentum, true>
          <<<grid, kThreads, 0, stream>>>(meta, p, c, chunk_elems, blocks_per_chunk, count_ptr, nan_ptr,
                                          prologue.norms, prologue.l1);
    } else {
      qpu_sgd_kernel<T, I, R, Form, kMomentum, false>
          <<<grid, kThreads, 0, stream>>>(meta, p, c, chunk_elems, blocks_per_chunk, count_ptr, nan_ptr,
                                          prologue.norms, prologue.l1);
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
    meta.accumulated[tensors] = prologue.active() ? prologue.accumulated[k].data_ptr() : nullptr;
    meta.layer[tensors] = prologue.active() ? static_cast<int32_t>(prologue.layers[k]) : 0;
    meta.row[tensors] = static_cast<int32_t>(k);
    const int64_t chunks = (n + chunk_elems - 1) / chunk_elems;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      meta.chunk_tensor[chunks_listed] = static_cast<uint8_t>(tensors);
      meta.chunk_index[chunks_listed] = static_cast<int32_t>(ch);
      if (++chunks_listed == kMaxChunks) {  // full: launch, keep this tensor for the next launch
        launch();
        chunks_listed = 0;
        meta.w[0] = meta.w[tensors];
        meta.g[0] = meta.g[tensors];
        meta.v[0] = meta.v[tensors];
        meta.numel[0] = meta.numel[tensors];
        meta.stream[0] = meta.stream[tensors];
        meta.accumulated[0] = meta.accumulated[tensors];
        meta.layer[0] = meta.layer[tensors];
        meta.row[0] = meta.row[tensors];
        tensors = 0;
      }
    }
    // A tensor whose last chunk ended a launch is done; otherwise keep its slot.
    if (chunks_listed > 0 && meta.chunk_tensor[chunks_listed - 1] == tensors) ++tensors;
    if (tensors == kMaxTensors) {
      launch();
      chunks_listed = 0;
      tensors = 0;
    }
  }
  launch();
}

template <typename T, typename I, Rounding R>
void dispatch_form(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                   c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                   unsigned long long* nan_ptr, const GradientPrologue& prologue) {
  const bool paper = p.form == MomentumForm::PaperEq6;
  if (!momentum.empty()) {
    paper ? launch_all<T, I, R, MomentumForm::PaperEq6, true>(params, grads, momentum, streams, p, counts, nan_ptr, prologue)
          : launch_all<T, I, R, MomentumForm::Standard, true>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  } else {
    paper ? launch_all<T, I, R, MomentumForm::PaperEq6, false>(params, grads, momentum, streams, p, counts, nan_ptr, prologue)
          : launch_all<T, I, R, MomentumForm::Standard, false>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  }
}

template <typename T, typename I>
void dispatch_rounding(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                       c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                       unsigned long long* nan_ptr, const GradientPrologue& prologue) {
  if (p.rounding == Rounding::Stochastic) {
    dispatch_form<T, I, Rounding::Stochastic>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  } else {
    dispatch_form<T, I, Rounding::NearestEven>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  }
}

}  // namespace

void qpu_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                  c10::ArrayRef<int64_t> streams, const QpuSgdParams& p, const at::Tensor& counts,
                  const at::Tensor& nan_count, const GradientPrologue& prologue) {
  if (params.empty()) return;
  // Float storage never counts NaNs, so the kernel may take a null counter.
  auto* nan_ptr = nan_count.defined() ? reinterpret_cast<unsigned long long*>(nan_count.data_ptr<int64_t>()) : nullptr;
  // The compute type is the grads' float type (Note [QPU update on codes]), the
  // code type the narrowest exact one (Note [QPU code arithmetic]).
  if (p.grad_storage == Storage::Float64) {
    dispatch_rounding<double, double>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  } else if (qpu_float_codes(p)) {
    dispatch_rounding<float, float>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  } else {
    dispatch_rounding<float, int64_t>(params, grads, momentum, streams, p, counts, nan_ptr, prologue);
  }
}

}  // namespace fxp::kernels
