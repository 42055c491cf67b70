// Context lifecycle, device queries, error strings and the caching device pool.
#include "common.cuh"
#include <new>

namespace stc {

static thread_local char g_error[1536] = "";
static thread_local int g_error_async = 0;   // the last failure is an asynchronous failure of an earlier op
static thread_local stc_ctx* g_ctx = nullptr; // the context of the entry point running on this thread

void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof g_error, fmt, ap);
  va_end(ap);
  g_error_async = 0;
}

// Errors raised by a kernel while it runs (not by its launch): reported by a later call, and sticky.
static bool kernel_execution_error(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress: case cudaErrorLaunchFailure: case cudaErrorAssert:
    case cudaErrorHardwareStackError: case cudaErrorIllegalInstruction: case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace: case cudaErrorInvalidPc: case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

int fail_cuda(cudaError_t e, const char* stmt, const char* file, int line) {
  stc_ctx* c = g_ctx;
  if (!c || !kernel_execution_error(e)) {
    set_error("%s:%d: %s failed: %s (%s)", file, line, stmt, cudaGetErrorString(e), cudaGetErrorName(e));
    return (int)e;
  }
  const char* op = c->op_name.load();
  int expected = 0;
  if (!c->sticky.compare_exchange_strong(expected, (int)e)) {
    // the context was poisoned before: this call only reports that earlier failure again
    std::lock_guard<std::mutex> l(c->sticky_mu);
    set_error("%s: the CUDA context is unusable after an earlier asynchronous failure (%s failed at %s:%d). First "
              "report: %s", op ? op : "CUDA call", stmt, file, line, c->sticky_msg);
    g_error_async = 1;
    return (int)e;
  }
  const uint64_t launched = c->launched.load(), synced = c->synced.load();
  const uint64_t pending = launched > synced ? launched - synced : 0;
  char msg[sizeof g_error];
  if (pending == 0) {
    // nothing was queued without waiting: the failing kernel is this op's own
    snprintf(msg, sizeof msg, "%s:%d: %s failed: %s (%s) in a kernel of %s; the CUDA context is unusable from now on "
             "(sticky error): dispose the backend and restart the process", file, line, stmt, cudaGetErrorString(e),
             cudaGetErrorName(e), op ? op : "this op");
  } else {
    char names[256] = "";
    size_t used = 0;
    const uint64_t show = pending < 8 ? pending : 8;
    for (uint64_t i = 0; i < show; i++) {
      const char* n = c->recent[(launched - i) % 8].load();
      used += (size_t)snprintf(names + used, used < sizeof names ? sizeof names - used : 0, "%s%s", i ? ", " : "",
                               n ? n : "?");
      if (used >= sizeof names) break;
    }
    snprintf(msg, sizeof msg, "asynchronous failure of an earlier op: %s (%s), reported by %s at %s:%d during %s. %llu "
             "device-only op(s) were queued without waiting since the last synchronization (most recent first: %s%s); "
             "the failing kernel is one of them. Set SWARMTUNE_CUDA_SYNC=1 (or loadCudaBackend({ syncEachOp: true })) "
             "to make every op wait and name the culprit. The CUDA context is unusable from now on (sticky error): "
             "dispose the backend and restart the process", cudaGetErrorString(e), cudaGetErrorName(e), stmt, file,
             line, op ? op : "a CUDA call", (unsigned long long)pending, names, pending > show ? ", ..." : "");
  }
  {
    std::lock_guard<std::mutex> l(c->sticky_mu);
    snprintf(c->sticky_msg, sizeof c->sticky_msg, "%s", msg);
  }
  set_error("%s", msg);
  g_error_async = pending > 0 ? 1 : 0;
  return (int)e;
}

int sync_stream(stc_ctx* ctx, const char* what) {
  const uint64_t target = ctx->launched.load();
  const auto t0 = std::chrono::steady_clock::now();
  const cudaError_t e = cudaStreamSynchronize(ctx->stream);
  ctx->wait_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  ctx->waits++;
  if (!ctx->op_synced) ctx->synced_ops++;
  ctx->op_synced = true;
  if (e != cudaSuccess) return fail_cuda(e, what, __FILE__, __LINE__);
  uint64_t cur = ctx->synced.load();
  while (cur < target && !ctx->synced.compare_exchange_weak(cur, target)) {}
  return 0;
}

int after_launch(stc_ctx* ctx, cudaStream_t stream) {
  ctx->op_launched = true;
  if (!ctx->sync_each_op) return 0;
  if (stream == ctx->stream) return sync_stream(ctx, "cudaStreamSynchronize (SWARMTUNE_CUDA_SYNC: after a launch)");
  STC_CK(cudaStreamSynchronize(stream));
  return 0;
}

int drain(stc_ctx* c) {
  for (int round = 0; round < 4; round++) {
    uint64_t target = 0;
    cudaEvent_t ev = nullptr;
    {
      std::lock_guard<std::mutex> l(c->mu);
      target = c->launched.load();
      if (target <= c->synced.load()) return 0;
      STC_CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      const cudaError_t e = cudaEventRecord(ev, c->stream);
      if (e != cudaSuccess) {
        cudaEventDestroy(ev);
        return fail_cuda(e, "cudaEventRecord (waiting for queued ops)", __FILE__, __LINE__);
      }
    }
    const auto t0 = std::chrono::steady_clock::now();
    const cudaError_t e = cudaEventSynchronize(ev);
    c->wait_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    c->waits++;
    cudaEventDestroy(ev);
    if (e != cudaSuccess) return fail_cuda(e, "cudaEventSynchronize (waiting for queued ops)", __FILE__, __LINE__);
    uint64_t cur = c->synced.load();
    while (cur < target && !c->synced.compare_exchange_weak(cur, target)) {}
  }
  return 0;  // still busy after a few rounds: the caller's own wait covers the rest
}

size_t Pool::size_class(size_t bytes) {
  // Small buffers round to 4 KiB, large ones to 2 MiB: the waste stays under ~1% for activations
  // while repeated shapes hit the same class.
  const size_t small = 4096, large = 2u << 20;
  size_t g = bytes >= (64u << 20) ? large : small;
  return (bytes + g - 1) / g * g;
}

int Pool::alloc(void** p, size_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  size_t sz = size_class(bytes);
  auto it = free_.lower_bound(sz);
  // Reuse a cached buffer only when it is not much larger than needed (<= 2x).
  if (it != free_.end() && it->first <= 2 * sz) {
    *p = it->second;
    in_use_ += (int64_t)it->first;
    live_.emplace(*p, it->first);
    free_.erase(it);
    return 0;
  }
  cudaError_t e = cudaMalloc(p, sz);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the non-sticky OOM before retrying
    trim_locked();
    e = cudaMalloc(p, sz);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t freeB = 0, totalB = 0;
    cudaMemGetInfo(&freeB, &totalB);
    set_error("cudaMalloc(%zu bytes) failed: %s (device free %zu of %zu bytes, pool holds %lld)", sz,
              cudaGetErrorString(e), freeB, totalB, (long long)held_);
    return (int)e;
  }
  held_ += (int64_t)sz;
  in_use_ += (int64_t)sz;
  live_.emplace(*p, sz);
  if (held_ > peak_) peak_ = held_;
  return 0;
}

