#include "ops/aliasing.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fxp {

// A written tensor that overlaps another tensor of the call would be read
// after it is written, so, as torch's fused optimizers do, the ops reject such
// calls instead of computing garbage. The memory ranges are sorted, so the
// check costs O(n log n).
void check_no_aliasing(const char* op, c10::ArrayRef<NamedTensorList> lists) {
  struct Range {
    uintptr_t begin, end;
    const char* list;
    size_t index;
    bool written;
  };
  std::vector<Range> ranges;
  for (const NamedTensorList& list : lists) {
    for (size_t k = 0; k < list.tensors.size(); ++k) {
      const at::Tensor& t = list.tensors[k];
      if (t.numel() == 0) continue;
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      ranges.push_back({begin, begin + static_cast<uintptr_t>(t.numel() * t.element_size()), list.name, k,
                        list.written});
    }
  }
  // Stable: ranges that start together keep the call's order, so the error names them the same way every time.
  std::stable_sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  // The range reaching furthest so far, among all ranges and among the written ones.
  const Range* furthest = nullptr;
  const Range* furthest_written = nullptr;
  for (const Range& r : ranges) {
    const Range* other = r.written ? furthest : furthest_written;
    TORCH_CHECK(other == nullptr || r.begin >= other->end, op, ": ", r.list, "[", r.index, "] and ", other->list, "[",
                other->index, "] share memory; every tensor the op writes must have memory of its own");
    if (furthest == nullptr || r.end > furthest->end) furthest = &r;
    if (r.written && (furthest_written == nullptr || r.end > furthest_written->end)) furthest_written = &r;
  }
}

}  // namespace fxp
