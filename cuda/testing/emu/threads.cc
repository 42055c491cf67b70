// swarmtune CUDA emulator runtime: running a launch. The coroutine switch, the block scheduler, barriers and warp
// exchanges, shared memory, and kernel faults (a signal handler turns an invalid access into a sticky launch
// failure). See emu_internal.h and docs/cuda.md ("Emulator").
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
#include "emu_internal.h"

#include <signal.h>
#include <setjmp.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace stc_emu {

ThreadCtx* g_cur = nullptr;

namespace {

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


}  // namespace

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

}  // namespace stc_emu
