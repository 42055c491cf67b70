// swarmtune CUDA emulator runtime: a kernel launch as the host issues it. The configuration is checked against the
// device's limits (block and grid sizes, dynamic and static shared memory, __launch_bounds__ learnt from an earlier
// run) and the launch is queued on its stream; threads.cc runs it. See emu_internal.h.
#include "emu_internal.h"

#include <cstdio>
#include <memory>
#include <unordered_map>

namespace stc_emu {

namespace {

std::unordered_map<const void*, KernelInfo> g_kernels;
std::mutex g_kinfo_mu;

}  // namespace

KernelInfo& kernel_info(const void* k) {
  std::lock_guard<std::mutex> l(g_kinfo_mu);
  return g_kernels[k];
}

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
