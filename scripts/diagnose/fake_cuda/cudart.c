// A stand-in for libcudart.so.13 that lets torch's and libfxp's CUDA host code
// run on a machine without a GPU (see README.md). "Device" memory is host
// memory, so copies, memsets and .item() work; kernels are never run, so
// nothing a kernel would compute is meaningful. Only what torch and libfxp
// call on the paths we need is implemented here; gen_stubs.py makes every
// other export of the real library a stub that returns cudaSuccess.
#define _GNU_SOURCE
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int log_on(void) {
  static int on = -1;
  if (on < 0) on = getenv("FXP_FAKE_CUDA_LOG") != NULL;
  return on;
}
#define LOG(...) do { if (log_on()) fprintf(stderr, "[fake-cuda] " __VA_ARGS__); } while (0)

// ---- Devices: one, shaped like an H100/H200 (sm_90), so launch sizes look real.
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaInitDevice(int d, unsigned dflags, unsigned flags) { return cudaSetDevice(d); }
cudaError_t cudaDriverGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
cudaError_t cudaDeviceCanAccessPeer(int* can, int a, int b) { *can = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  *least = 0; *greatest = -5;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* p, int d) {
  memset(p, 0, sizeof *p);
  strcpy(p->name, "fxp fake CUDA device (kernels do not run)");
  p->major = 9; p->minor = 0; p->multiProcessorCount = 132; p->totalGlobalMem = (size_t)80 << 30;
  p->warpSize = 32; p->maxThreadsPerBlock = 1024; p->maxThreadsPerMultiProcessor = 2048;
  p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
  p->sharedMemPerBlock = 49152; p->sharedMemPerBlockOptin = 232448; p->sharedMemPerMultiprocessor = 233472;
  p->regsPerBlock = 65536; p->l2CacheSize = 50 << 20; p->memoryBusWidth = 5120; p->pciBusID = 1;
  p->canMapHostMemory = 1; p->unifiedAddressing = 1; p->concurrentKernels = 1;
  return d == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}
cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr a, int d) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 49152; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 232448; break;
    default: *v = 0;
  }
  return cudaSuccess;
}

// ---- Errors: every call here succeeds, so there is never an error to report.
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return "error from the fake CUDA runtime"; }
const char* cudaGetErrorName(cudaError_t e) { return "cudaErrorFake"; }

// ---- Memory: host memory stands in for device memory. Zeroed, so a count
// tensor whose zero-fill kernel did not run still starts at 0 (fresh blocks only:
// torch's caching allocator reuses blocks, see FXP_FAKE_CUDA_COUNTS below).
static void* zeroed(size_t n, size_t align) {
  size_t size = (n + align - 1) / align * align + align;  // never 0, a multiple of align
  void* p = aligned_alloc(align, size);
  if (p) memset(p, 0, size);
  return p;
}
cudaError_t cudaMalloc(void** p, size_t n) {
  *p = zeroed(n, 512);
  LOG("cudaMalloc %zu -> %p\n", n, *p);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) { LOG("cudaFree %p\n", p); free(p); return cudaSuccess; }
cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t s) { return cudaMalloc(p, n); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t s) { return cudaFree(p); }
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned f) {
  *p = zeroed(n, 4096);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMallocHost(void** p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void* p) { free(p); return cudaSuccess; }
cudaError_t cudaHostRegister(void* p, size_t n, unsigned f) { return cudaSuccess; }
cudaError_t cudaHostUnregister(void* p) { return cudaSuccess; }
cudaError_t cudaHostGetDevicePointer(void** d, void* h, unsigned f) { *d = h; return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
  *free_bytes = (size_t)64 << 30; *total = (size_t)80 << 30;
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes* a, const void* p) {
  memset(a, 0, sizeof *a);
  a->type = cudaMemoryTypeDevice; a->device = 0; a->devicePointer = (void*)p; a->hostPointer = (void*)p;
  return cudaSuccess;
}
// Copies are synchronous, so a count is read back as soon as the copy returns.
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, enum cudaMemcpyKind k) {
  memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, enum cudaMemcpyKind k, cudaStream_t st) {
  LOG("cudaMemcpyAsync %zu bytes, kind %d\n", n, (int)k);
  memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* d, size_t dpitch, const void* s, size_t spitch, size_t w, size_t h,
                              enum cudaMemcpyKind k, cudaStream_t st) {
  for (size_t r = 0; r < h; ++r) memmove((char*)d + r * dpitch, (const char*)s + r * spitch, w);
  return cudaSuccess;
}
cudaError_t cudaMemcpyPeerAsync(void* d, int dd, const void* s, int sd, size_t n, cudaStream_t st) {
  memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) { memset(p, v, n); return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) { memset(p, v, n); return cudaSuccess; }

