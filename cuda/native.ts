// The CUDA addon: the shape of the N-API module (cuda/addon/*.cc), where it is found and loaded, why it is
// unavailable when it is not, opening a device, and the device probe.
//
// Nothing here computes: the backend (cuda/backend.ts) and the paged optimizer (cuda/optimizer.ts) call the
// module through the NativeCuda interface. Loading never touches a device; opening one records why it failed,
// so that `cudaUnavailableReason()` can tell a user what to fix.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { knobs } from '../engine/env.ts';
import { toCudaError } from './errors.ts';
import type { NF4Absmax } from '../engine/formats/nf4.ts';

export interface CudaDeviceInfo {
  name: string;
  totalMemoryBytes: number;
  freeMemoryBytes: number;
  /** "major.minor", e.g. "9.0" */
  computeCapability: string;
  smCount: number;
}

export interface CudaProbe extends CudaDeviceInfo {
  /** measured with the library's own 4096³ GEMM: bf16 tensor cores on sm_80+, fp32 SIMT on sm_75 */
  bf16GemmTflops: number;
  /** device-to-device copy kernel, read + write bytes per second */
  memoryBandwidthGBs: number;
}

/** A CUDA context (one device, its stream and pool), as the addon hands it out. */
export type Ctx = object;
/** A paged optimizer, as the addon hands it out. */
export type OptHandle = object;
/** A float buffer as the addon takes it: host memory, or a device address inside a live device tensor. */
export type DevArg = Float32Array | bigint;

