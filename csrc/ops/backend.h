// What the per-backend op files share.
#pragma once

#include <c10/core/Device.h>

namespace fxp {

// The DeviceGuard of backends without devices to switch (CPU, Meta).
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

// Whether the current stream of `device` is capturing a CUDA graph: false on
// the CPU and Meta, and in a build without CUDA (ops/capture.cpp).
bool capturing_on(c10::Device device);

}  // namespace fxp
