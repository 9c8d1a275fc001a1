// A stand-in for the driver, libcuda.so.1. Torch loads it through
// libcaffe2_nvrtc.so (its lazy NVRTC/driver shim, which links these names) and
// asks it whether the device has a primary context; everything else reaches
// the driver through cudaGetDriverEntryPoint, which the fake runtime answers
// with "not found". Answers describe one device with an active context.
#include <stddef.h>

typedef int CUresult;  // the driver's enum; 0 is CUDA_SUCCESS
enum { kSuccess = 0, kNotFound = 500, kNotSupported = 801 };
static int g_context;  // the one context's handle points here

CUresult cuInit(unsigned flags) { return kSuccess; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return kSuccess; }
CUresult cuDeviceGet(int* dev, int ordinal) { *dev = 0; return ordinal == 0 ? kSuccess : 101; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return kSuccess; }
CUresult cuDevicePrimaryCtxGetState(int dev, unsigned* flags, int* active) { *flags = 0; *active = 1; return kSuccess; }
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) { *ctx = &g_context; return kSuccess; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &g_context; return kSuccess; }
CUresult cuCtxSetCurrent(void* ctx) { return kSuccess; }
CUresult cuGetErrorString(CUresult e, const char** s) { *s = "error from the fake CUDA driver"; return kSuccess; }
CUresult cuGetProcAddress_v2(const char* sym, void** f, int version, unsigned long long flags, int* status) {
  *f = NULL;
  if (status) *status = 1;  // CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND
  return kNotFound;
}
CUresult cuGetProcAddress(const char* sym, void** f, int version, unsigned long long flags, int* status) {
  return cuGetProcAddress_v2(sym, f, version, flags, status);
}

// The rest of what libcaffe2_nvrtc.so links: present so it loads, refused if called.
#define REFUSED(name) CUresult name(void) { return kNotSupported; }
REFUSED(cuDeviceGetAttribute) REFUSED(cuFuncGetAttribute) REFUSED(cuFuncSetAttribute)
REFUSED(cuFuncSetCacheConfig) REFUSED(cuLaunchCooperativeKernel) REFUSED(cuLaunchKernel)
REFUSED(cuLinkAddData_v2) REFUSED(cuLinkComplete) REFUSED(cuLinkCreate_v2) REFUSED(cuModuleGetFunction)
REFUSED(cuModuleLoad) REFUSED(cuModuleLoadData) REFUSED(cuModuleLoadDataEx) REFUSED(cuModuleUnload)
REFUSED(cuOccupancyMaxActiveBlocksPerMultiprocessor) REFUSED(cuPointerGetAttribute)
REFUSED(cuTensorMapEncodeTiled)
