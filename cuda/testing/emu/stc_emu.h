// swarmtune CUDA emulator: the CUDA runtime API subset, device builtins and WMMA that cuda/src uses, on the CPU.
//
// One emulated device ("swarmtune-emu", compute capability 8.0 unless SWARMTUNE_CUDA_EMU_CC says otherwise).
// Device memory is host memory registered in a table (so cudaPointerGetAttributes tells device, pinned and
// pageable memory apart), guarded by inaccessible pages. Streams are queues executed in issue order when the
// host waits (stream/event/device synchronization, a copy to pageable memory, cudaFree), or at once with
// SWARMTUNE_CUDA_EMU_SYNC=1. A launch runs every block of its grid in turn; inside a block each CUDA thread
// is a coroutine with its own stack, switched at __syncthreads and at warp-synchronous operations
// (__syncwarp, __shfl_*_sync, wmma::load/store_matrix_sync), which exchange values through per-warp slots.
// Implemented in device.cc, memory.cc, streams.cc, launch.cc and threads.cc (emu_internal.h); what this proves
// and what it cannot: docs/cuda.md, section "Emulator".
#pragma once
#include <math.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

// ---- CUDA C++ keywords ----
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
// cuda/testing/emu/transform.ts turns `__launch_bounds__(n)` into a check at the top of the kernel body and every
// `__shared__` declaration into registered block-shared storage; these fallbacks keep untransformed code compiling.
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __shared__
#define __shared__ static
#endif

// ---- runtime types (values match the CUDA runtime: statuses reach JS as numbers) ----
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidSymbol = 13,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorAssert = 710,
  cudaErrorHardwareStackError = 714,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorInvalidAddressSpace = 717,
  cudaErrorInvalidPc = 718,
  cudaErrorLaunchFailure = 719,
  cudaErrorECCUncorrectable = 214,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef enum cudaError_t cudaError;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};

struct cudaPointerAttributes {
  enum cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int clockRate;
  int major;
  int minor;
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
  int memoryBusWidth;
  int memoryClockRate;
  int l2CacheSize;
  int unifiedAddressing;
  int managedMemory;
  int concurrentKernels;
  int asyncEngineCount;
  int pciBusID;
  int pciDeviceID;
  int pciDomainID;
};

struct stc_emu_stream;
struct stc_emu_event;
typedef stc_emu_stream* cudaStream_t;
typedef stc_emu_event* cudaEvent_t;
typedef void (*cudaHostFn_t)(void* userData);

#define cudaStreamDefault 0x0
#define cudaStreamNonBlocking 0x1
#define cudaEventDefault 0x0
#define cudaEventBlockingSync 0x1
#define cudaEventDisableTiming 0x2
#define cudaHostAllocDefault 0x0
#define cudaHostAllocPortable 0x1
#define cudaHostAllocMapped 0x2
#define cudaHostAllocWriteCombined 0x4
#define cudaHostRegisterDefault 0x0

struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- runtime API (device.cc, memory.cc, streams.cc) ----
#define STC_EMU_API __attribute__((visibility("hidden")))
STC_EMU_API cudaError_t cudaGetDeviceCount(int* count);
STC_EMU_API cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
STC_EMU_API cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
STC_EMU_API cudaError_t cudaSetDevice(int device);
STC_EMU_API cudaError_t cudaGetDevice(int* device);
STC_EMU_API cudaError_t cudaDeviceSynchronize(void);
STC_EMU_API cudaError_t cudaDeviceReset(void);
STC_EMU_API cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
STC_EMU_API cudaError_t cudaGetLastError(void);
STC_EMU_API cudaError_t cudaPeekAtLastError(void);
STC_EMU_API const char* cudaGetErrorString(cudaError_t e);
STC_EMU_API const char* cudaGetErrorName(cudaError_t e);
STC_EMU_API cudaError_t cudaMalloc(void** p, size_t bytes);
STC_EMU_API cudaError_t cudaFree(void* p);
STC_EMU_API cudaError_t cudaMallocHost(void** p, size_t bytes);
STC_EMU_API cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int flags);
STC_EMU_API cudaError_t cudaFreeHost(void* p);
STC_EMU_API cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t st);
STC_EMU_API cudaError_t cudaFreeAsync(void* p, cudaStream_t st);
STC_EMU_API cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p);
STC_EMU_API cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
STC_EMU_API cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                        cudaStream_t st = 0);
STC_EMU_API cudaError_t cudaMemset(void* p, int value, size_t bytes);
STC_EMU_API cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t st = 0);
STC_EMU_API cudaError_t cudaStreamCreate(cudaStream_t* st);
STC_EMU_API cudaError_t cudaStreamCreateWithFlags(cudaStream_t* st, unsigned int flags);
STC_EMU_API cudaError_t cudaStreamDestroy(cudaStream_t st);
STC_EMU_API cudaError_t cudaStreamSynchronize(cudaStream_t st);
STC_EMU_API cudaError_t cudaStreamQuery(cudaStream_t st);
STC_EMU_API cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t e, unsigned int flags = 0);
STC_EMU_API cudaError_t cudaLaunchHostFunc(cudaStream_t st, cudaHostFn_t fn, void* data);
STC_EMU_API cudaError_t cudaEventCreate(cudaEvent_t* e);
STC_EMU_API cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int flags);
STC_EMU_API cudaError_t cudaEventDestroy(cudaEvent_t e);
STC_EMU_API cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t st = 0);
STC_EMU_API cudaError_t cudaEventSynchronize(cudaEvent_t e);
STC_EMU_API cudaError_t cudaEventQuery(cudaEvent_t e);
STC_EMU_API cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b);

