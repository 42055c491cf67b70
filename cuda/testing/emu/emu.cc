// swarmtune CUDA emulator runtime: device memory table, streams/events, kernel execution with one coroutine
// per CUDA thread, warp exchanges, shared memory, launch checks and kernel faults. See stc_emu.h and
// docs/cuda.md ("Emulator").
//
// Execution model. One kernel runs at a time (g_device, a recursive mutex, is held while queued work executes),
// so block-shared storage can be plain statics and the "current thread" a plain global. Blocks of a grid run
// one after another. Inside a block every thread is a coroutine on its own stack (64 KiB + a guard page):
// the scheduler resumes runnable threads in index order; a thread runs until it blocks at __syncthreads or a
// warp-synchronous operation, or exits. Running each thread as far as it can before switching is the most
// adversarial legal schedule for a missing barrier (a reader runs before the writers it forgot to wait for).
// Static __shared__ storage and the dynamic shared buffer are filled with 0xFF bytes (NaN as float) before
// every block, so a read of shared memory no thread of this block wrote shows up as NaN or -1.
//
// Faults (a kernel touching unmapped or guard memory, a warp operation with a lane outside its mask or exited,
// a deadlock, __trap) end the launch, print what happened to stderr and make the error sticky, as a device
// fault is on the hardware: every later API call returns it.
#include "stc_emu.h"

#include <signal.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace stc_emu {

ThreadCtx* g_cur = nullptr;