// ---- Streams and events: distinct non-null handles; everything is already complete.
static uintptr_t g_handles = 0x1000;
static void* new_handle(void) { return (void*)__atomic_add_fetch(&g_handles, 16, __ATOMIC_RELAXED); }
cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = new_handle(); return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned f) { return cudaStreamCreate(s); }
cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned f, int prio) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned f) { return cudaSuccess; }
cudaError_t cudaStreamIsCapturing(cudaStream_t s, enum cudaStreamCaptureStatus* st) {
  *st = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaStreamGetCaptureInfo(cudaStream_t s, enum cudaStreamCaptureStatus* st, unsigned long long* id,
                                     cudaGraph_t* g, const cudaGraphNode_t** deps, const cudaGraphEdgeData** edges,
                                     size_t* n) {
  *st = cudaStreamCaptureStatusNone;
  if (id) *id = 0;
  return cudaSuccess;
}
cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode* m) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new_handle(); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned f) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) { *ms = 0; return cudaSuccess; }

// ---- Driver entry points: none, so torch takes its paths for a driver without them.
static cudaError_t no_entry_point(void** f, enum cudaDriverEntryPointQueryResult* r) {
  *f = NULL;
  if (r) *r = cudaDriverEntryPointSymbolNotFound;
  return cudaErrorSymbolNotFound;
}
cudaError_t cudaGetDriverEntryPoint(const char* sym, void** f, unsigned long long flags,
                                    enum cudaDriverEntryPointQueryResult* r) {
  return no_entry_point(f, r);
}
cudaError_t cudaGetDriverEntryPointByVersion(const char* sym, void** f, unsigned version, unsigned long long flags,
                                             enum cudaDriverEntryPointQueryResult* r) {
  return no_entry_point(f, r);
}

// ---- Kernels: registered by name, launched as a no-op.
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* a, const void* f) {
  memset(a, 0, sizeof *a);
  a->maxThreadsPerBlock = 1024; a->numRegs = 32;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* f, enum cudaFuncAttribute a, int v) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* f, int block, size_t smem) {
  *n = 8;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, const void* f, int block, size_t smem,
                                                                   unsigned flags) {
  *n = 8;
  return cudaSuccess;
}

// FXP_FAKE_CUDA_COUNTS=1: each launch of these kernels sets a count the op
// then reads back, so the op raises the error a real kernel would give it for
// bad input (the errors of "The open crash" in docs/gpu-check.md). A kernel is
// matched by its mangled name's length-prefixed identifier ("11pack_kernel"
// does not match "13unpack_kernel"). `arg` is the 0-based position of the
// `unsigned long long*` count among the kernel's parameters (the launch stub
// passes one args[] entry per parameter, structs included), `elem` the element
// of that array, `value` what it is set to. Set, not added: zero-fill kernels
// do not run, so a block torch's caching allocator reuses holds an old count.
// Positions, from the signatures (recheck them when a signature changes; run.sh
// --log prints each launch's mangled name, whose parameter list has the count
// as `Py`, unsigned long long*, at that position):
//   kernels/bit_pack/bit_pack_kernel.cu:      pack_bits_kernel(codes, n, bytes, bits, lo, hi, packed, outside)
//   kernels/quantize/quantize_kernel.cu:      pack_kernel(x, codes, n, spec, philox, counts)   counts[0]: NaNs
//   kernels/qpu_sgd/qpu_sgd_kernel.cu:        qpu_sgd_kernel(meta, p, host_constants, chunk_elems,
//                                               blocks_per_chunk, counts, nan_count, norms, l1)
//   kernels/round_clamp/round_clamp_kernel.cu: round_clamp_kernel(w, quantized, lsb, codes, n, spec,
//                                               totals, lsb_l1, lsb_nonzero)   totals[1]: NaNs
// The values are what error_paths.py's inputs give on the CPU (101 codes out
// of range, 1 NaN element, 2 NaN values: the weight and its momentum, 1 NaN weight).
static const struct CountedKernel {
  const char* name;
  int arg, elem;
  unsigned long long value;
} kCounted[] = {
    {"16pack_bits_kernel", 7, 0, 101},
    {"11pack_kernel", 5, 0, 1},
    {"14qpu_sgd_kernel", 6, 0, 2},
    {"18round_clamp_kernel", 6, 1, 1},
};

