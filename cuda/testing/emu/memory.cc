// swarmtune CUDA emulator runtime: device and pinned memory (host memory in a table, each allocation between
// inaccessible guard pages), what kind of memory a pointer is, and copies and fills with the runtime's documented
// host synchronization. See emu_internal.h.
#include "emu_internal.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <memory>
#include <vector>

namespace stc_emu {

size_t page_size() {
  static size_t p = (size_t)sysconf(_SC_PAGESIZE);
  return p;
}

namespace {

enum Kind { kDevice, kPinned };
struct Alloc {
  size_t bytes;      // as requested
  size_t map_bytes;  // whole mapping, guard pages included
  void* map;
  Kind kind;
};
std::mutex g_mem_mu;
std::map<uintptr_t, Alloc> g_allocs;  // base -> allocation
size_t g_device_bytes = 0;

// Device buffers end exactly at an inaccessible page (and start right after one), so a kernel running off
// either end of a page-multiple allocation faults instead of reading a neighbour.
void* map_guarded(size_t bytes, size_t* map_bytes, void** map) {
  const size_t ps = page_size();
  const size_t body = (bytes + ps - 1) / ps * ps;
  const size_t total = body + 2 * ps;
  void* m = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  if (mprotect((char*)m + ps, body, PROT_READ | PROT_WRITE) != 0) {
    munmap(m, total);
    return nullptr;
  }
  *map_bytes = total;
  *map = m;
  // device allocations are 256-byte aligned: put the end at the guard when that keeps the alignment
  char* p = (char*)m + ps + (body - bytes) / 256 * 256;
  return p;
}

const Alloc* find_alloc_locked(const void* p, uintptr_t* base) {
  const uintptr_t a = (uintptr_t)p;
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return nullptr;
  --it;
  if (a >= it->first + (it->second.bytes ? it->second.bytes : 1)) return nullptr;
  if (base) *base = it->first;
  return &it->second;
}

}  // namespace

bool classify(const void* p, size_t n, Mem* m) {
  std::lock_guard<std::mutex> l(g_mem_mu);
  uintptr_t base = 0;
  const Alloc* a = find_alloc_locked(p, &base);
  if (!a) {
    *m = Mem::Pageable;
    return true;
  }
  *m = a->kind == kDevice ? Mem::Device : Mem::Pinned;
  return (uintptr_t)p - base + n <= a->bytes;
}

std::string alloc_near(uintptr_t a) {
  std::lock_guard<std::mutex> l(g_mem_mu);
  auto it = g_allocs.upper_bound(a);
  char buf[200] = "";
  if (it != g_allocs.begin()) {
    auto p = std::prev(it);
    snprintf(buf, sizeof buf, "; nearest allocation below: %p + %zu bytes (%s)", (void*)p->first, p->second.bytes,
             p->second.kind == kDevice ? "device" : "pinned");
  }
  return buf;
}

}  // namespace stc_emu

using namespace stc_emu;

// ---------------------------------------------------------------- runtime API
extern "C++" {

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  EMU_STICKY_CHECK();
  std::lock_guard<std::mutex> l(g_mem_mu);
  *total_bytes = cfg().total_mem;
  *free_bytes = cfg().total_mem - g_device_bytes;
  return cudaSuccess;
}

