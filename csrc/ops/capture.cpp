// Whether a device's current stream is capturing a CUDA graph: one query for
// the QPU ops' capture refusals and the optimizer's Note [State made under capture].
#include "ops/backend.h"

#if defined(FXP_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fxp {

bool capturing_on(c10::Device device) {
#if defined(FXP_WITH_CUDA)
  if (!device.is_cuda()) return false;
  // That device's stream, whatever the current device: no guard to switch.
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
#else
  (void)device;
  return false;
#endif
}

}  // namespace fxp