// Host stub address -> mangled device name, from __cudaRegisterFunction, so
// kernels are named without reading any symbol table (stripped libraries too).
struct Kernel { const void* stub; const char* name; const struct CountedKernel* counted; };
static struct Kernel* g_kernels;
static size_t g_nkernels, g_capacity;
static pthread_mutex_t g_mutex = PTHREAD_MUTEX_INITIALIZER;

static struct Kernel find_kernel(const void* stub) {  // a copy: the table may grow meanwhile
  struct Kernel found = {NULL, "(unregistered)", NULL};
  pthread_mutex_lock(&g_mutex);
  for (size_t i = g_nkernels; i-- > 0;)  // newest first: libfxp registers after torch
    if (g_kernels[i].stub == stub) { found = g_kernels[i]; break; }
  pthread_mutex_unlock(&g_mutex);
  return found;
}

static int g_fatbin;
void** __cudaRegisterFatBinary(void* fatbin) { return (void**)&g_fatbin; }
void __cudaRegisterFatBinaryEnd(void** handle) {}
void __cudaUnregisterFatBinary(void** handle) {}
void __cudaRegisterVar(void** h, char* host_var, char* device_address, const char* name, int ext, size_t size,
                       int constant, int global) {}
void __cudaRegisterFunction(void** h, const char* stub, char* device_fun, const char* device_name, int thread_limit,
                            uint3* tid, uint3* bid, dim3* block, dim3* grid, int* warp_size) {
  const struct CountedKernel* counted = NULL;
  for (size_t i = 0; i < sizeof kCounted / sizeof *kCounted; ++i)
    if (strstr(device_fun, kCounted[i].name)) counted = &kCounted[i];
  pthread_mutex_lock(&g_mutex);
  if (g_nkernels == g_capacity) {
    g_capacity = g_capacity ? 2 * g_capacity : 4096;
    g_kernels = realloc(g_kernels, g_capacity * sizeof *g_kernels);
    if (!g_kernels) abort();
  }
  g_kernels[g_nkernels++] = (struct Kernel){stub, device_fun, counted};
  pthread_mutex_unlock(&g_mutex);
}

static __thread dim3 t_grid, t_block;
static __thread size_t t_smem;
static __thread cudaStream_t t_stream;
unsigned __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t smem, struct CUstream_st* stream) {
  t_grid = grid; t_block = block; t_smem = smem; t_stream = stream;
  return 0;
}
cudaError_t __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* smem, void* stream) {
  *grid = t_grid; *block = t_block; *smem = t_smem; *(cudaStream_t*)stream = t_stream;
  return cudaSuccess;
}
// The kernel handle is the host stub's address, which names it in the table.
cudaError_t __cudaGetKernel(cudaKernel_t* k, const void* stub) { *k = (cudaKernel_t)stub; return cudaSuccess; }

static cudaError_t launch(const void* stub, dim3 grid, dim3 block, void** args) {
  static int counts = -1;
  if (counts < 0) counts = getenv("FXP_FAKE_CUDA_COUNTS") && strcmp(getenv("FXP_FAKE_CUDA_COUNTS"), "0") != 0;
  if (!counts && !log_on()) return cudaSuccess;
  const struct Kernel k = find_kernel(stub);
  LOG("launch %s grid %u block %u (not run)\n", k.name, grid.x, block.x);
  if (counts && k.counted && args) {
    unsigned long long* count = *(unsigned long long**)args[k.counted->arg];
    if (count) {
      count[k.counted->elem] = k.counted->value;
      LOG("  set argument %d [%d] to %llu\n", k.counted->arg, k.counted->elem, k.counted->value);
    }
  }
  return cudaSuccess;
}
cudaError_t __cudaLaunchKernel(cudaKernel_t k, dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t s) {
  return launch(k, grid, block, args);
}
cudaError_t __cudaLaunchKernel_ptsz(cudaKernel_t k, dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t s) {
  return launch(k, grid, block, args);
}
cudaError_t cudaLaunchKernel(const void* f, dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t s) {
  return launch(f, grid, block, args);
}
cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* c, const void* f, void** args) {
  return launch(f, c->gridDim, c->blockDim, args);
}