// A released buffer goes back under its real size (a cached buffer may have been handed out for a
// request up to 2x smaller), so held/in-use bytes stay exact.
void Pool::release(void* p, size_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = live_.find(p);
  const size_t sz = it != live_.end() ? it->second : size_class(bytes);
  if (it != live_.end()) live_.erase(it);
  free_.emplace(sz, p);
  in_use_ -= (int64_t)sz;
}

void Pool::trim() {
  std::lock_guard<std::mutex> l(mu_);
  trim_locked();
}

void Pool::trim_locked() {
  // cached buffers may have been released by device-only ops whose kernels are still queued
  if (stream && !free_.empty() && cudaStreamSynchronize(stream) != cudaSuccess) cudaGetLastError();
  for (auto& kv : free_) {
    cudaFree(kv.second);
    held_ -= (int64_t)kv.first;
  }
  free_.clear();
}

int enter(stc_ctx* ctx) {
  if (!ctx) {
    set_error("null CUDA context (backend disposed?)");
    return STC_E_INVALID;
  }
  g_ctx = ctx;
  STC_CK(cudaSetDevice(ctx->device));
  return 0;
}

}  // namespace stc

using namespace stc;

extern "C" {

const char* stc_last_error(void) { return g_error; }
int stc_last_error_async(void) { return g_error_async; }
const char* stc_version(void) { return "swarmtune-cuda 1"; }

int stc_device_count(int* count) {
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    set_error("cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    *count = 0;
    return STC_E_NO_DEVICE;
  }
  if (*count == 0) {
    set_error("no CUDA device present");
    return STC_E_NO_DEVICE;
  }
  return 0;
}

int stc_device_info_get(int device, stc_device_info* out) {
  int n = 0;
  STC_TRY(stc_device_count(&n));
  if (device < 0 || device >= n) {
    set_error("CUDA device %d out of range (found %d)", device, n);
    return STC_E_NO_DEVICE;
  }
  cudaDeviceProp prop;
  STC_CK(cudaGetDeviceProperties(&prop, device));
  memset(out, 0, sizeof *out);
  strncpy(out->name, prop.name, sizeof out->name - 1);
  out->cc_major = prop.major;
  out->cc_minor = prop.minor;
  out->sm_count = prop.multiProcessorCount;
  STC_CK(cudaSetDevice(device));
  size_t freeB = 0, totalB = 0;
  STC_CK(cudaMemGetInfo(&freeB, &totalB));
  out->total_memory_bytes = (int64_t)totalB;
  out->free_memory_bytes = (int64_t)freeB;
  return 0;
}

int stc_open(int device, int gemm_precision, stc_ctx** out) {
  *out = nullptr;
  stc_device_info info;
  STC_TRY(stc_device_info_get(device, &info));
  if (info.cc_major < 7 || (info.cc_major == 7 && info.cc_minor < 5)) {
    set_error("CUDA device %d (%s) has compute capability %d.%d; swarmtune needs 7.5 or newer", device, info.name,
              info.cc_major, info.cc_minor);
    return STC_E_NO_DEVICE;
  }
  if (gemm_precision != 0 && gemm_precision != 1) {
    set_error("gemm precision must be 0 (bf16) or 1 (fp32), got %d", gemm_precision);
    return STC_E_INVALID;
  }
  stc_ctx* ctx = new (std::nothrow) stc_ctx();
  if (!ctx) {
    set_error("out of host memory creating CUDA context");
    return STC_E_HOST_ALLOC;
  }
  ctx->device = device;
  ctx->precision = gemm_precision;
  ctx->cc_major = info.cc_major;
  ctx->cc_minor = info.cc_minor;
  ctx->sm_count = info.sm_count;
  cudaError_t e = cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    delete ctx;
    return fail_cuda(e, "cudaStreamCreateWithFlags", __FILE__, __LINE__);
  }
  ctx->pool.stream = ctx->stream;
  *out = ctx;
  return 0;
}

