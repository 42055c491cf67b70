// swarmtune CUDA emulator: what the parts of its runtime share. device.cc: configuration, errors and device
// properties; memory.cc: the memory table, allocation and copies; streams.cc: stream queues and events; launch.cc:
// per-kernel bookkeeping and launch checks; threads.cc: running a launch, one coroutine per CUDA thread, with
// barriers, warp exchanges, shared memory and kernel faults. See stc_emu.h and docs/cuda.md ("Emulator").
#pragma once
#include "stc_emu.h"

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace stc_emu {

// ---------------------------------------------------------------- configuration (device.cc)
struct Config {
  int cc_major = 8, cc_minor = 0;
  size_t total_mem = (size_t)4096 << 20;
  bool immediate = false;  // SWARMTUNE_CUDA_EMU_SYNC=1: run queued work at issue time
  int sm_count = 4;
  size_t stack_bytes = 64 << 10;
  bool verbose = false;
  Config();  // the emulator's own knobs: SWARMTUNE_CUDA_EMU_CC, _MEM_MB, _SYNC, _VERBOSE
  // cudaDevAttrMaxSharedMemoryPerBlockOptin by architecture
  size_t smem_optin() const {
    const int cc = cc_major * 10 + cc_minor;
    if (cc >= 90) return 232448;  // 227 KiB
    if (cc == 80 || cc == 87) return 166912;  // 163 KiB
    if (cc >= 86) return 101376;  // 99 KiB
    if (cc == 75) return 65536;
    return 49152;
  }
};
const Config& cfg();

constexpr size_t kStaticSmemLimit = 48 << 10;   // static __shared__ per block
constexpr size_t kDefaultDynSmemLimit = 48 << 10;  // dynamic without cudaFuncSetAttribute

extern std::recursive_mutex g_device;  // held while queued work executes (one kernel at a time)

// ---------------------------------------------------------------- errors (device.cc)
// A fault is sticky, as on the hardware: every later API call returns it.
extern thread_local cudaError_t t_last;
extern std::atomic<int> g_sticky;
cudaError_t ret(cudaError_t e);  // records e as the last error; returns it
cudaError_t sticky();
#define EMU_STICKY_CHECK()                           \
  do {                                               \
    if (int s_ = g_sticky.load()) return ret((cudaError_t)s_); \
  } while (0)

void make_sticky(cudaError_t e, const char* msg);
const char* error_name(cudaError_t e);
const char* error_string(cudaError_t e);

// ---------------------------------------------------------------- memory (memory.cc)
size_t page_size();
enum class Mem { Device, Pinned, Pageable };
// What kind of memory [p, p+n) is; a range that starts in an allocation but runs past its end is invalid.
bool classify(const void* p, size_t n, Mem* m);
// "; nearest allocation below: ..." for a fault message (empty when there is none)
std::string alloc_near(uintptr_t a);

// ---------------------------------------------------------------- streams (streams.cc)
struct Stream;
Stream* S(cudaStream_t st);  // the null stream for 0
void flush(Stream* s);       // runs everything queued on s (takes g_device)
void flush_all();
void enqueue(Stream* s, std::function<void()> f);

// ---------------------------------------------------------------- kernels (launch.cc, threads.cc)
struct KernelInfo {
  std::vector<std::pair<void*, size_t>> statics;  // registered static __shared__ storage
  std::atomic<size_t> static_bytes{0};
  std::atomic<int> max_dyn_smem{-1};  // cudaFuncAttributeMaxDynamicSharedMemorySize, -1 = not set
  std::atomic<bool> ran{false};  // has run once: its static shared memory and launch bounds are known
  std::atomic<int> bound{0};  // __launch_bounds__ seen when it last ran (0 = unknown): later launches check at issue
};
// Per kernel: looked up under g_kinfo_mu (launches are queued from any thread without waiting for the device);
// nodes are stable, `statics` is only touched while the kernel runs (under g_device).
KernelInfo& kernel_info(const void* k);
// Runs one launch (called with g_device held): every block of the grid in turn (threads.cc).
void run_launch(const LaunchDesc& d);

}  // namespace stc_emu