namespace {

// ---------------------------------------------------------------- configuration
struct Config {
  int cc_major = 8, cc_minor = 0;
  size_t total_mem = (size_t)4096 << 20;
  bool immediate = false;  // SWARMTUNE_CUDA_EMU_SYNC=1: run queued work at issue time
  int sm_count = 4;
  size_t stack_bytes = 64 << 10;
  bool verbose = false;
  Config() {
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
const Config& cfg() {
  static Config c;
  return c;
}

constexpr size_t kStaticSmemLimit = 48 << 10;   // static __shared__ per block
constexpr size_t kDefaultDynSmemLimit = 48 << 10;  // dynamic without cudaFuncSetAttribute

std::recursive_mutex g_device;  // held while queued work executes (one kernel at a time)

// ---------------------------------------------------------------- errors
thread_local cudaError_t t_last = cudaSuccess;
std::atomic<int> g_sticky{0};
char g_sticky_msg[1024] = "";

cudaError_t ret(cudaError_t e) {
  if (e != cudaSuccess) t_last = e;
  return e;
}
cudaError_t sticky() { return (cudaError_t)g_sticky.load(); }
#define EMU_STICKY_CHECK()                           \
  do {                                               \
    if (int s_ = g_sticky.load()) return ret((cudaError_t)s_); \
  } while (0)

void make_sticky(cudaError_t e, const char* msg) {
  int expected = 0;
  if (g_sticky.compare_exchange_strong(expected, (int)e)) snprintf(g_sticky_msg, sizeof g_sticky_msg, "%s", msg);
  fprintf(stderr, "stc-emu: kernel fault (%s, sticky): %s\n", cudaGetErrorName(e), msg);
}

// ---------------------------------------------------------------- memory table
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

size_t page_size() {
  static size_t p = (size_t)sysconf(_SC_PAGESIZE);
  return p;
}

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

enum class Mem { Device, Pinned, Pageable };
// What kind of memory [p, p+n) is; a range that starts in an allocation but runs past its end is invalid.
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

// ---------------------------------------------------------------- streams
struct Event;
struct Stream {
  unsigned flags = 0;
  std::mutex q_mu;
  std::deque<std::function<void()>> q;
};
Stream g_null_stream;
std::mutex g_streams_mu;
std::vector<Stream*> g_streams;  // live streams (for cudaDeviceSynchronize / cudaFree)

Stream* S(cudaStream_t st) { return st ? reinterpret_cast<Stream*>(st) : &g_null_stream; }

void flush(Stream* s);
void flush_all() {
  std::lock_guard<std::recursive_mutex> dev(g_device);
  std::vector<Stream*> all;
  {
    std::lock_guard<std::mutex> l(g_streams_mu);
    all = g_streams;
  }
  flush(&g_null_stream);
  for (Stream* s : all) flush(s);
}

void flush(Stream* s) {
  std::lock_guard<std::recursive_mutex> dev(g_device);
  for (;;) {
    std::function<void()> f;
    {
      std::lock_guard<std::mutex> l(s->q_mu);
      if (s->q.empty()) return;
      f = std::move(s->q.front());
      s->q.pop_front();
    }
    f();
  }
}

void enqueue(Stream* s, std::function<void()> f) {
  {
    std::lock_guard<std::mutex> l(s->q_mu);
    s->q.push_back(std::move(f));
  }
  if (cfg().immediate) flush(s);
}

struct Event {
  unsigned flags = 0;
  std::atomic<bool> done{true};
  Stream* stream = nullptr;
  std::chrono::steady_clock::time_point t;
  bool recorded = false;
};

// ---------------------------------------------------------------- coroutines
#if defined(__x86_64__)
// switch_to(save, next): saves callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save and resumes the context whose stack pointer is `next`.
extern "C" void stc_emu_switch(void** save, void* next);
extern "C" void stc_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .type stc_emu_switch,@function
stc_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size stc_emu_switch,.-stc_emu_switch
  .p2align 4
  .type stc_emu_trampoline,@function
stc_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size stc_emu_trampoline,.-stc_emu_trampoline
)");
#endif

struct Thread : ThreadCtx {
  enum State { Runnable, BlockWait, WarpWait, Exited } state = Runnable;
  uint64_t wcount = 0;    // warp-synchronous operations this thread has entered
  unsigned wmask = 0;     // the mask of the one it waits in
  char* stack = nullptr;  // usable stack (guard page below)
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct WarpSlots {
  uint64_t val[2][32];
};

struct Block {
  std::vector<Thread> threads;
  std::vector<WarpSlots> warps;
  int n = 0, alive = 0, arrived = 0;
};

Block g_block;
#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_uc;
#endif
Thread* g_running = nullptr;

// stacks, reused across launches
std::vector<char*> g_stacks;
char* stack_for(int i) {
  while ((int)g_stacks.size() <= i) {
    const size_t ps = page_size(), sz = cfg().stack_bytes;
    void* m = mmap(nullptr, sz + ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(m, ps, PROT_NONE);  // overflow faults instead of corrupting the next stack
    g_stacks.push_back((char*)m + ps);
  }
  return g_stacks[i];
}

// the running launch
struct KernelInfo {
  std::vector<std::pair<void*, size_t>> statics;  // registered static __shared__ storage
  std::atomic<size_t> static_bytes{0};
  std::atomic<int> max_dyn_smem{-1};  // cudaFuncAttributeMaxDynamicSharedMemorySize, -1 = not set
  std::atomic<bool> ran{false};  // has run once: its static shared memory and launch bounds are known
  std::atomic<int> bound{0};  // __launch_bounds__ seen when it last ran (0 = unknown): later launches check at issue
};
// Per kernel: looked up under g_kinfo_mu (launches are queued from any thread without waiting for the device);
// nodes are stable, `statics` is only touched while the kernel runs (under g_device).
std::unordered_map<const void*, KernelInfo> g_kernels;
std::mutex g_kinfo_mu;
KernelInfo& kernel_info(const void* k) {
  std::lock_guard<std::mutex> l(g_kinfo_mu);
  return g_kernels[k];
}

struct Running {
  const LaunchDesc* d = nullptr;
  KernelInfo* info = nullptr;
  std::vector<char> dyn;  // dynamic shared memory (+ alignment slack)
  char* dyn_ptr = nullptr;
  bool abort = false;
  cudaError_t abort_status = cudaSuccess;
  bool abort_sticky = false;
  std::string abort_msg;
};
Running g_run;

thread_local volatile sig_atomic_t t_in_kernel = 0;
sigjmp_buf g_fault_jmp;
volatile uintptr_t g_fault_addr = 0;
volatile int g_fault_sig = 0;

void describe_thread(char* buf, size_t n) {
  if (!g_running) {
    snprintf(buf, n, "-");
    return;
  }
  const Thread& t = *g_running;
  snprintf(buf, n, "block (%u,%u,%u) thread (%u,%u,%u)", t.bidx.x, t.bidx.y, t.bidx.z, t.tidx.x, t.tidx.y, t.tidx.z);
}

void yield_to_scheduler() {
  Thread* t = g_running;
#if defined(__x86_64__)
  stc_emu_switch(&t->sp, g_sched_sp);
#else
  swapcontext(&t->uc, &g_sched_uc);
#endif
}

// Ends the launch from inside a kernel thread: recorded, then this thread is suspended for good.
[[noreturn]] void abort_launch(cudaError_t e, bool is_sticky, const std::string& msg) {
  if (!g_run.abort) {
    g_run.abort = true;
    g_run.abort_status = e;
    g_run.abort_sticky = is_sticky;
    char where[160];
    describe_thread(where, sizeof where);
    g_run.abort_msg = std::string(g_run.d ? g_run.d->name : "?") + " " + where + ": " + msg;
  }
  g_running->state = Thread::Exited;
  yield_to_scheduler();
  abort();  // never resumed
}

void thread_main(Thread* t) {
  g_run.d->invoke(g_run.d->kernel, g_run.d->closure);
  t->state = Thread::Exited;
  Block& b = g_block;
  b.alive--;
  if (b.arrived > 0 && b.arrived == b.alive) {  // the rest wait at a barrier this thread never reaches
    for (auto& o : b.threads)
      if (o.state == Thread::BlockWait) o.state = Thread::Runnable;
    b.arrived = 0;
  }
  yield_to_scheduler();
  abort();
}

#if defined(__x86_64__)
extern "C" void stc_emu_thread_entry(Thread* t) { thread_main(t); }
#else
void uc_entry(unsigned lo, unsigned hi) { thread_main((Thread*)(((uintptr_t)hi << 32) | lo)); }
#endif

void init_thread(Thread& t, char* stack) {
  const size_t sz = cfg().stack_bytes;
  t.stack = stack;
#if defined(__x86_64__)
  uintptr_t top = ((uintptr_t)stack + sz) & ~(uintptr_t)15;
  uint64_t* s = (uint64_t*)top;
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  s[-1] = (uint64_t)(uintptr_t)&stc_emu_trampoline;  // ret target
  s[-2] = 0;                                         // rbp
  s[-3] = 0;                                         // rbx
  s[-4] = (uint64_t)(uintptr_t)&t;                   // r12: argument
  s[-5] = (uint64_t)(uintptr_t)&stc_emu_thread_entry;  // r13: entry
  s[-6] = 0;                                         // r14
  s[-7] = 0;                                         // r15
  s[-8] = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
  t.sp = &s[-8];
#else
  getcontext(&t.uc);
  t.uc.uc_stack.ss_sp = stack;
  t.uc.uc_stack.ss_size = sz;
  t.uc.uc_link = nullptr;
  const uintptr_t p = (uintptr_t)&t;
  makecontext(&t.uc, (void (*)())uc_entry, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
#endif
}

void resume(Thread& t) {
  g_running = &t;
  g_cur = &t;
  t_in_kernel = 1;
#if defined(__x86_64__)
  stc_emu_switch(&g_sched_sp, t.sp);
#else
  swapcontext(&g_sched_uc, &t.uc);
#endif
  t_in_kernel = 0;
  g_running = nullptr;
}

bool warp_ready(const Thread& t) {
  const Block& b = g_block;
  const int base = (int)t.warp * 32;
  for (unsigned m = t.wmask; m; m &= m - 1) {
    const int j = base + __builtin_ctz(m);
    if (j >= b.n) continue;
    if (b.threads[j].wcount < t.wcount) return false;
  }
  return true;
}

void poison_shared(KernelInfo& ki) {
  for (auto& r : ki.statics) memset(r.first, 0xff, r.second);
  if (g_run.dyn_ptr && g_run.d->smem) memset(g_run.dyn_ptr, 0xff, g_run.d->smem);
}

void fault_handler(int sig, siginfo_t* si, void* uc);
struct sigaction g_old_segv, g_old_bus;
void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
  // an alternate signal stack for this OS thread: a coroutine stack overflow must still be reported
  static thread_local bool has_alt = false;
  if (!has_alt) {
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    const size_t sz = 64 << 10;
    ss.ss_sp = mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ss.ss_size = sz;
    stack_t old;
    if (ss.ss_sp != MAP_FAILED && sigaltstack(nullptr, &old) == 0 && (old.ss_flags & SS_DISABLE)) sigaltstack(&ss, nullptr);
    has_alt = true;
  }
}

void fault_handler(int sig, siginfo_t* si, void* uc) {
  if (t_in_kernel) {
    t_in_kernel = 0;
    g_fault_addr = (uintptr_t)si->si_addr;
    g_fault_sig = sig;
    siglongjmp(g_fault_jmp, 1);
  }
  // not ours: hand it to whoever was installed before (Node/V8), or take the default action
  struct sigaction& old = sig == SIGBUS ? g_old_bus : g_old_segv;
  if (old.sa_flags & SA_SIGINFO) {
    if (old.sa_sigaction) {
      old.sa_sigaction(sig, si, uc);
      return;
    }
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
    old.sa_handler(sig);
    return;
  }
  signal(sig, SIG_DFL);  // returning re-executes the faulting access under the default action
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

// Runs one launch (called with g_device held).
void run_launch(const LaunchDesc& d) {
  if (sticky()) {  // a dead context runs nothing
    d.destroy(d.closure);
    return;
  }
  install_fault_handler();
  KernelInfo& ki = kernel_info(d.kernel);
  g_run = Running();
  g_run.d = &d;
  g_run.info = &ki;
  if (d.smem) {
    g_run.dyn.assign(d.smem + 128, 0);
    g_run.dyn_ptr = (char*)(((uintptr_t)g_run.dyn.data() + 127) & ~(uintptr_t)127);
  }
  const unsigned bx = d.block.x, by = d.block.y, bz = d.block.z;
  const int n = (int)(bx * by * bz);
  Block& b = g_block;
  b.n = n;
  b.threads.assign(n, Thread());
  b.warps.assign((n + 31) / 32, WarpSlots());
  for (int i = 0; i < n; i++) {
    Thread& t = b.threads[i];
    t.tidx = uint3{(unsigned)i % bx, ((unsigned)i / bx) % by, (unsigned)i / (bx * by)};
    t.bdim = uint3{bx, by, bz};
    t.gdim = uint3{d.grid.x, d.grid.y, d.grid.z};
    t.lane = (unsigned)i & 31u;
    t.warp = (unsigned)i >> 5;
    if (!stack_for(i)) {
      make_sticky(cudaErrorMemoryAllocation, "emulator: no memory for thread stacks");
      d.destroy(d.closure);
      return;
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  // volatile: read after a siglongjmp back into this frame
  volatile unsigned gx = 0, gy = 0, gz = 0;
  if (sigsetjmp(g_fault_jmp, 1)) {
    char where[160];
    describe_thread(where, sizeof where);
    char msg[600];
    snprintf(msg, sizeof msg, "%s %s: %s at address %p%s", d.name, where,
             g_fault_sig == SIGBUS ? "bus error (misaligned or unmapped)" : "invalid memory access",
             (void*)g_fault_addr, alloc_near(g_fault_addr).c_str());
    g_running = nullptr;
    g_cur = nullptr;
    make_sticky(cudaErrorIllegalAddress, msg);
    d.destroy(d.closure);
    return;
  }
  for (gz = 0; gz < d.grid.z; gz++)
    for (gy = 0; gy < d.grid.y; gy++)
      for (gx = 0; gx < d.grid.x; gx++) {
        poison_shared(ki);
        b.alive = n;
        b.arrived = 0;
        for (int i = 0; i < n; i++) {
          Thread& t = b.threads[i];
          t.bidx = uint3{gx, gy, gz};
          t.state = Thread::Runnable;
          t.wcount = 0;
          t.wmask = 0;
          init_thread(t, g_stacks[i]);
        }
        while (b.alive > 0 && !g_run.abort) {
          bool progress = false;
          for (int i = 0; i < n && !g_run.abort; i++) {
            Thread& t = b.threads[i];
            if (t.state == Thread::Runnable || (t.state == Thread::WarpWait && warp_ready(t))) {
              t.state = Thread::Runnable;
              resume(t);
              progress = true;
            }
          }
          if (!progress && b.alive > 0 && !g_run.abort) {
            std::string who;
            int shown = 0;
            for (auto& t : b.threads) {
              if (t.state == Thread::Exited) continue;
              if (shown++ < 4) {
                char buf[160];
                snprintf(buf, sizeof buf, "%sthread %u waits at %s (mask 0x%08x)", who.empty() ? "" : ", ",
                         t.tidx.x + t.tidx.y * bx + t.tidx.z * bx * by,
                         t.state == Thread::BlockWait ? "__syncthreads" : "a warp-synchronous op", t.wmask);
                who += buf;
              }
            }
            char msg[900];
            snprintf(msg, sizeof msg, "%s block (%u,%u,%u): deadlock, %d of %d threads wait forever: %s", d.name,
                     (unsigned)gx, (unsigned)gy, (unsigned)gz, b.alive, n, who.c_str());
            g_run.abort = true;
            g_run.abort_status = cudaErrorLaunchFailure;
            g_run.abort_sticky = true;
            g_run.abort_msg = msg;
          }
        }
        if (g_run.abort) goto done;
      }
done:
  g_cur = nullptr;
  if (g_run.abort) {
    if (g_run.abort_sticky) make_sticky(g_run.abort_status, g_run.abort_msg.c_str());
    else {
      fprintf(stderr, "stc-emu: launch failed (%s): %s\n", cudaGetErrorName(g_run.abort_status), g_run.abort_msg.c_str());
      t_last = g_run.abort_status;
    }
  }
  if (cfg().verbose) {
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    fprintf(stderr, "stc-emu: %s grid (%u,%u,%u) block (%u,%u,%u) smem %zu: %.1f ms\n", d.name, d.grid.x, d.grid.y,
            d.grid.z, bx, by, bz, d.smem, ms);
  }
  d.destroy(d.closure);
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

}  // namespace

// ---------------------------------------------------------------- device-side entry points
void syncthreads() {
  Block& b = g_block;
  Thread* t = g_running;
  b.arrived++;
  if (b.arrived == b.alive) {  // last one in: release everyone and go on
    for (auto& o : b.threads)
      if (o.state == Thread::BlockWait) o.state = Thread::Runnable;
    b.arrived = 0;
    return;
  }
  t->state = Thread::BlockWait;
  yield_to_scheduler();
}

static void warp_enter(unsigned mask, const char* op) {
  Thread* t = g_running;
  if (!(mask & (1u << t->lane))) {
    char m[160];
    snprintf(m, sizeof m, "%s with mask 0x%08x that excludes the calling lane %u", op, mask, t->lane);
    abort_launch(cudaErrorIllegalInstruction, true, m);
  }
  Block& b = g_block;
  const int base = (int)t->warp * 32;
  for (unsigned m = mask; m; m &= m - 1) {
    const int j = base + __builtin_ctz(m);
    if (j >= b.n || b.threads[j].state == Thread::Exited) {
      char msg[200];
      snprintf(msg, sizeof msg, "%s with mask 0x%08x names lane %d, which %s", op, mask, j - base,
               j >= b.n ? "does not exist in this block" : "has exited");
      abort_launch(cudaErrorIllegalInstruction, true, msg);
    }
  }
  t->wcount++;
  t->wmask = mask;
  if (!warp_ready(*t)) {
    t->state = Thread::WarpWait;
    yield_to_scheduler();
  }
}

void syncwarp(unsigned mask) { warp_enter(mask, "__syncwarp"); }

uint64_t warp_exchange(unsigned mask, uint64_t v, int src) {
  Thread* t = g_running;
  WarpSlots& w = g_block.warps[t->warp];
  const int par = (int)((t->wcount + 1) & 1);
  w.val[par][t->lane] = v;
  warp_enter(mask, "__shfl_sync");
  if (src < 0 || src > 31 || !(mask & (1u << src))) {
    char m[160];
    snprintf(m, sizeof m, "__shfl_sync reads lane %d, outside mask 0x%08x", src, mask);
    abort_launch(cudaErrorIllegalInstruction, true, m);
  }
  return w.val[par][src];
}

unsigned warp_ballot(unsigned mask, bool pred) {
  Thread* t = g_running;
  WarpSlots& w = g_block.warps[t->warp];
  const int par = (int)((t->wcount + 1) & 1);
  w.val[par][t->lane] = pred ? 1 : 0;
  warp_enter(mask, "__ballot_sync");
  unsigned r = 0;
  for (unsigned m = mask; m; m &= m - 1) {
    const int j = __builtin_ctz(m);
    if (w.val[par][j]) r |= 1u << j;
  }
  return r;
}

void* dynamic_shared() {
  if (!g_run.dyn_ptr) {
    static char empty[16] __attribute__((aligned(16)));
    return empty;  // a zero-byte buffer: any access is a bug, but taking its address is not
  }
  return g_run.dyn_ptr;
}

void shared_static(void* p, size_t bytes) {
  KernelInfo& ki = *g_run.info;
  for (auto& r : ki.statics)
    if (r.first == p) return;
  ki.statics.emplace_back(p, bytes);
  ki.static_bytes += bytes;
  memset(p, 0xff, bytes);  // first sight of this storage: no thread of the block can have written it yet
  const size_t dyn = g_run.d->smem;
  if (ki.static_bytes > kStaticSmemLimit) {
    char m[200];
    snprintf(m, sizeof m, "static shared memory %zu bytes exceeds the 48 KiB limit", ki.static_bytes.load());
    abort_launch(cudaErrorInvalidValue, false, m);
  }
  if (ki.static_bytes + dyn > cfg().smem_optin()) {
    char m[200];
    snprintf(m, sizeof m, "static %zu + dynamic %zu bytes of shared memory exceed the sm_%d%d opt-in limit %zu",
             ki.static_bytes.load(), dyn, cfg().cc_major, cfg().cc_minor, cfg().smem_optin());
    abort_launch(cudaErrorInvalidValue, false, m);
  }
}

bool launch_bounds(int max_threads) {
  g_run.info->bound = max_threads;
  const Thread* t = g_running;
  const unsigned n = t->bdim.x * t->bdim.y * t->bdim.z;
  if ((int)n > max_threads) {
    char m[160];
    snprintf(m, sizeof m, "block of %u threads exceeds __launch_bounds__(%d)", n, max_threads);
    abort_launch(cudaErrorLaunchOutOfResources, false, m);
  }
  return false;
}

void kernel_fault(const char* what) { abort_launch(cudaErrorLaunchFailure, true, what); }

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  EMU_STICKY_CHECK();
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    KernelInfo& ki = kernel_info(kernel);
    if (value < 0 || (size_t)value + ki.static_bytes.load() > cfg().smem_optin()) {
      fprintf(stderr, "stc-emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d) exceeds the sm_%d%d opt-in limit %zu\n",
              value, cfg().cc_major, cfg().cc_minor, cfg().smem_optin());
      return ret(cudaErrorInvalidValue);
    }
    ki.max_dyn_smem = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return ret(cudaErrorInvalidValue);
}

void enqueue_launch(cudaStream_t st, const LaunchDesc& d0) {
  auto fail = [&](cudaError_t e, const char* why) {
    fprintf(stderr, "stc-emu: launch of %s failed (%s): %s\n", d0.name, error_name(e), why);
    t_last = e;
    d0.destroy(d0.closure);
  };
  if (sticky()) {
    t_last = sticky();
    d0.destroy(d0.closure);
    return;
  }
  const dim3 g = d0.grid, b = d0.block;
  char why[200];
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) {
    snprintf(why, sizeof why, "zero-sized grid (%u,%u,%u) or block (%u,%u,%u)", g.x, g.y, g.z, b.x, b.y, b.z);
    return fail(cudaErrorInvalidConfiguration, why);
  }
  if ((uint64_t)b.x * b.y * b.z > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) {
    snprintf(why, sizeof why, "block (%u,%u,%u) exceeds 1024 threads or the per-dimension limits", b.x, b.y, b.z);
    return fail(cudaErrorInvalidConfiguration, why);
  }
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    snprintf(why, sizeof why, "grid (%u,%u,%u) exceeds the grid limits", g.x, g.y, g.z);
    return fail(cudaErrorInvalidConfiguration, why);
  }
  {
    KernelInfo& ki = kernel_info(d0.kernel);
    const int attr = ki.max_dyn_smem.load();
    const size_t limit = attr >= 0 ? (size_t)attr : kDefaultDynSmemLimit;
    if (d0.smem > limit) {
      snprintf(why, sizeof why, "%zu bytes of dynamic shared memory, above the %zu allowed (%s)", d0.smem, limit,
               attr >= 0 ? "cudaFuncAttributeMaxDynamicSharedMemorySize" : "48 KiB without cudaFuncSetAttribute");
      return fail(cudaErrorInvalidValue, why);
    }
    const int bound = ki.bound.load();
    if (bound > 0 && (int)((uint64_t)b.x * b.y * b.z) > bound) {
      snprintf(why, sizeof why, "block of %u threads exceeds __launch_bounds__(%d)", b.x * b.y * b.z, bound);
      return fail(cudaErrorLaunchOutOfResources, why);
    }
    if (ki.static_bytes.load() + d0.smem > cfg().smem_optin()) {
      snprintf(why, sizeof why, "static %zu + dynamic %zu bytes of shared memory exceed the opt-in limit %zu",
               ki.static_bytes.load(), d0.smem, cfg().smem_optin());
      return fail(cudaErrorInvalidValue, why);
    }
  }
  KernelInfo& ki = kernel_info(d0.kernel);
  if (!ki.ran.load()) {
    // The first launch of a kernel runs at issue (after the work queued before it): its static shared memory
    // and __launch_bounds__ are learnt by running it, and a launch error must reach this call's
    // cudaGetLastError, as on the hardware. Later launches are checked at issue and queued.
    Stream* s = S(st);
    std::lock_guard<std::recursive_mutex> dev(g_device);
    flush(s);
    ki.ran = true;
    run_launch(d0);
    return;
  }
  auto d = std::make_shared<LaunchDesc>(d0);
  enqueue(S(st), [d]() { run_launch(*d); });
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

cudaError_t cudaDeviceSynchronize(void) {
  EMU_STICKY_CHECK();
  flush_all();
  EMU_STICKY_CHECK();
  return cudaSuccess;
}
cudaError_t cudaDeviceReset(void) { return cudaDeviceSynchronize(); }

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  EMU_STICKY_CHECK();
  std::lock_guard<std::mutex> l(g_mem_mu);
  *total_bytes = cfg().total_mem;
  *free_bytes = cfg().total_mem - g_device_bytes;
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

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* st, unsigned int flags) {
  EMU_STICKY_CHECK();
  Stream* s = new Stream();
  s->flags = flags;
  std::lock_guard<std::mutex> l(g_streams_mu);
  g_streams.push_back(s);
  *st = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* st) { return cudaStreamCreateWithFlags(st, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t st) {
  if (!st) return ret(cudaErrorInvalidResourceHandle);
  Stream* s = S(st);
  flush(s);  // queued work still completes
  {
    std::lock_guard<std::mutex> l(g_streams_mu);
    for (size_t i = 0; i < g_streams.size(); i++)
      if (g_streams[i] == s) {
        g_streams.erase(g_streams.begin() + (long)i);
        break;
      }
  }
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t st) {
  EMU_STICKY_CHECK();
  flush(S(st));
  EMU_STICKY_CHECK();
  return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t st) { return cudaStreamSynchronize(st); }

cudaError_t cudaStreamWaitEvent(cudaStream_t st, cudaEvent_t e, unsigned int) {
  EMU_STICKY_CHECK();
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev) return ret(cudaErrorInvalidResourceHandle);
  Stream* other = ev->stream;
  if (!other || other == S(st)) return cudaSuccess;
  enqueue(S(st), [other]() { flush(other); });
  return cudaSuccess;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t st, cudaHostFn_t fn, void* data) {
  EMU_STICKY_CHECK();
  enqueue(S(st), [fn, data]() { fn(data); });
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int flags) {
  EMU_STICKY_CHECK();
  Event* ev = new Event();
  ev->flags = flags;
  *e = reinterpret_cast<cudaEvent_t>(ev);
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return ret(cudaErrorInvalidResourceHandle);
  Event* ev = reinterpret_cast<Event*>(e);
  if (ev->stream && !ev->done.load()) flush(ev->stream);
  delete ev;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t st) {
  EMU_STICKY_CHECK();
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev) return ret(cudaErrorInvalidResourceHandle);
  ev->stream = S(st);
  ev->done = false;
  ev->recorded = true;
  enqueue(ev->stream, [ev]() {
    ev->t = std::chrono::steady_clock::now();
    ev->done = true;
  });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  EMU_STICKY_CHECK();
  Event* ev = reinterpret_cast<Event*>(e);
  if (!ev) return ret(cudaErrorInvalidResourceHandle);
  if (ev->stream && !ev->done.load()) flush(ev->stream);
  EMU_STICKY_CHECK();
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) { return cudaEventSynchronize(e); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  EMU_STICKY_CHECK();
  Event* ea = reinterpret_cast<Event*>(a);
  Event* eb = reinterpret_cast<Event*>(b);
  if (!ea || !eb) return ret(cudaErrorInvalidResourceHandle);
  if ((ea->flags | eb->flags) & cudaEventDisableTiming) return ret(cudaErrorInvalidResourceHandle);
  if (!ea->recorded || !eb->recorded) return ret(cudaErrorInvalidResourceHandle);
  if (!ea->done.load() || !eb->done.load()) return ret(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(eb->t - ea->t).count();
  return cudaSuccess;
}

}  // extern "C++"
