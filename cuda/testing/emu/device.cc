// swarmtune CUDA emulator runtime: the emulated device's configuration and properties, and error reporting (the
// last error per host thread, the sticky fault that ends a context). See emu_internal.h.
#include "emu_internal.h"

#include <cstdio>
#include <cstdlib>

namespace stc_emu {

Config::Config() {
  if (const char* cc = getenv("SWARMTUNE_CUDA_EMU_CC")) {
    int a = 0, b = 0;
    if (sscanf(cc, "%d.%d", &a, &b) >= 1 && a > 0) { cc_major = a; cc_minor = b; }
  }
  if (const char* m = getenv("SWARMTUNE_CUDA_EMU_MEM_MB")) {
    long long v = atoll(m);
    if (v > 0) total_mem = (size_t)v << 20;
  }
  if (const char* s = getenv("SWARMTUNE_CUDA_EMU_SYNC")) immediate = s[0] == '1';
  if (const char* v = getenv("SWARMTUNE_CUDA_EMU_VERBOSE")) verbose = v[0] == '1';
}

const Config& cfg() {
  static Config c;
  return c;
}

std::recursive_mutex g_device;

thread_local cudaError_t t_last = cudaSuccess;
std::atomic<int> g_sticky{0};
static char g_sticky_msg[1024] = "";  // the first fault's message

cudaError_t ret(cudaError_t e) {
  if (e != cudaSuccess) t_last = e;
  return e;
}
cudaError_t sticky() { return (cudaError_t)g_sticky.load(); }

void make_sticky(cudaError_t e, const char* msg) {
  int expected = 0;
  if (g_sticky.compare_exchange_strong(expected, (int)e)) snprintf(g_sticky_msg, sizeof g_sticky_msg, "%s", msg);
  fprintf(stderr, "stc-emu: kernel fault (%s, sticky): %s\n", cudaGetErrorName(e), msg);
}

const char* error_name(cudaError_t e) {
  switch (e) {
#define E(x) case x: return #x;
    E(cudaSuccess) E(cudaErrorInvalidValue) E(cudaErrorMemoryAllocation) E(cudaErrorInitializationError)
    E(cudaErrorInvalidConfiguration) E(cudaErrorInvalidSymbol) E(cudaErrorInvalidDevicePointer)
    E(cudaErrorInvalidMemcpyDirection) E(cudaErrorInsufficientDriver) E(cudaErrorNoDevice) E(cudaErrorInvalidDevice)
    E(cudaErrorInvalidResourceHandle) E(cudaErrorNotReady) E(cudaErrorIllegalAddress) E(cudaErrorLaunchOutOfResources)
    E(cudaErrorLaunchTimeout) E(cudaErrorAssert) E(cudaErrorHardwareStackError) E(cudaErrorIllegalInstruction)
    E(cudaErrorMisalignedAddress) E(cudaErrorInvalidAddressSpace) E(cudaErrorInvalidPc) E(cudaErrorLaunchFailure)
    E(cudaErrorECCUncorrectable) E(cudaErrorNotSupported) E(cudaErrorUnknown)
#undef E
  }
  return "cudaErrorUnknown";
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

}  // namespace stc_emu

using namespace stc_emu;

// ---------------------------------------------------------------- runtime API
extern "C++" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return ret(cudaErrorInvalidDevice);
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "swarmtune-emu");
  p->totalGlobalMem = cfg().total_mem;
  p->sharedMemPerBlock = 48 << 10;
  p->sharedMemPerBlockOptin = cfg().smem_optin();
  p->sharedMemPerMultiprocessor = cfg().smem_optin() + 1024;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
  p->clockRate = 1000000;
  p->major = cfg().cc_major;
  p->minor = cfg().cc_minor;
  p->multiProcessorCount = cfg().sm_count;
  p->maxThreadsPerMultiProcessor = 2048;
  p->unifiedAddressing = 1;
  p->concurrentKernels = 1;
  p->asyncEngineCount = 2;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device) {
  if (device != 0) return ret(cudaErrorInvalidDevice);
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 << 10; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = cfg().sm_count; break;
    case cudaDevAttrComputeCapabilityMajor: *v = cfg().cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = cfg().cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)cfg().smem_optin(); break;
    default: return ret(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  EMU_STICKY_CHECK();
  return device == 0 ? cudaSuccess : ret(cudaErrorInvalidDevice);
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  if (int s = g_sticky.load()) return (cudaError_t)s;
  const cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) {
  if (int s = g_sticky.load()) return (cudaError_t)s;
  return t_last;
}
const char* cudaGetErrorString(cudaError_t e) { return error_string(e); }
const char* cudaGetErrorName(cudaError_t e) { return error_name(e); }

}  // extern "C++"
