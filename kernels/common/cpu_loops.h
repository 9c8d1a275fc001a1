// The parallel loop of the per-capability CPU kernels (quantize, pack, the
// QPU step). Include it only from files compiled once per CPU capability: its
// templates live in the capability's namespace, so the builds never share an
// instantiation.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#ifndef FXP_CPU_CAPABILITY
#error "cpu_loops.h belongs to the per-capability builds"
#endif

namespace fxp::kernels::FXP_CPU_CAPABILITY {
namespace {

// Note [CPU chunking]
// at::parallel_for hands out chunks of kChunkElems elements (whole Philox
// blocks). Every element's bits depend only on its index, never on the chunk,
// the thread or the vector width, so results do not depend on the thread count
// or the CPU build.
constexpr int64_t kChunkElems = 2048;

// Note [Interleaving Philox with the element loop]
// SR generates the draws for a short span (kSpanElems elements, L1-resident)
// and consumes them at once, so Philox's arithmetic overlaps the streaming
// loads and stores instead of leaving the memory system idle in between.
constexpr int64_t kSpanElems = 256;

// Calls fn(start, len) on consecutive spans of [0, n), each at most
// span_elems long (a divisor of kChunkElems, a multiple of 4, so no Philox
// block straddles two spans), with chunks spread over the threads; returns the
// sum of what fn returns (Result: value-initialized, with +=).
template <typename Result, typename Fn>
Result sum_over_spans(int64_t n, int64_t span_elems, const Fn& fn) {
  Result total{};
  std::mutex mutex;
  // 16 chunks (32K elements) per task keeps scheduling overhead small.
  at::parallel_for(0, (n + kChunkElems - 1) / kChunkElems, 16, [&](int64_t chunk_begin, int64_t chunk_end) {
    Result local{};
    for (int64_t s = chunk_begin * kChunkElems, end = std::min(n, chunk_end * kChunkElems); s < end; s += span_elems) {
      local += fn(s, std::min(span_elems, end - s));
    }
    std::lock_guard<std::mutex> lock(mutex);
    total += local;
  });
  return total;
}

}  // namespace
}  // namespace fxp::kernels::FXP_CPU_CAPABILITY
