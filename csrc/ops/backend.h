// What the per-backend op files share.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/Device.h>

namespace fxp {

// The DeviceGuard of backends without devices to switch (CPU, Meta).
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

// Whether the current stream of `device` is capturing a CUDA graph: false on
// the CPU and Meta, and in a build without CUDA (ops/capture.cpp).
bool capturing_on(c10::Device device);

// Note [Members over the threads]
// The per-member ops of fleets (quantize_members, qpu_sgd_members_step_) run
// each member through the plain op's kernel. A small member's tensors are
// each too short for the CPU kernel's own parallel_for (a task is 32K
// elements), so member after member ran mostly on one thread while the others
// waited, and every longer tensor woke the pool on its own. With at least 4
// members per thread, the CPU runs whole members in one parallel_for instead,
// each member's kernel inline on its thread. The draws depend on the member
// and the element alone, so the bits are the same either way (tested per op).
// fn(m) must run no tensor ops there: OpenMP's threads do not carry the
// caller's dispatcher state. A backend says with kRunsMembersOnThreads
// whether its kernels run on the host (the CPU) or only queue work (CUDA, Meta).
template <class Fn>
void for_each_op_member(bool on_threads, int64_t members, const Fn& fn) {
  if (on_threads && members >= 4 * static_cast<int64_t>(at::get_num_threads())) {
    at::parallel_for(0, members, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) fn(m);
    });
  } else {
    for (int64_t m = 0; m < members; ++m) fn(m);
  }
}

}  // namespace fxp
