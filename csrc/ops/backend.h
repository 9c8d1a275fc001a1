// What the per-backend op files share.
#pragma once

#include <c10/core/Device.h>

namespace fxp {

// The DeviceGuard of backends without devices to switch (CPU, Meta).
struct NoDeviceGuard {
  explicit NoDeviceGuard(c10::Device) {}
};

}  // namespace fxp
