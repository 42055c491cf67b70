// swarmtune CUDA emulator: stands in for <cuda_runtime.h> when cuda/src is built for the CPU (cuda/build-emu.sh).
// The runtime API subset the library uses, the device-side builtins (threadIdx, __syncthreads, warp shuffles,
// float4, __ldg, intrinsics) and the kernel launch entry point that cuda/testing/emu/transform.ts rewrites
// `k<<<grid, block, smem, stream>>>(args)` into. Implemented in cuda/testing/emu/*.cc; see docs/cuda.md "Emulator".
#pragma once
#include "stc_emu.h"