// Shape of the N-API module (cuda/addon/*.cc).
export interface NativeCuda {
  version(): string;
  deviceCount(): { count: number; reason: string | null };
  deviceInfo(device: number): CudaDeviceInfo;
  open(device: number, precision: number): Ctx;
  close(ctx: Ctx): void;
  memoryStats(ctx: Ctx): { poolBytes: number; peakPoolBytes: number };
  gemm(ctx: Ctx, tA: boolean, tB: boolean, M: number, N: number, K: number, alpha: number, A: DevArg,
    B: DevArg, beta: number, C: DevArg): Promise<void>;
  /** absmax: float32 per block, or the engine's double-quantized form (NF4DoubleQuant), host memory */
  gemmNF4(ctx: Ctx, M: number, X: DevArg, packed: Uint8Array, absmax: NF4Absmax, rows: number,
    cols: number, blocksize: number, beta: number, Y: DevArg): Promise<void>;
  gemmNF4T(ctx: Ctx, M: number, DY: DevArg, packed: Uint8Array, absmax: NF4Absmax, rows: number,
    cols: number, blocksize: number, beta: number, DX: DevArg): Promise<void>;
  dequantNF4(ctx: Ctx, packed: Uint8Array, absmax: NF4Absmax, rows: number, cols: number, blocksize: number,
    out: DevArg): Promise<void>;
  rmsnormForward(ctx: Ctx, out: DevArg, rstd: DevArg, x: DevArg, w: DevArg, T: number,
    C: number, eps: number): Promise<void>;
  rmsnormBackward(ctx: Ctx, dx: DevArg, dw: DevArg | null, dout: DevArg, x: DevArg,
    w: DevArg, rstd: DevArg, T: number, C: number): Promise<void>;
  rope(ctx: Ctx, x: DevArg, cos: DevArg, sin: DevArg, maxPos: number, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void>;
  attentionForward(ctx: Ctx, out: DevArg, lse: DevArg, q: DevArg, k: DevArg,
    v: DevArg, B: number, S: number, H: number, KV: number, D: number, scale: number, softcap: number,
    window: number): Promise<void>;
  attentionBackward(ctx: Ctx, dq: DevArg, dk: DevArg, dv: DevArg, dout: DevArg,
    q: DevArg, k: DevArg, v: DevArg, out: DevArg, lse: DevArg, B: number, S: number,
    H: number, KV: number, D: number, scale: number, softcap: number, window: number): Promise<void>;
  gegluForward(ctx: Ctx, out: DevArg, gate: DevArg, up: DevArg, n: number): Promise<void>;
  gegluBackward(ctx: Ctx, dgate: DevArg, dup: DevArg, dout: DevArg, gate: DevArg,
    up: DevArg, n: number): Promise<void>;
  softcapForward(ctx: Ctx, y: DevArg, x: DevArg, cap: number, n: number): Promise<void>;
  softcapBackward(ctx: Ctx, dx: DevArg, dy: DevArg, x: DevArg, cap: number, n: number): Promise<void>;
  swigluForward(ctx: Ctx, out: DevArg, gate: DevArg, up: DevArg, n: number): Promise<void>;
  swigluBackward(ctx: Ctx, dgate: DevArg, dup: DevArg, dout: DevArg, gate: DevArg,
    up: DevArg, n: number): Promise<void>;
  embeddingForward(ctx: Ctx, out: DevArg, ids: Int32Array, table: DevArg, T: number, C: number,
    V: number): Promise<void>;
  crossEntropyChunkForward(ctx: Ctx, logits: DevArg, labels: Int32Array, v0: number, T: number, Vc: number,
    m: DevArg, s: DevArg, picked: DevArg): Promise<void>;
  crossEntropyChunkBackward(ctx: Ctx, logits: DevArg, labels: Int32Array, v0: number, T: number,
    Vc: number, lse: DevArg, scale: DevArg): Promise<void>;
  adamw32(ctx: Ctx, p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, n: number, lr: number,
    b1: number, b2: number, eps: number, wd: number, step: number): Promise<void>;
  adamw8bit(ctx: Ctx, p: Float32Array, g: Float32Array, s1: Uint8Array, s2: Uint8Array, a1: Float32Array,
    a2: Float32Array, n: number, lr: number, b1: number, b2: number, eps: number, wd: number,
    step: number): Promise<void>;
  pagedSlotBytes(bits: number, pageElems: number): number;
  pagedCreate(ctx: Ctx, bits: number, pageElems: number, slots: number, budgetBytes: number): OptHandle;
  pagedAdd(opt: OptHandle, n: number): number;
  pagedStep(opt: OptHandle, id: number, p: Float32Array, g: Float32Array, lr: number, b1: number, b2: number,
    eps: number, wd: number, step: number): Promise<void>;
  pagedStateInfo(opt: OptHandle, id: number): { is8bit: boolean; aBytes: number; bBytes: number };
  pagedStateRead(opt: OptHandle, id: number, a: Uint8Array, b: Uint8Array): void;
  pagedStateWrite(opt: OptHandle, id: number, a: Uint8Array, b: Uint8Array): void;
  pagedStats(opt: OptHandle): { hostPinnedBytes: number; deviceBytes: number };
  pagedDestroy(opt: OptHandle): void;
  probe(ctx: Ctx, out: Float64Array): Promise<void>;
  gemmGrid(M: number, N: number, tensorCores: boolean): { gridX: number; gridY: number; threads: number };
  attentionGrid(B: number, S: number, H: number, D: number): {
    gridX: number; gridY: number; gridZ: number; threads: number; dimsPerThread: number; supported: boolean;
  };
  nf4Upload(ctx: Ctx, packed: Uint8Array, absmax: NF4Absmax, rows: number, cols: number, blocksize: number): Promise<number>;
  nf4Free(ctx: Ctx, id: number): Promise<void>;
  /** nestedBlocksize 0 (or absent): float32 absmax; else the double-quantized layout */
  nf4ResidentBytes(rows: number, cols: number, blocksize: number, nestedBlocksize?: number): number;
  nf4Stats(ctx: Ctx): { count: number; bytes: number };
  gemmNF4Resident(ctx: Ctx, M: number, X: DevArg, id: number, beta: number, Y: DevArg): Promise<void>;
  gemmNF4TResident(ctx: Ctx, M: number, DY: DevArg, id: number, beta: number, DX: DevArg): Promise<void>;
  dequantNF4Resident(ctx: Ctx, id: number, out: DevArg): Promise<void>;
  benchNF4(ctx: Ctx, M: number, rows: number, cols: number, blocksize: number, doubleQuant: boolean, iters: number,
    out: Float64Array): Promise<void>;
  devAlloc(ctx: Ctx, bytes: number): bigint;
  devFree(ctx: Ctx, addr: bigint, bytes: number): void;
  devStats(ctx: Ctx): { tensors: number; tensorBytes: number; poolInUseBytes: number };
  copy(ctx: Ctx, dst: Float32Array | bigint, src: Float32Array | bigint, bytes: number): Promise<void>;
  add(ctx: Ctx, y: DevArg, x: DevArg, n: number): Promise<void>;
  addBias(ctx: Ctx, y: DevArg, bias: DevArg, T: number, N: number): Promise<void>;
  maskScale(ctx: Ctx, out: DevArg, x: DevArg, mask: Uint8Array, scale: number, n: number, accumulate: boolean): Promise<void>;
  opStats(ctx: Ctx): CudaOpStats;
  setSync(ctx: Ctx, syncEachOp: boolean): void;
  sync(ctx: Ctx): Promise<void>;
  debugFault(ctx: Ctx, kind: number): Promise<void>;
}

/** How ops reached the device (CudaBackend.opStats()): counters since the backend was loaded. */
export interface CudaOpStats {
  /** ops launched inline on the JS thread (every buffer on the device): settled promises, no worker hop */
  inlineOps: number;
  /** JS-thread time spent in those launches, nanoseconds */
  inlineNs: number;
  /** ops run on a libuv worker (host arrays involved, or a wait such as a weight free or sync()) */
  workerOps: number;
  /** ops the library queued without waiting (device-only); pendingOps of them not yet known complete */
  asyncOps: number;
  pendingOps: number;
  /** ops that synchronized before returning (host memory staged) */
  syncedOps: number;
  /** host waits on the device (stream synchronizations, waits for queued ops) and their total time */
  waits: number;
  waitNs: number;
  /** the sticky CUDA error that poisoned the context (0: none) */
  stickyStatus: number;
  syncEachOp: boolean;
}

const here = dirname(fileURLToPath(import.meta.url));
/** Where build.sh puts the addon; SWARMTUNE_CUDA_ADDON overrides it; SWARMTUNE_CUDA_EMU=1 picks the CPU emulator
 *  build of the same sources (cuda/build-emu.sh, docs/cuda.md "Emulator"). */
export const CUDA_ADDON_PATH = knobs().cudaAddon ?? join(here, knobs().cudaEmu ? 'build-emu' : 'build', 'swarmtune_cuda.node');

let lastReason: string | null = null;

/** Why the last loadCudaBackend/probeCuda returned null (null after a success). */
export function cudaUnavailableReason(): string | null {
  return lastReason;
}

/** Records that the last loadCudaBackend/probeCuda succeeded: cudaUnavailableReason() is null again. */
export function cudaAvailable(): void {
  lastReason = null;
}

/** Loads the N-API module without touching a device; null (with cudaUnavailableReason set) when the
 *  library was not built or cannot be loaded. Exposed for tests and tools. */
export function loadCudaAddon(): NativeCuda | null {
  if (!existsSync(CUDA_ADDON_PATH)) {
    lastReason = `CUDA library not built: ${CUDA_ADDON_PATH} is missing (run \`npm run build:cuda\` on a machine with nvcc)`;
    return null;
  }
  try {
    const require = createRequire(import.meta.url);
    return require(CUDA_ADDON_PATH) as NativeCuda;
  } catch (e) {
    lastReason = `CUDA library at ${CUDA_ADDON_PATH} failed to load: ${(e as Error).message}`;
    return null;
  }
}

/** An open CUDA context and the facts of its device. */
export interface OpenedDevice {
  ctx: Ctx;
  info: CudaDeviceInfo;
}

/** Opens a context on `device`; null (with cudaUnavailableReason set) when there is no such device or it cannot
 *  be opened. SWARMTUNE_CUDA_SYNC=1 makes the context wait for every op (see LoadCudaOptions.syncEachOp). */
export function openDevice(native: NativeCuda, device: number, precision: number): OpenedDevice | null {
  const { count, reason } = native.deviceCount();
  if (count === 0) {
    lastReason = `no usable CUDA device: ${reason ?? 'none found'}`;
    return null;
  }
  if (!Number.isInteger(device) || device < 0 || device >= count) {
    lastReason = `CUDA device ${device} requested but only ${count} present`;
    return null;
  }
  try {
    const info = native.deviceInfo(device);
    const ctx = native.open(device, precision);
    if (knobs().cudaSync) {
      try {
        native.setSync(ctx, true);
      } catch (e) {
        native.close(ctx);
        throw e;
      }
    }
    return { ctx, info };
  } catch (e) {
    lastReason = `CUDA device ${device} could not be opened: ${(e as Error).message}`;
    return null;
  }
}

/** Device facts plus a short GEMM and copy measurement (~0.1 s of device time); null without a GPU. */
export async function probeCuda(opts?: { device?: number }): Promise<CudaProbe | null> {
  const native = loadCudaAddon();
  if (!native) return null;
  const opened = openDevice(native, opts?.device ?? 0, 0);
  if (!opened) return null;
  try {
    const out = new Float64Array(2);
    await native.probe(opened.ctx, out).catch((e: unknown) => { throw toCudaError(e, 'probe'); });
    const info = native.deviceInfo(opts?.device ?? 0);  // free memory after the probe released its buffers
    cudaAvailable();
    return { ...info, bf16GemmTflops: out[0], memoryBandwidthGBs: out[1] };
  } finally {
    native.close(opened.ctx);
  }
}

