// Shared internals of libswarmtune_cuda: error reporting, the per-context device pool, host/device buffer helpers.
#pragma once
#include <cuda_runtime.h>
#include <atomic>
#include <chrono>
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
// set_error also clears the thread's "asynchronous failure" flag (stc_last_error_async).
void set_error(const char* fmt, ...);

// Reports a failed CUDA call. A kernel-execution error (illegal address, launch failure, device assert,
// ...) is reported asynchronously by whatever call comes next and is sticky: fail_cuda then names it as
// an asynchronous failure of an earlier op (with the device-only ops queued since the last wait) or, once
// the context is poisoned, as the consequence of that earlier failure. Defined in context.cu.
int fail_cuda(cudaError_t e, const char* stmt, const char* file, int line);

#define STC_CK(stmt)                                                          \
  do {                                                                        \
    cudaError_t stc_e_ = (stmt);                                              \
    if (stc_e_ != cudaSuccess) return ::stc::fail_cuda(stc_e_, #stmt, __FILE__, __LINE__); \
  } while (0)

// A kernel launch is checked for launch errors (bad configuration, too many resources) and returns: the
// kernel runs asynchronously on the context stream. Ops that staged host memory synchronize in
// DevBuf::download before their host outputs are read; device-only ops return without waiting (a fault in
// their kernels surfaces at the next wait as an asynchronous failure, see fail_cuda). With the context's
// sync_each_op (SWARMTUNE_CUDA_SYNC=1, stc_set_sync) every launch is followed by a synchronization, so a
// fault is reported by the op that caused it. Needs `ctx` in scope.
#define STC_LAUNCHED(stream)                              \
  do {                                                    \
    STC_CK(cudaGetLastError());                           \
    STC_TRY(::stc::after_launch(ctx, (stream)));          \
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
  // The context stream: trim() waits for it before cudaFree, because a cached buffer may have been
  // released by a device-only op whose kernels are still queued.
  cudaStream_t stream = nullptr;
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

// A device-resident NF4 weight (stc_nf4_upload): packed codes then the quantization constants in one allocation:
// float32 absmax, or (double quantization, qabsmax set) the 8-bit codes, the nested absmax and the 256-entry map.
struct DevNF4 {
  void* base = nullptr;      // cudaMalloc'd, owned
  size_t bytes = 0;
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* nested = nullptr;
  const float* code = nullptr;
  float offset = 0.0f;
  int log2nbs = 0;
  int rows = 0, cols = 0, log2bs = 0;
};

}  // namespace stc

struct stc_ctx {
  int device = 0;
  // Asynchronous ops. A device-only op (no host staging) returns once its launches are checked; these
  // count what is queued and what is known complete, for the mutex-free wait (stc_sync) and for naming
  // the ops behind an asynchronous failure. Atomics: read without the op mutex by fail_cuda.
  std::atomic<uint64_t> launched{0};      // device-only ops queued without waiting (monotonic)
  std::atomic<uint64_t> synced{0};        // every one of the first `synced` of them has completed
  std::atomic<const char*> recent[8] = {};  // names of the last device-only ops, by launched % 8
  std::atomic<int64_t> synced_ops{0};     // ops that synchronized before returning (staged host memory)
  std::atomic<int64_t> waits{0};          // host waits (stream synchronizations and event waits)
  std::atomic<int64_t> wait_ns{0};        // time spent in them
  std::atomic<int> sticky{0};             // the first kernel-execution error seen: the context is unusable
  std::mutex sticky_mu;
  char sticky_msg[768] = "";
  bool sync_each_op = false;              // debugging: synchronize after every launch (SWARMTUNE_CUDA_SYNC=1)
  // The running op (guarded by mu): its name, whether it staged host memory (it must then synchronize
  // before returning), launched kernels, or already synchronized.
  std::atomic<const char*> op_name{nullptr};
  bool op_staged = false, op_launched = false, op_synced = false;
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

// Waits for the context stream under the op mutex (the caller holds it); counts the wait and marks every
// queued op complete. `what` names the wait in a failure message.
int sync_stream(stc_ctx* ctx, const char* what);
// After a checked launch: notes that the running op has queued work; synchronizes in sync_each_op mode.
int after_launch(stc_ctx* ctx, cudaStream_t stream);
// Waits, WITHOUT holding the op mutex, until the device-only ops queued so far have completed (an event
// recorded under the mutex, waited on outside it; repeated while ops queued meanwhile, a few rounds at
// most). Host-staging ops call it before they take the mutex, so the mutex is never held for long
// waits behind queued work and an inline launch on the JS thread never blocks behind them.
int drain(stc_ctx* ctx);

// One op: holds the context's op mutex for its duration and, on the way out, counts it as queued without
// waiting when it launched work and did not synchronize.
class OpGuard {
 public:
  OpGuard(stc_ctx* c, const char* name) : ctx_(c), lock_(c->mu) {
    c->op_name.store(name);
    c->op_staged = c->op_launched = c->op_synced = false;
  }
  ~OpGuard() {
    if (ctx_->op_launched && !ctx_->op_synced) {
      const uint64_t n = ctx_->launched.fetch_add(1) + 1;
      ctx_->recent[n % 8].store(ctx_->op_name.load());
    }
  }
  OpGuard(const OpGuard&) = delete;
  OpGuard& operator=(const OpGuard&) = delete;
 private:
  stc_ctx* ctx_;
  std::unique_lock<std::mutex> lock_;
};

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
    if (n) {
      c->op_staged = true;  // host memory: the op synchronizes before returning (download)
      STC_CK(cudaMemcpyAsync(ptr, src, n, cudaMemcpyDefault, c->stream));
    }
    return 0;
  }
  // an input the caller keeps in host memory by contract (int32 ids/labels/positions, mask bytes, NF4
  // codes), copied from pageable memory: the CUDA runtime has consumed the source when cudaMemcpyAsync
  // returns (pageable host-to-device copies are staged by the driver), so the op need not synchronize for
  // it. A device pointer is used in place as by upload().
  int upload_input(stc_ctx* c, const void* src, size_t n, size_t align = 4) {
    if (n && device_alias_ok(c, src, align)) return upload(c, src, n, align);
    STC_TRY(alloc(c, n));
    cudaPointerAttributes a;
    const bool pinned = n && cudaPointerGetAttributes(&a, src) == cudaSuccess && a.type == cudaMemoryTypeHost;
    if (!pinned) cudaGetLastError();
    if (pinned) c->op_staged = true;  // page-locked: truly asynchronous, so wait before the caller reuses it
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
    if (n) c->op_staged = true;
    return alloc(c, n);
  }
  bool aliases(const void* p) const { return !owned && ptr == p; }
  // Results to the caller's pointer (no copy when aliased). Synchronizes when the op staged host memory
  // (its host outputs are valid and its host inputs consumed on return); a device-only op returns
  // without waiting: its kernels are queued on the context stream, which orders every later use.
  int download(void* dst, size_t n) {
    if (!ctx) return 0;  // never set up (a zero-size buffer)
    if (n && !aliases(dst)) {
      ctx->op_staged = true;
      STC_CK(cudaMemcpyAsync(dst, ptr, n, cudaMemcpyDefault, ctx->stream));
    }
    if (ctx->op_staged) return sync_stream(ctx, "cudaStreamSynchronize (host outputs)");
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

// Grid of an elementwise kernel with 256-thread blocks and a grid-stride loop: capped so huge tensors
// loop instead of launching millions of blocks.
inline unsigned grid1d(int64_t n) {
  unsigned b = blocks_for(n, 256);
  return b > 65535u * 8u ? 65535u * 8u : b;
}

// Device-side ops on device pointers (used by the host entry points, the paged optimizer and the probe).
int gemm_dev(stc_ctx* ctx, int transA, int transB, int M, int N, int K, float alpha, const float* A,
             const float* B, float beta, float* C, bool tensor_cores);
int adamw32_dev(stc_ctx* ctx, cudaStream_t st, float* p, const float* g, float* m, float* v, int64_t n,
                const stc_adamw_hparams& hp);
int adamw8bit_dev(stc_ctx* ctx, cudaStream_t st, float* p, const float* g, uint8_t* s1, uint8_t* s2,
                  float* absmax1, float* absmax2, int64_t n, const stc_adamw_hparams& hp);

}  // namespace stc

// First statement of every public op entry point: the op guard (what the op staged, for synchronization
// and error reports) and the context's device bound to this thread.
#define OP_ENTER()                       \
  ::stc::OpGuard stc_op_(ctx, __func__); \
  STC_TRY(enter(ctx))
