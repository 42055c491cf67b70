// Shared internals of libswarmtune_cuda: error reporting, the per-context device pool, host<->device helpers.
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
class Pool {
 public:
  int alloc(void** p, size_t bytes);
  void release(void* p, size_t bytes);
  void trim();
  int64_t held_bytes() const { return held_; }
  int64_t peak_bytes() const { return peak_; }
  static size_t size_class(size_t bytes);
  ~Pool() { trim(); }
 private:
  std::multimap<size_t, void*> free_;
  int64_t held_ = 0;  // bytes in use + cached
  int64_t peak_ = 0;
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
  bool tensor_cores() const { return precision == 0 && cc_major >= 8; }
};

namespace stc {

// Binds the context's device to the calling (worker) thread; every public entry point starts here.
int enter(stc_ctx* ctx);

// Scoped device buffer from the context pool.
struct DevBuf {
  stc_ctx* ctx = nullptr;
  void* ptr = nullptr;
  size_t bytes = 0;
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { if (ptr) ctx->pool.release(ptr, bytes); }
  int alloc(stc_ctx* c, size_t n) {
    ctx = c;
    bytes = n == 0 ? 16 : n;
    return ctx->pool.alloc(&ptr, bytes);
  }
  int upload(stc_ctx* c, const void* host, size_t n) {
    STC_TRY(alloc(c, n));
    if (n) STC_CK(cudaMemcpyAsync(ptr, host, n, cudaMemcpyHostToDevice, c->stream));
    return 0;
  }
  int download(void* host, size_t n) {
    if (n) STC_CK(cudaMemcpyAsync(host, ptr, n, cudaMemcpyDeviceToHost, ctx->stream));
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