namespace stc_emu {
STC_EMU_API cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return stc_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- device side ----
namespace stc_emu {

// The CUDA thread running right now (one kernel executes at a time, on one OS thread: see threads.cc).
struct ThreadCtx {
  uint3 tidx, bidx, bdim, gdim;
  unsigned lane, warp;
};
STC_EMU_API extern ThreadCtx* g_cur;

STC_EMU_API void syncthreads();
STC_EMU_API void syncwarp(unsigned mask);
// Warp exchange: deposits `v` for this lane, waits for every lane of `mask`, returns lane `src`'s deposit
// (src outside the mask or exited is a kernel fault, as it is undefined on the hardware).
STC_EMU_API uint64_t warp_exchange(unsigned mask, uint64_t v, int src);
STC_EMU_API unsigned warp_ballot(unsigned mask, bool pred);
STC_EMU_API void* dynamic_shared();
STC_EMU_API void shared_static(void* p, size_t bytes);
// true: the block is larger than the kernel's __launch_bounds__ (the launch fails; every thread returns)
STC_EMU_API bool launch_bounds(int max_threads);
STC_EMU_API void kernel_fault(const char* what);

struct LaunchDesc {
  const void* kernel;
  const char* name;
  dim3 grid, block;
  size_t smem;
  void* closure;
  void (*invoke)(const void* kernel, void* closure);
  void (*destroy)(void* closure);
};
// Validates the configuration (errors go to cudaGetLastError) and queues the launch on the stream.
STC_EMU_API void enqueue_launch(cudaStream_t st, const LaunchDesc& d);

template <class... P, class... A>
inline void launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                   A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  using Tup = std::tuple<typename std::decay<P>::type...>;
  LaunchDesc d;
  d.kernel = reinterpret_cast<const void*>(kernel);
  d.name = name;
  d.grid = grid;
  d.block = block;
  d.smem = smem;
  d.closure = new Tup(std::forward<A>(args)...);
  d.invoke = [](const void* k, void* c) {
    std::apply(reinterpret_cast<void (*)(P...)>(const_cast<void*>(k)), *static_cast<Tup*>(c));
  };
  d.destroy = [](void* c) { delete static_cast<Tup*>(c); };
  enqueue_launch(st, d);
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace stc_emu

#define threadIdx (::stc_emu::g_cur->tidx)
#define blockIdx (::stc_emu::g_cur->bidx)
#define blockDim (::stc_emu::g_cur->bdim)
#define gridDim (::stc_emu::g_cur->gdim)
constexpr int warpSize = 32;

inline void __syncthreads() { stc_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { stc_emu::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __trap() { stc_emu::kernel_fault("__trap()"); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = (int)stc_emu::g_cur->lane, base = lane & ~(width - 1);
  return stc_emu::from_bits<T>(stc_emu::warp_exchange(mask, stc_emu::to_bits(v), base + (src & (width - 1))));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = (int)stc_emu::g_cur->lane;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the lane's segment: its own value
  return stc_emu::from_bits<T>(stc_emu::warp_exchange(mask, stc_emu::to_bits(v), src));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)stc_emu::g_cur->lane;
  int src = lane + (int)delta;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return stc_emu::from_bits<T>(stc_emu::warp_exchange(mask, stc_emu::to_bits(v), src));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)stc_emu::g_cur->lane;
  int src = lane - (int)delta;
  if (src < (lane & ~(width - 1))) src = lane;
  return stc_emu::from_bits<T>(stc_emu::warp_exchange(mask, stc_emu::to_bits(v), src));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return stc_emu::warp_ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return stc_emu::warp_ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return stc_emu::warp_ballot(mask, pred != 0) == (mask & stc_emu::warp_ballot(mask, true)); }
inline unsigned __activemask() { return 0xffffffffu; }

template <class T>
inline T __ldg(const T* p) { return *p; }

// Intrinsics. g++ is run with -ffp-contract=off, so `a * b + c` rounds twice here (nvcc contracts it to an
// FMA by default): results may differ from a GPU's by an ulp; the _rn forms are exact either way.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __double2float_rn(double a) { return (float)a; }
inline float __int2float_rn(int a) { return (float)a; }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's device min/max overloads (unqualified in kernels)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Atomics: one kernel runs at a time on one OS thread, so plain read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

// ---- bfloat16 (cuda_bf16.h) ----
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f);
  operator float() const {
    const uint32_t b = (uint32_t)__x << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
  }
};
// Round to nearest even, as the hardware's cvt.rn.bf16.f32; NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  __nv_bfloat16 r;
  if ((b & 0x7fffffffu) > 0x7f800000u) {
    r.__x = (uint16_t)((b >> 16) | 0x0040u);
    return r;
  }
  b += 0x7fffu + ((b >> 16) & 1u);
  r.__x = (uint16_t)(b >> 16);
  return r;
}
inline __nv_bfloat16::__nv_bfloat16(float f) { __x = __float2bfloat16_rn(f).__x; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }

// ---- WMMA (mma.h) ----
// Fragments are opaque per the API, so any lane-to-element mapping honours its contract: here lane L owns the
// accumulator elements of row L/2, columns 8·(L%2) .. +7, and its matrix_a/matrix_b fragments hold exactly the
// A row and the 8 B columns it needs. mma_sync is then exact fp32 accumulation of bf16/fp32 products in k order,
// with no redundant work. load/store_matrix_sync wait for the whole warp (documented semantics) and check the
// documented requirements: 256-bit aligned pointer, ldm a multiple of 16 bytes.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;
template <class T, class L>
struct fragment<matrix_a, 16, 16, 16, T, L> {
  static constexpr int num_elements = 16;
  T x[16];  // A(row, k)
};
template <class T, class L>
struct fragment<matrix_b, 16, 16, 16, T, L> {
  static constexpr int num_elements = 128;
  T x[128];  // B(k, col0 + j) at x[8k + j]
};
template <class T>
struct fragment<accumulator, 16, 16, 16, T, void> {
  static constexpr int num_elements = 8;
  T x[8];  // C(row, col0 + j)
};

namespace detail {
inline unsigned row() { return stc_emu::g_cur->lane >> 1; }
inline unsigned col0() { return (stc_emu::g_cur->lane & 1u) * 8u; }
template <class T>
inline void check(const T* p, unsigned ldm, const char* op) {
  if (((uintptr_t)p & 31u) != 0) stc_emu::kernel_fault(op[0] == 'l' ? "wmma::load_matrix_sync: pointer not 256-bit aligned"
                                                                   : "wmma::store_matrix_sync: pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) stc_emu::kernel_fault("wmma: ldm is not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, T v) {
  for (auto& e : f.x) e = v;
}
template <class Use, class T, class L, class V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, V v) {
  for (auto& e : f.x) e = (T)v;
}

template <class T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  __syncwarp();
  detail::check(p, ldm, "load");
  const unsigned r = detail::row();
  for (int k = 0; k < 16; k++) f.x[k] = p[r * ldm + k];
}
template <class T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  __syncwarp();
  detail::check(p, ldm, "load");
  const unsigned r = detail::row();
  for (int k = 0; k < 16; k++) f.x[k] = p[k * ldm + r];
}
template <class T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  __syncwarp();
  detail::check(p, ldm, "load");
  const unsigned c0 = detail::col0();
  for (int k = 0; k < 16; k++)
    for (int j = 0; j < 8; j++) f.x[8 * k + j] = p[k * ldm + c0 + j];
}
template <class T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  __syncwarp();
  detail::check(p, ldm, "load");
  const unsigned c0 = detail::col0();
  for (int k = 0; k < 16; k++)
    for (int j = 0; j < 8; j++) f.x[8 * k + j] = p[(c0 + j) * ldm + k];
}
template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm, layout_t layout) {
  __syncwarp();
  detail::check(p, ldm, "load");
  const unsigned r = detail::row(), c0 = detail::col0();
  for (int j = 0; j < 8; j++) f.x[j] = layout == mem_row_major ? p[r * ldm + c0 + j] : p[(c0 + j) * ldm + r];
}
template <class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t layout) {
  __syncwarp();
  detail::check(p, ldm, "store");
  const unsigned r = detail::row(), c0 = detail::col0();
  for (int j = 0; j < 8; j++) {
    if (layout == mem_row_major) p[r * ldm + c0 + j] = f.x[j];
    else p[(c0 + j) * ldm + r] = f.x[j];
  }
}
template <class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  // bf16 x bf16 products are exact in fp32, so fmaf is "exact product, one rounding per accumulation"
  float out[8];
  for (int j = 0; j < 8; j++) {
    float acc = (float)c.x[j];
    for (int k = 0; k < 16; k++) acc = fmaf((float)a.x[k], (float)b.x[8 * k + j], acc);
    out[j] = acc;
  }
  for (int j = 0; j < 8; j++) d.x[j] = (TC)out[j];
}
}  // namespace wmma
}  // namespace nvcuda