static cudaError_t alloc_kind(void** p, size_t bytes, Kind kind) {
  *p = nullptr;
  EMU_STICKY_CHECK();
  if (bytes == 0) return cudaSuccess;
  {
    std::lock_guard<std::mutex> l(g_mem_mu);
    if (kind == kDevice && bytes > cfg().total_mem - g_device_bytes) return ret(cudaErrorMemoryAllocation);
  }
  size_t mb = 0;
  void* map = nullptr;
  void* q = map_guarded(bytes, &mb, &map);
  if (!q) return ret(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> l(g_mem_mu);
  if (kind == kDevice) g_device_bytes += bytes;
  g_allocs[(uintptr_t)q] = Alloc{bytes, mb, map, kind};
  *p = q;
  return cudaSuccess;
}

static cudaError_t free_kind(void* p, Kind kind) {
  if (!p) return cudaSuccess;
  flush_all();  // cudaFree waits for the device, as on the hardware
  EMU_STICKY_CHECK();
  Alloc a;
  {
    std::lock_guard<std::mutex> l(g_mem_mu);
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.kind != kind) {
      fprintf(stderr, "stc-emu: %s(%p): not the base of a live %s allocation\n", kind == kDevice ? "cudaFree" : "cudaFreeHost",
              p, kind == kDevice ? "device" : "pinned host");
      return ret(kind == kDevice ? cudaErrorInvalidDevicePointer : cudaErrorInvalidValue);
    }
    a = it->second;
    g_allocs.erase(it);
    if (kind == kDevice) g_device_bytes -= a.bytes;
  }
  munmap(a.map, a.map_bytes);
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) { return alloc_kind(p, bytes, kDevice); }
cudaError_t cudaFree(void* p) { return free_kind(p, kDevice); }
cudaError_t cudaMallocHost(void** p, size_t bytes) { return alloc_kind(p, bytes, kPinned); }
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned int) { return alloc_kind(p, bytes, kPinned); }
cudaError_t cudaFreeHost(void* p) { return free_kind(p, kPinned); }
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return alloc_kind(p, bytes, kDevice); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t st) {
  flush(S(st));
  return free_kind(p, kDevice);
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  EMU_STICKY_CHECK();
  memset(a, 0, sizeof *a);
  Mem m;
  classify(p, 0, &m);
  a->device = m == Mem::Pageable ? -2 : 0;
  a->type = m == Mem::Device ? cudaMemoryTypeDevice : (m == Mem::Pinned ? cudaMemoryTypeHost : cudaMemoryTypeUnregistered);
  a->devicePointer = m == Mem::Pageable ? nullptr : const_cast<void*>(p);
  a->hostPointer = m == Mem::Device ? nullptr : const_cast<void*>(p);
  return cudaSuccess;
}

// Copies follow the runtime's documented host synchronization: from pageable memory the source is consumed
// (staged) before the call returns; into pageable memory the call returns once the copy is done (so it waits
// for the stream); between device and pinned memory the copy is queued like a kernel.
static cudaError_t memcpy_impl(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t st, bool sync) {
  EMU_STICKY_CHECK();
  if (n == 0) return cudaSuccess;
  if (!dst || !src) return ret(cudaErrorInvalidValue);
  Mem md, ms;
  const bool okd = classify(dst, n, &md), oks = classify(src, n, &ms);
  if (!okd || !oks) {
    fprintf(stderr, "stc-emu: cudaMemcpy%s(%p <- %p, %zu bytes): the %s range runs past the end of its allocation\n",
            sync ? "" : "Async", dst, src, n, okd ? "source" : "destination");
    return ret(cudaErrorInvalidValue);
  }
  const bool dDev = md == Mem::Device, sDev = ms == Mem::Device;
  bool kind_ok = true;
  switch (kind) {
    case cudaMemcpyHostToHost: kind_ok = !dDev && !sDev; break;
    case cudaMemcpyHostToDevice: kind_ok = dDev && !sDev; break;
    case cudaMemcpyDeviceToHost: kind_ok = !dDev && sDev; break;
    case cudaMemcpyDeviceToDevice: kind_ok = dDev && sDev; break;
    case cudaMemcpyDefault: break;
    default: return ret(cudaErrorInvalidMemcpyDirection);
  }
  if (!kind_ok) {
    fprintf(stderr, "stc-emu: cudaMemcpy kind %d does not match the pointers (dst %s, src %s)\n", (int)kind,
            dDev ? "device" : "host", sDev ? "device" : "host");
    return ret(cudaErrorInvalidValue);
  }
  Stream* s = S(st);
  if (sync || md == Mem::Pageable) {
    flush(s);
    EMU_STICKY_CHECK();
    memmove(dst, src, n);
    return cudaSuccess;
  }
  if (ms == Mem::Pageable) {
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
    enqueue(s, [dst, staged]() {
      if (!sticky()) memcpy(dst, staged->data(), staged->size());
    });
    return cudaSuccess;
  }
  enqueue(s, [dst, src, n]() {
    if (!sticky()) memmove(dst, src, n);
  });
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  return memcpy_impl(dst, src, n, kind, 0, true);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t st) {
  return memcpy_impl(dst, src, n, kind, st, false);
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t st) {
  EMU_STICKY_CHECK();
  if (n == 0) return cudaSuccess;
  Mem m;
  if (!classify(p, n, &m) || m != Mem::Device) {
    fprintf(stderr, "stc-emu: cudaMemsetAsync(%p, %zu bytes): not inside one device allocation\n", p, n);
    return ret(cudaErrorInvalidValue);
  }
  enqueue(S(st), [p, value, n]() {
    if (!sticky()) memset(p, value, n);
  });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t n) {
  const cudaError_t e = cudaMemsetAsync(p, value, n, 0);
  if (e != cudaSuccess) return e;
  return cudaStreamSynchronize(0);
}

}  // extern "C++"
