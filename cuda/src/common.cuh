// Shared internals of libswarmtune_cuda: error reporting, the per-context device pool, host/device buffer helpers.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <cstdarg>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include "api.h"

namespace stc {

// Thread-local so concurrent ops on different worker threads never overwrite each other's message.
void set_error(const char* fmt, ...);

inline int fail_cuda(cudaError_t e, const char* stmt, const char* file, int line) {
  set_error("%s:%d: %s failed: %s (%s)", file, line, stmt, cudaGetErrorString(e), cudaGetErrorName(e));
  return (int)e;
}

#define STC_CK(stmt)                                                          \
  do {                                                                        \
    cudaError_t stc_e_ = (stmt);                                              \
    if (stc_e_ != cudaSuccess) return ::stc::fail_cuda(stc_e_, #stmt, __FILE__, __LINE__); \
  } while (0)

// A kernel launch is checked for launch errors and then synchronized so faults surface at the op
// that caused them rather than at some later call.
#define STC_LAUNCHED(stream)                         \
  do {                                               \
    STC_CK(cudaGetLastError());                      \
    STC_CK(cudaStreamSynchronize(stream));           \
  } while (0)

#define STC_REQUIRE(cond, ...)                                          \
  do {                                                                  \
    if (!(cond)) {                                                      \
      ::stc::set_error(__VA_ARGS__);                                    \
      return STC_E_INVALID;                                             \
    }                                                                   \
  } while (0)

#define STC_TRY(expr)                  \
  do {                                 \
    int stc_s_ = (expr);               \
    if (stc_s_ != 0) return stc_s_;    \
  } while (0)

// Caching device allocator: cudaMalloc/cudaFree synchronize the device, so buffers are kept and
// reused by size class. On out-of-memory every cached buffer is freed and the allocation retried.
// It has its own mutex (not the context's op mutex) because device tensors are allocated and freed
// on the JS thread (stc_dev_alloc/stc_dev_free), which must not wait for a running op.
class Pool {
 public:
  int alloc(void** p, size_t bytes);
  void release(void* p, size_t bytes);
  void trim();
  int64_t held_bytes() const { std::lock_guard<std::mutex> l(mu_); return held_; }
  int64_t peak_bytes() const { std::lock_guard<std::mutex> l(mu_); return peak_; }
  int64_t in_use_bytes() const { std::lock_guard<std::mutex> l(mu_); return in_use_; }
  static size_t size_class(size_t bytes);
  ~Pool() { trim(); }
 private:
  void trim_locked();
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> live_;  // handed-out buffers and their real (size-class) bytes
  int64_t held_ = 0;  // bytes in use + cached
  int64_t peak_ = 0;
  int64_t in_use_ = 0;  // bytes handed out and not yet released
};

// A device-resident NF4 weight (stc_nf4_upload): packed codes then float32 absmax in one allocation.
struct DevNF4 {
  void* base = nullptr;      // cudaMalloc'd, owned
  size_t bytes = 0;
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  int rows = 0, cols = 0, log2bs = 0;
};

}  // namespace stc

struct stc_ctx {
  int device = 0;
  int precision = 0;  // 0 bf16 tensor cores where available, 1 fp32 SIMT
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  cudaStream_t stream = nullptr;
  std::mutex mu;  // one op at a time per context: ops run on libuv worker threads
  stc::Pool pool;
  // Device-resident NF4 weights by id. Ids are never reused, so a stale id fails with STC_E_INVALID
  // instead of touching freed memory. Guarded by mu like everything else in the context.
  std::unordered_map<int64_t, stc::DevNF4> weights;
  int64_t next_weight_id = 1;
  int64_t weight_bytes = 0;
  // Live device tensors (stc_dev_alloc): base address -> bytes. Own mutex, like the pool, because
  // tensors are allocated, freed and checked on the JS thread.
  std::mutex tensors_mu;
  std::map<uintptr_t, size_t> tensors;
  int64_t tensor_bytes = 0;
  bool tensor_cores() const { return precision == 0 && cc_major >= 8; }
};

namespace stc {

// Binds the context's device to the calling (worker) thread; every public entry point starts here.
int enter(stc_ctx* ctx);

// True when p is device memory of the context's device that kernels may read and write directly
// (cudaMalloc'd or managed), aligned to `align` bytes. Pageable, pinned or other-device pointers are
// false: they are staged through a pool buffer with cudaMemcpyDefault (UVA: any direction).
inline bool device_alias_ok(stc_ctx* c, const void* p, size_t align) {
  if (!p || ((uintptr_t)p % align) != 0) return false;
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();  // older drivers report unregistered host memory as an error
    return false;
  }
  return (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) && a.device == c->device;
}

// Scoped device buffer for one op. Every entry point takes host or device pointers alike: upload()
// and out() alias a caller's device pointer (no copy, nothing returned to the pool) and stage a host
// one through a pool buffer; download() skips the copy when the buffer aliases its destination.
struct DevBuf {
  stc_ctx* ctx = nullptr;
  void* ptr = nullptr;
  size_t bytes = 0;
  bool owned = false;  // from the pool (released on destruction) rather than the caller's device memory
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { if (ptr && owned) ctx->pool.release(ptr, bytes); }
  int alloc(stc_ctx* c, size_t n) {
    ctx = c;
    bytes = n == 0 ? 16 : n;
    STC_TRY(ctx->pool.alloc(&ptr, bytes));
    owned = true;
    return 0;
  }
  // an input: the caller's device memory itself, or a pool copy of host memory
  int upload(stc_ctx* c, const void* src, size_t n, size_t align = 4) {
    if (n && device_alias_ok(c, src, align)) {
      ctx = c;
      ptr = const_cast<void*>(src);
      bytes = n;
      return 0;
    }
    STC_TRY(alloc(c, n));
    if (n) STC_CK(cudaMemcpyAsync(ptr, src, n, cudaMemcpyDefault, c->stream));
    return 0;
  }
  // an output that is fully written before it is read: the caller's device memory, or a pool buffer
  int out(stc_ctx* c, void* dst, size_t n, size_t align = 4) {
    if (n && device_alias_ok(c, dst, align)) {
      ctx = c;
      ptr = dst;
      bytes = n;
      return 0;
    }
    return alloc(c, n);
  }
  bool aliases(const void* p) const { return !owned && ptr == p; }
  // results to the caller's pointer (a no-op copy when aliased); always synchronizes
  int download(void* dst, size_t n) {
    if (n && !aliases(dst)) STC_CK(cudaMemcpyAsync(dst, ptr, n, cudaMemcpyDefault, ctx->stream));
    STC_CK(cudaStreamSynchronize(ctx->stream));
    return 0;
  }
  int zero() {
    STC_CK(cudaMemsetAsync(ptr, 0, bytes, ctx->stream));
    return 0;
  }
  template <class T> T* as() const { return static_cast<T*>(ptr); }
};

inline unsigned blocks_for(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  // grid-stride loops cover the rest; 65535*... is far beyond what any op launches
  return (unsigned)(b < 1 ? 1 : (b > 2147483647 ? 2147483647 : b));
}

// Device-side ops on device pointers (used by the host entry points, the paged optimizer and the probe).
int gemm_dev(stc_ctx* ctx, int transA, int transB, int M, int N, int K, float alpha, const float* A,
             const float* B, float beta, float* C, bool tensor_cores);
int adamw32_dev(stc_ctx* ctx, cudaStream_t st, float* p, const float* g, float* m, float* v, int64_t n,
                const stc_adamw_hparams& hp);
int adamw8bit_dev(stc_ctx* ctx, cudaStream_t st, float* p, const float* g, uint8_t* s1, uint8_t* s2,
                  float* absmax1, float* absmax2, int64_t n, const stc_adamw_hparams& hp);

}  // namespace stc