int stc_set_sync(stc_ctx* ctx, int sync_each_op) {
  STC_TRY(enter(ctx));
  std::lock_guard<std::mutex> lock(ctx->mu);
  ctx->sync_each_op = sync_each_op != 0;
  return 0;
}

int stc_sync(stc_ctx* ctx) {
  STC_TRY(enter(ctx));
  return drain(ctx);
}

int stc_async_stats(stc_ctx* ctx, int64_t* out8) {
  for (int i = 0; i < 8; i++) out8[i] = 0;
  STC_TRY(enter(ctx));
  const uint64_t launched = ctx->launched.load(), synced = ctx->synced.load();
  out8[0] = (int64_t)launched;
  out8[1] = ctx->synced_ops.load();
  out8[2] = ctx->waits.load();
  out8[3] = ctx->wait_ns.load();
  out8[4] = (int64_t)(launched > synced ? launched - synced : 0);
  out8[5] = ctx->sticky.load();
  out8[6] = ctx->sync_each_op ? 1 : 0;
  return 0;
}

void stc_close(stc_ctx* ctx) {
  if (!ctx) return;
  {
    std::lock_guard<std::mutex> lock(ctx->mu);
    cudaSetDevice(ctx->device);
    cudaStreamSynchronize(ctx->stream);
    for (auto& kv : ctx->weights) cudaFree(kv.second.base);
    ctx->weights.clear();
    ctx->weight_bytes = 0;
    {
      // device tensors the caller never freed go back to the pool, then everything is released
      std::lock_guard<std::mutex> tl(ctx->tensors_mu);
      for (auto& kv : ctx->tensors) ctx->pool.release((void*)kv.first, kv.second);
      ctx->tensors.clear();
      ctx->tensor_bytes = 0;
    }
    ctx->pool.trim();
    cudaStreamDestroy(ctx->stream);
  }
  delete ctx;
}

int stc_memory_stats(stc_ctx* ctx, int64_t* pool_bytes, int64_t* peak_bytes) {
  *pool_bytes = 0;
  *peak_bytes = 0;
  STC_TRY(enter(ctx));  // rejects a null context
  std::lock_guard<std::mutex> lock(ctx->mu);
  *pool_bytes = ctx->pool.held_bytes();
  *peak_bytes = ctx->pool.peak_bytes();
  return 0;
}

}  // extern "C"
