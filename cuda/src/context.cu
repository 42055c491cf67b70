// Context lifecycle, device queries, error strings and the caching device pool.
#include "common.cuh"
#include <cstring>
#include <new>

namespace stc {

static thread_local char g_error[1024] = "";

void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof g_error, fmt, ap);
  va_end(ap);
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
  STC_CK(cudaSetDevice(ctx->device));
  return 0;
}

}  // namespace stc

using namespace stc;

extern "C" {

const char* stc_last_error(void) { return g_error; }
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
  *out = ctx;
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
