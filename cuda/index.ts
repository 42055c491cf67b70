// CUDA backend loader: wraps cuda/build/swarmtune_cuda.node behind the engine's Backend interface, plus optimizers and the probe.
//
// Every op takes its float buffers as host Float32Arrays (the Backend contract: copied to the device,
// run, copied back; the library keeps a caching device pool, so repeated shapes do not re-allocate) or
// as device tensors (CudaTensor, cuda/tensors.ts), which the library uses in place: `tensors()` is the
// device-resident TensorBackend a stage computes on. NF4 base weights stay resident on the device after
// first use (cuda/weight-cache.ts). An op whose buffers are all device tensors is launched inline on the JS
// thread and returns an already-settled promise without waiting for the GPU (the device work is queued on
// the context's stream; the host waits only where it reads: downloads, host-array ops). Ops with host
// arrays run on libuv worker threads. Library failures reject with CudaError (CudaAsyncError when an
// earlier op's kernel failed); argument mistakes throw CudaArgumentError before anything reaches the device.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import type { Backend } from '../engine/backend.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { planPagedOptimizer, type OptimizerBits, type PagedPlan } from './paging.ts';
import type { AdamWOptions, Optimizer, ParamSpec } from '../engine/optimizer.ts';
import { CudaOptimizer, cudaOptimizerBits } from './optimizer.ts';

import { CudaArgumentError, CudaAsyncError, CudaError } from './errors.ts';
import { NF4WeightCache, type WeightCacheStats, type WeightLease } from './weight-cache.ts';
import { CudaTensor, CudaTensors, type TensorDevice } from './tensors.ts';

export { CudaArgumentError, CudaAsyncError, CudaError } from './errors.ts';
export type { WeightCacheStats } from './weight-cache.ts';
export { CudaTensor, CudaTensors, type CudaTensorStats } from './tensors.ts';

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

export interface AdamWHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1-based optimizer step (bias corrections use beta^step) */
  step: number;
}

/** 8-bit blockwise AdamW state of one tensor (bitsandbytes layout: blocks of 256). */
export interface AdamW8bitState {
  state1: Uint8Array;   // [n] codes into the signed dynamic map
  state2: Uint8Array;   // [n] codes into the unsigned dynamic map
  absmax1: Float32Array; // [ceil(n/256)]
  absmax2: Float32Array;
}

type Ctx = object;
type OptHandle = object;
/** A float buffer as the addon takes it: host memory, or a device address inside a live device tensor. */
type DevArg = Float32Array | bigint;
/** A float buffer as CudaBackend's ops take it: a host array or a device tensor (cuda/tensors.ts). */
export type F32 = Float32Array | CudaTensor;
const d = (x: F32): DevArg => (x instanceof Float32Array ? x : x.addr);

// Shape of the N-API module (cuda/addon/addon.cc).
interface NativeCuda {
  version(): string;
  deviceCount(): { count: number; reason: string | null };
  deviceInfo(device: number): CudaDeviceInfo;
  open(device: number, precision: number): Ctx;
  close(ctx: Ctx): void;
  memoryStats(ctx: Ctx): { poolBytes: number; peakPoolBytes: number };
  gemm(ctx: Ctx, tA: boolean, tB: boolean, M: number, N: number, K: number, alpha: number, A: DevArg,
    B: DevArg, beta: number, C: DevArg): Promise<void>;
  gemmNF4(ctx: Ctx, M: number, X: DevArg, packed: Uint8Array, absmax: Float32Array, rows: number,
    cols: number, blocksize: number, beta: number, Y: DevArg): Promise<void>;
  gemmNF4T(ctx: Ctx, M: number, DY: DevArg, packed: Uint8Array, absmax: Float32Array, rows: number,
    cols: number, blocksize: number, beta: number, DX: DevArg): Promise<void>;
  dequantNF4(ctx: Ctx, packed: Uint8Array, absmax: Float32Array, rows: number, cols: number, blocksize: number,
    out: DevArg): Promise<void>;
  rmsnormForward(ctx: Ctx, out: DevArg, rstd: DevArg, x: DevArg, w: DevArg, T: number,
    C: number, eps: number): Promise<void>;
  rmsnormBackward(ctx: Ctx, dx: DevArg, dw: DevArg | null, dout: DevArg, x: DevArg,
    w: DevArg, rstd: DevArg, T: number, C: number): Promise<void>;
  rope(ctx: Ctx, x: DevArg, cos: DevArg, sin: DevArg, maxPos: number, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void>;
  attentionForward(ctx: Ctx, out: DevArg, lse: DevArg, q: DevArg, k: DevArg,
    v: DevArg, B: number, S: number, H: number, KV: number, D: number): Promise<void>;
  attentionBackward(ctx: Ctx, dq: DevArg, dk: DevArg, dv: DevArg, dout: DevArg,
    q: DevArg, k: DevArg, v: DevArg, out: DevArg, lse: DevArg, B: number, S: number,
    H: number, KV: number, D: number): Promise<void>;
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
  nf4Upload(ctx: Ctx, packed: Uint8Array, absmax: Float32Array, rows: number, cols: number, blocksize: number): Promise<number>;
  nf4Free(ctx: Ctx, id: number): Promise<void>;
  nf4ResidentBytes(rows: number, cols: number, blocksize: number): number;
  nf4Stats(ctx: Ctx): { count: number; bytes: number };
  gemmNF4Resident(ctx: Ctx, M: number, X: DevArg, id: number, beta: number, Y: DevArg): Promise<void>;
  gemmNF4TResident(ctx: Ctx, M: number, DY: DevArg, id: number, beta: number, DX: DevArg): Promise<void>;
  dequantNF4Resident(ctx: Ctx, id: number, out: DevArg): Promise<void>;
  benchNF4(ctx: Ctx, M: number, rows: number, cols: number, blocksize: number, iters: number, out: Float64Array): Promise<void>;
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
export const CUDA_ADDON_PATH = process.env.SWARMTUNE_CUDA_ADDON ??
  join(here, process.env.SWARMTUNE_CUDA_EMU === '1' ? 'build-emu' : 'build', 'swarmtune_cuda.node');

let lastReason: string | null = null;

/** Why the last loadCudaBackend/probeCuda returned null (null after a success). */
export function cudaUnavailableReason(): string | null {
  return lastReason;
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

/** cudaErrorMemoryAllocation */
const CUDA_ERROR_MEMORY_ALLOCATION = 2;

function toCudaError(e: unknown, op: string): Error {
  if (e instanceof CudaError || e instanceof CudaArgumentError) return e;
  if (e instanceof Error && typeof (e as { cudaStatus?: unknown }).cudaStatus === 'number') {
    const status = (e as unknown as { cudaStatus: number }).cudaStatus;
    if ((e as { asynchronous?: unknown }).asynchronous === true) return new CudaAsyncError(`${op}: ${e.message}`, status, op);
    return new CudaError(`${op}: ${e.message}`, status, op);
  }
  return e instanceof Error ? e : new Error(String(e));
}

function openDevice(native: NativeCuda, device: number, precision: number): { ctx: Ctx; info: CudaDeviceInfo } | null {
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
    return { ctx, info };
  } catch (e) {
    lastReason = `CUDA device ${device} could not be opened: ${(e as Error).message}`;
    return null;
  }
}

export interface LoadCudaOptions {
  device?: number;
  /** GEMM arithmetic: 'bf16' tensor cores with fp32 accumulation (default; fp32 SIMT below sm_80)
   *  or 'fp32' SIMT everywhere (slower, matches the CPU reference more tightly). */
  gemmPrecision?: 'bf16' | 'fp32';
  /** Device bytes NF4 base weights may keep resident (LRU beyond that; 0 uploads every weight on
   *  every call). Default: 80% of the device memory free at load time minus a 1 GiB reserve for
   *  activations and workspace (defaultWeightCacheBytes). */
  weightCacheBytes?: number;
  /** Debugging: every op waits for its kernels before returning (as SWARMTUNE_CUDA_SYNC=1 does), so a
   *  faulting kernel is reported by its own op instead of asynchronously by a later one. Slower. */
  syncEachOp?: boolean;
}

/** Reserve kept out of the default weight-cache budget for activations, workspace and the CUDA context. */
export const WEIGHT_CACHE_RESERVE_BYTES = 2 ** 30;

/** 80% of the free device memory minus WEIGHT_CACHE_RESERVE_BYTES, never negative. */
export function defaultWeightCacheBytes(freeMemoryBytes: number): number {
  return Math.max(0, Math.floor(0.8 * freeMemoryBytes) - WEIGHT_CACHE_RESERVE_BYTES);
}

/** NF4 kernel figures measured on device-resident data (no host transfers). */
export interface CudaNF4Bench {
  /** dequantization throughput: packed codes and absmax read plus fp32 output written, per second */
  dequantGBs: number;
  dequantSeconds: number;
  /** fused NF4 GEMM X[M,cols]·Wᵀ */
  gemmNF4Tflops: number;
}

/** The CUDA backend, or null when the library is not built or no GPU/driver is usable
 *  (cudaUnavailableReason() says why). */
export async function loadCudaBackend(opts?: LoadCudaOptions): Promise<CudaBackend | null> {
  const native = loadCudaAddon();
  if (!native) return null;
  const precision = (opts?.gemmPrecision ?? 'bf16') === 'fp32' ? 1 : 0;
  const wc = opts?.weightCacheBytes;
  if (wc !== undefined && (!Number.isSafeInteger(wc) || wc < 0)) {
    throw new CudaArgumentError(`loadCudaBackend: weightCacheBytes=${wc} must be a non-negative integer`);
  }
  const opened = openDevice(native, opts?.device ?? 0, precision);
  if (!opened) return null;
  lastReason = null;
  if (opts?.syncEachOp !== undefined) native.setSync(opened.ctx, opts.syncEachOp === true);
  return new CudaBackend(native, opened.ctx, opened.info, precision === 1 ? 'fp32' : 'bf16',
    wc ?? defaultWeightCacheBytes(opened.info.freeMemoryBytes));
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
    lastReason = null;
    return { ...info, bf16GemmTflops: out[0], memoryBandwidthGBs: out[1] };
  } finally {
    native.close(opened.ctx);
  }
}

function need(op: string, what: string, arr: { length: number }, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new CudaArgumentError(`CudaBackend.${op}: size of ${what} is ${n}, not a valid element count`);
  if (arr.length < n) throw new CudaArgumentError(`CudaBackend.${op}: ${what} has length ${arr.length}, expected at least ${n}`);
}

function dims(op: string, d: Record<string, number>): void {
  for (const [k, v] of Object.entries(d)) {
    // the library takes 32-bit dimensions
    if (!Number.isInteger(v) || v < 0 || v > 0x7fffffff) throw new CudaArgumentError(`CudaBackend.${op}: ${k}=${v} must be an integer in [0, 2^31)`);
  }
}

function checkNF4(op: string, W: NF4Weight): number {
  dims(op, { 'W.rows': W.rows, 'W.cols': W.cols });
  const bs = W.blocksize;
  if (!Number.isInteger(bs) || bs < 32 || bs > 4096 || (bs & (bs - 1)) !== 0) {
    throw new CudaArgumentError(`CudaBackend.${op}: W.blocksize=${bs} must be a power of two in 32..4096`);
  }
  const n = W.rows * W.cols;
  need(op, `W.packed of [${W.rows},${W.cols}]`, W.packed, Math.ceil(n / 2));
  need(op, `W.absmax of [${W.rows},${W.cols}] blocksize ${bs}`, W.absmax, Math.ceil(n / bs));
  return n;
}

function scaleInPlace(Y: Float32Array, n: number, beta: number): void {
  for (let i = 0; i < n; i++) Y[i] = beta === 0 ? 0 : beta * Y[i];
}

function checkHyper(op: string, hp: AdamWHyper): void {
  if (!Number.isInteger(hp.step) || hp.step < 1) throw new CudaArgumentError(`CudaBackend.${op}: step=${hp.step} must be an integer >= 1`);
  for (const k of ['lr', 'beta1', 'beta2', 'eps', 'weightDecay'] as const) {
    if (!Number.isFinite(hp[k])) throw new CudaArgumentError(`CudaBackend.${op}: ${k}=${hp[k]} must be finite`);
  }
}

export class CudaBackend implements Backend {
  readonly name = 'cuda';
  readonly threads = 1;
  readonly device: CudaDeviceInfo;
  readonly gemmPrecision: 'bf16' | 'fp32';
  #native: NativeCuda;
  #ctx: Ctx | null;
  #inFlight = 0;
  #closeWhenIdle = false;
  #optimizers = new Set<CudaPagedAdamW>();
  #weights: NF4WeightCache;
  #tensors: CudaTensors | null = null;

  constructor(native: NativeCuda, ctx: Ctx, device: CudaDeviceInfo, gemmPrecision: 'bf16' | 'fp32', weightCacheBytes: number) {
    this.#native = native;
    this.#ctx = ctx;
    this.device = device;
    this.gemmPrecision = gemmPrecision;
    this.#weights = new NF4WeightCache(weightCacheBytes, {
      residentBytes: (W) => native.nf4ResidentBytes(W.rows, W.cols, W.blocksize),
      upload: async (W) => {
        let id = 0;
        await this.#run('nf4Upload', async (n, c) => { id = await n.nf4Upload(c, W.packed, W.absmax, W.rows, W.cols, W.blocksize); });
        return id;
      },
      free: (id) => (this.#ctx && !this.#closeWhenIdle ? this.#run('nf4Free', (n, c) => n.nf4Free(c, id)) : Promise.resolve()),
    });
  }

  #ctxOrThrow(op: string): Ctx {
    if (!this.#ctx || this.#closeWhenIdle) throw new CudaArgumentError(`CudaBackend.${op}: backend already disposed`);
    return this.#ctx;
  }

  // Counts in-flight work so dispose() never frees the context under a running worker. An op that
  // runs out of device memory is retried once after the unpinned resident weights are freed: every
  // op allocates all its device buffers before it writes any host output, so a retry is safe.
  async #run(op: string, fn: (native: NativeCuda, ctx: Ctx) => Promise<void>): Promise<void> {
    const ctx = this.#ctxOrThrow(op);
    this.#inFlight++;
    try {
      try {
        await fn(this.#native, ctx);
      } catch (e) {
        const err = toCudaError(e, op);
        if (!(err instanceof CudaError) || err.status !== CUDA_ERROR_MEMORY_ALLOCATION || op === 'nf4Free') throw err;
        if (await this.#weights.evictUnpinned() === 0) throw err;
        await fn(this.#native, ctx).catch((e2: unknown) => { throw toCudaError(e2, op); });
      }
    } finally {
      this.#inFlight--;
      if (this.#inFlight === 0 && this.#closeWhenIdle) this.#closeNow();
    }
  }

  async gemm(transA: boolean, transB: boolean, M: number, N: number, K: number,
    alpha: number, A: F32, B: F32, beta: number, C: F32): Promise<void> {
    dims('gemm', { M, N, K });
    need('gemm', 'A', A, M * K); need('gemm', 'B', B, K * N); need('gemm', 'C', C, M * N);
    await this.#run('gemm', (n, c) => n.gemm(c, transA, transB, M, N, K, alpha, d(A), d(B), beta, d(C)));
  }

  async gemmNF4(M: number, X: F32, W: NF4Weight, beta: number, Y: F32): Promise<void> {
    checkNF4('gemmNF4', W);
    dims('gemmNF4', { M });
    need('gemmNF4', 'X', X, M * W.cols); need('gemmNF4', 'Y', Y, M * W.rows);
    if (M === 0 || W.rows === 0) return;
    if (W.cols === 0) return this.#scale('gemmNF4', Y, M * W.rows, beta);  // empty sum: Y = beta·Y, as the reference
    await this.#withWeight('gemmNF4', W,
      (n, c, id) => n.gemmNF4Resident(c, M, d(X), id, beta, d(Y)),
      (n, c) => n.gemmNF4(c, M, d(X), W.packed, W.absmax, W.rows, W.cols, W.blocksize, beta, d(Y)));
  }

  async gemmNF4T(M: number, DY: F32, W: NF4Weight, beta: number, DX: F32): Promise<void> {
    checkNF4('gemmNF4T', W);
    dims('gemmNF4T', { M });
    need('gemmNF4T', 'DY', DY, M * W.rows); need('gemmNF4T', 'DX', DX, M * W.cols);
    if (M === 0 || W.cols === 0) return;
    if (W.rows === 0) return this.#scale('gemmNF4T', DX, M * W.cols, beta);
    await this.#withWeight('gemmNF4T', W,
      (n, c, id) => n.gemmNF4TResident(c, M, d(DY), id, beta, d(DX)),
      (n, c) => n.gemmNF4T(c, M, d(DY), W.packed, W.absmax, W.rows, W.cols, W.blocksize, beta, d(DX)));
  }

  async dequantNF4(W: NF4Weight, out: F32): Promise<void> {
    const n = checkNF4('dequantNF4', W);
    need('dequantNF4', 'out', out, n);
    if (n === 0) return;
    await this.#withWeight('dequantNF4', W,
      (nat, c, id) => nat.dequantNF4Resident(c, id, d(out)),
      (nat, c) => nat.dequantNF4(c, W.packed, W.absmax, W.rows, W.cols, W.blocksize, d(out)));
  }

  // Runs an NF4 op on W's resident copy (uploaded on first use), or with a per-call upload when W
  // cannot be resident within the weight-cache budget.
  // Y = beta·Y (the empty sum of a zero-size weight), on the host or on the device; beta = 0 ignores NaN in Y.
  async #scale(op: string, Y: F32, n: number, beta: number): Promise<void> {
    if (Y instanceof Float32Array) return scaleInPlace(Y, n, beta);
    if (n === 0) return;
    const mask = new Uint8Array(n).fill(beta === 0 ? 0 : 1);
    await this.#run(op, (nat, c) => nat.maskScale(c, Y.addr, Y.addr, mask, beta, n, false));
  }

  async #withWeight(op: string, W: NF4Weight, resident: (n: NativeCuda, c: Ctx, id: number) => Promise<void>,
    perCall: (n: NativeCuda, c: Ctx) => Promise<void>): Promise<void> {
    this.#ctxOrThrow(op);
    const lease: WeightLease | null = await this.#weights.acquire(W);
    if (!lease) return this.#run(op, perCall);
    try {
      await this.#run(op, (n, c) => resident(n, c, lease.id));
    } finally {
      lease.release();
    }
  }

  /** The device-resident view of this backend (one per backend): buffers are CudaTensors in device
   *  memory and every op runs on them in place, so activations cross PCIe only when the caller uploads
   *  or downloads. Stages use it through tensorsOf(backend). */
  tensors(): CudaTensors {
    this.#ctxOrThrow('tensors');
    if (!this.#tensors) {
      const device: TensorDevice = {
        alloc: (bytes) => {
          const ctx = this.#ctxOrThrow('tensors().alloc');
          try {
            return this.#native.devAlloc(ctx, bytes);
          } catch (e) {
            throw toCudaError(e, 'CudaTensors.alloc');
          }
        },
        free: (addr, bytes) => {
          if (!this.#ctx) return;  // closed: stc_close released everything
          try {
            this.#native.devFree(this.#ctx, addr, bytes);
          } catch (e) {
            throw toCudaError(e, 'CudaTensors.free');
          }
        },
        copy: (dst, src, bytes) => this.#run('CudaTensors.copy', (n, c) => n.copy(c, dst, src, bytes)),
        add: (y, x, n) => this.#run('CudaTensors.add', (nat, c) => nat.add(c, y, x, n)),
        addBias: (y, bias, T, N) => this.#run('CudaTensors.addBias', (nat, c) => nat.addBias(c, y, bias, T, N)),
        maskScale: (out, x, mask, scale, n, acc) =>
          this.#run('CudaTensors.maskScale', (nat, c) => nat.maskScale(c, out, x, mask, scale, n, acc)),
      };
      this.#tensors = new CudaTensors(device, this, this.name);
    }
    return this.#tensors;
  }

  /** Op counters: inline launches vs worker ops, what the library queued without waiting, and the
   *  host's waits on the device (see CudaOpStats). */
  opStats(): CudaOpStats {
    return this.#native.opStats(this.#ctxOrThrow('opStats'));
  }

  /** Resolves once every op queued so far has completed on the device (rejects with CudaAsyncError if
   *  one of them failed). Downloads already wait; this is for timing and for checking. */
  async synchronize(): Promise<void> {
    await this.#run('synchronize', (n, c) => n.sync(c));
  }

  /** Test hook: queues a kernel that stores to an unmapped address. It poisons this process's CUDA
   *  context for good (every later op fails): only for tests of asynchronous error reporting, in a
   *  process of their own. */
  async debugFault(kind: 'illegal-address'): Promise<void> {
    if (kind !== 'illegal-address') throw new CudaArgumentError(`CudaBackend.debugFault: unknown kind ${String(kind)}`);
    await this.#run('debugFault', (n, c) => n.debugFault(c, 1));
  }

  /** Device tensors as CudaTensors accounts them, and as the library holds them (live tensors, their
   *  bytes, and pool bytes handed out right now: tensors plus running ops' scratch). */
  tensorStats(): ReturnType<CudaTensors['stats']> & { libraryTensors: number; libraryTensorBytes: number; poolInUseBytes: number } {
    const lib = this.#native.devStats(this.#ctxOrThrow('tensorStats'));
    const own = this.tensors().stats();
    return { ...own, libraryTensors: lib.tensors, libraryTensorBytes: lib.tensorBytes, poolInUseBytes: lib.poolInUseBytes };
  }

  /** The NF4 weight cache: budget, resident bytes (as accounted here and as the library reports), hits and evictions. */
  weightCacheStats(): WeightCacheStats & { libraryCount: number; libraryBytes: number } {
    const lib = this.#native.nf4Stats(this.#ctxOrThrow('weightCacheStats'));
    return { ...this.#weights.stats(), libraryCount: lib.count, libraryBytes: lib.bytes };
  }

  /** Device bytes a resident copy of an NF4 weight of this geometry takes. */
  nf4ResidentBytes(rows: number, cols: number, blocksize: number): number {
    return this.#native.nf4ResidentBytes(rows, cols, blocksize);
  }

  /** Times NF4 dequantization and the fused NF4 GEMM on device-resident random data (benchmarks). */
  async benchNF4(opts: { M: number; rows: number; cols: number; blocksize?: number; iters?: number }): Promise<CudaNF4Bench> {
    const bs = opts.blocksize ?? 64, iters = opts.iters ?? 20;
    dims('benchNF4', { M: opts.M, rows: opts.rows, cols: opts.cols, iters });
    if (opts.M < 1 || opts.rows < 1 || opts.cols < 1 || iters < 1 || iters > 1000) {
      throw new CudaArgumentError(`CudaBackend.benchNF4: M, rows, cols must be >= 1 and iters in 1..1000 (got ${opts.M}, ${opts.rows}, ${opts.cols}, ${iters})`);
    }
    const out = new Float64Array(3);
    await this.#run('benchNF4', (n, c) => n.benchNF4(c, opts.M, opts.rows, opts.cols, bs, iters, out));
    return { dequantGBs: out[0], dequantSeconds: out[1], gemmNF4Tflops: out[2] };
  }

  async rmsnormForward(out: F32, rstd: F32, x: F32, w: F32,
    T: number, C: number, eps: number): Promise<void> {
    dims('rmsnormForward', { T, C });
    need('rmsnormForward', 'out', out, T * C); need('rmsnormForward', 'x', x, T * C);
    need('rmsnormForward', 'rstd', rstd, T); need('rmsnormForward', 'w', w, C);
    if (T === 0) return;
    await this.#run('rmsnormForward', (n, c) => n.rmsnormForward(c, d(out), d(rstd), d(x), d(w), T, C, eps));
  }

  async rmsnormBackward(dx: F32, dw: F32 | null, dout: F32, x: F32,
    w: F32, rstd: F32, T: number, C: number): Promise<void> {
    dims('rmsnormBackward', { T, C });
    need('rmsnormBackward', 'dx', dx, T * C); need('rmsnormBackward', 'dout', dout, T * C);
    need('rmsnormBackward', 'x', x, T * C); need('rmsnormBackward', 'w', w, C);
    need('rmsnormBackward', 'rstd', rstd, T);
    if (dw) need('rmsnormBackward', 'dw', dw, C);
    if (T === 0) return;
    await this.#run('rmsnormBackward', (n, c) => n.rmsnormBackward(c, d(dx), dw && d(dw), d(dout), d(x), d(w), d(rstd), T, C));
  }

  async rope(x: F32, cos: F32, sin: F32, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void> {
    dims('rope', { T, nHeads, D });
    if (D % 2 !== 0 || D === 0) throw new CudaArgumentError(`CudaBackend.rope: head dim D=${D} must be even and positive`);
    need('rope', 'x', x, T * nHeads * D); need('rope', 'positions', positions, T);
    if (cos.length !== sin.length) throw new CudaArgumentError(`CudaBackend.rope: cos has length ${cos.length} but sin has ${sin.length}`);
    const maxPos = Math.floor(cos.length / (D / 2));
    for (let t = 0; t < T; t++) {
      const p = positions[t];
      if (p < 0 || p >= maxPos) throw new CudaArgumentError(`CudaBackend.rope: positions[${t}]=${p} outside the cos/sin table of ${maxPos} rows`);
    }
    if (T === 0 || nHeads === 0) return;
    await this.#run('rope', (n, c) => n.rope(c, d(x), d(cos), d(sin), maxPos, positions, T, nHeads, D, inverse));
  }

  #checkAttention(op: string, B: number, S: number, H: number, KV: number, D: number): void {
    dims(op, { B, S, H, KV, D });
    if (KV === 0 || H % KV !== 0) throw new CudaArgumentError(`CudaBackend.${op}: H=${H} must be a positive multiple of KV=${KV}`);
    if (D === 0 || D > 256) throw new CudaArgumentError(`CudaBackend.${op}: head dim D=${D} unsupported (1..256)`);
  }

  async attentionForward(out: F32, lse: F32, q: F32, k: F32,
    v: F32, B: number, S: number, H: number, KV: number, D: number): Promise<void> {
    this.#checkAttention('attentionForward', B, S, H, KV, D);
    const T = B * S;
    need('attentionForward', 'out', out, T * H * D); need('attentionForward', 'q', q, T * H * D);
    need('attentionForward', 'k', k, T * KV * D); need('attentionForward', 'v', v, T * KV * D);
    need('attentionForward', 'lse', lse, B * H * S);
    if (T === 0) return;
    await this.#run('attentionForward', (n, c) => n.attentionForward(c, d(out), d(lse), d(q), d(k), d(v), B, S, H, KV, D));
  }

  async attentionBackward(dq: F32, dk: F32, dv: F32, dout: F32,
    q: F32, k: F32, v: F32, out: F32, lse: F32,
    B: number, S: number, H: number, KV: number, D: number): Promise<void> {
    this.#checkAttention('attentionBackward', B, S, H, KV, D);
    const T = B * S;
    for (const [name, a, n] of [['dq', dq, T * H * D], ['dout', dout, T * H * D], ['q', q, T * H * D],
      ['out', out, T * H * D], ['dk', dk, T * KV * D], ['dv', dv, T * KV * D], ['k', k, T * KV * D],
      ['v', v, T * KV * D], ['lse', lse, B * H * S]] as const) need('attentionBackward', name, a, n);
    if (T === 0) return;
    await this.#run('attentionBackward', (n, c) => n.attentionBackward(c, d(dq), d(dk), d(dv), d(dout), d(q), d(k), d(v), d(out), d(lse), B, S, H, KV, D));
  }

  async swigluForward(out: F32, gate: F32, up: F32, n: number): Promise<void> {
    dims('swigluForward', { n });
    need('swigluForward', 'out', out, n); need('swigluForward', 'gate', gate, n); need('swigluForward', 'up', up, n);
    if (n === 0) return;
    await this.#run('swigluForward', (nat, c) => nat.swigluForward(c, d(out), d(gate), d(up), n));
  }

  async swigluBackward(dgate: F32, dup: F32, dout: F32, gate: F32,
    up: F32, n: number): Promise<void> {
    dims('swigluBackward', { n });
    for (const [name, a] of [['dgate', dgate], ['dup', dup], ['dout', dout], ['gate', gate], ['up', up]] as const) {
      need('swigluBackward', name, a, n);
    }
    if (n === 0) return;
    await this.#run('swigluBackward', (nat, c) => nat.swigluBackward(c, d(dgate), d(dup), d(dout), d(gate), d(up), n));
  }

  async embeddingForward(out: F32, ids: Int32Array, table: F32, T: number, C: number,
    V: number): Promise<void> {
    dims('embeddingForward', { T, C, V });
    need('embeddingForward', 'out', out, T * C); need('embeddingForward', 'ids', ids, T);
    need('embeddingForward', 'table', table, V * C);
    for (let t = 0; t < T; t++) {
      const id = ids[t];
      if (id < 0 || id >= V) throw new CudaArgumentError(`CudaBackend.embeddingForward: ids[${t}]=${id} outside vocabulary [0, ${V})`);
    }
    if (T === 0 || C === 0) return;
    await this.#run('embeddingForward', (n, c) => n.embeddingForward(c, d(out), ids, d(table), T, C, V));
  }

  async crossEntropyChunkForward(logits: F32, labels: Int32Array, v0: number, T: number,
    Vc: number, m: F32, s: F32, picked: F32): Promise<void> {
    dims('crossEntropyChunkForward', { v0, T, Vc });
    need('crossEntropyChunkForward', 'logits', logits, T * Vc); need('crossEntropyChunkForward', 'labels', labels, T);
    need('crossEntropyChunkForward', 'm', m, T); need('crossEntropyChunkForward', 's', s, T);
    need('crossEntropyChunkForward', 'picked', picked, T);
    if (T === 0 || Vc === 0) return;
    await this.#run('crossEntropyChunkForward', (n, c) => n.crossEntropyChunkForward(c, d(logits), labels, v0, T, Vc, d(m), d(s), d(picked)));
  }

  async crossEntropyChunkBackward(logits: F32, labels: Int32Array, v0: number, T: number,
    Vc: number, lse: F32, scale: F32): Promise<void> {
    dims('crossEntropyChunkBackward', { v0, T, Vc });
    need('crossEntropyChunkBackward', 'logits', logits, T * Vc); need('crossEntropyChunkBackward', 'labels', labels, T);
    need('crossEntropyChunkBackward', 'lse', lse, T); need('crossEntropyChunkBackward', 'scale', scale, T);
    if (T === 0 || Vc === 0) return;
    await this.#run('crossEntropyChunkBackward', (n, c) => n.crossEntropyChunkBackward(c, d(logits), labels, v0, T, Vc, d(lse), d(scale)));
  }

  /** bitsandbytes 32-bit AdamW (decay applied after the Adam step) on host arrays; m, v updated in place. */
  async adamw32Step(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, hp: AdamWHyper): Promise<void> {
    checkHyper('adamw32Step', hp);
    const n = p.length;
    need('adamw32Step', 'g', g, n); need('adamw32Step', 'm', m, n); need('adamw32Step', 'v', v, n);
    if (n === 0) return;
    await this.#run('adamw32Step', (nat, c) => nat.adamw32(c, p, g, m, v, n, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weightDecay, hp.step));
  }

  /** bitsandbytes 8-bit blockwise AdamW (facts §3) on host arrays; the state is updated in place. */
  async adamw8bitStep(p: Float32Array, g: Float32Array, st: AdamW8bitState, hp: AdamWHyper): Promise<void> {
    checkHyper('adamw8bitStep', hp);
    const n = p.length, nb = Math.ceil(n / 256);
    need('adamw8bitStep', 'g', g, n);
    need('adamw8bitStep', 'state1', st.state1, n); need('adamw8bitStep', 'state2', st.state2, n);
    need('adamw8bitStep', 'absmax1', st.absmax1, nb); need('adamw8bitStep', 'absmax2', st.absmax2, nb);
    if (n === 0) return;
    await this.#run('adamw8bitStep', (nat, c) => nat.adamw8bit(c, p, g, st.state1, st.state2, st.absmax1, st.absmax2, n,
      hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weightDecay, hp.step));
  }

  /** Paged AdamW: optimizer state in pinned host memory, streamed through device staging slots that
   *  together stay within deviceBudgetBytes (default 256 MiB). */
  createPagedAdamW(opts: { bits: OptimizerBits; deviceBudgetBytes?: number; pageElems?: number; maxSlots?: number }): CudaPagedAdamW {
    const ctx = this.#ctxOrThrow('createPagedAdamW');
    const plan = planPagedOptimizer({ bits: opts.bits, deviceBudgetBytes: opts.deviceBudgetBytes ?? 256 * 2 ** 20,
      pageElems: opts.pageElems, maxSlots: opts.maxSlots });
    let handle: OptHandle;
    try {
      handle = this.#native.pagedCreate(ctx, opts.bits, plan.pageElems, plan.slots, plan.deviceBytes);
    } catch (e) {
      throw toCudaError(e, 'createPagedAdamW');
    }
    const opt = new CudaPagedAdamW(this.#native, handle, plan, opts.bits, (op, fn) => this.#run(op, () => fn()),
      () => this.#optimizers.delete(opt));
    this.#optimizers.add(opt);
    return opt;
  }

  /** The engine's Optimizer on this GPU (engine/train/optim.ts createOptimizer asks for it): the paged
   *  AdamW for paged_adamw_32bit / adamw_8bit / paged_adamw_8bit, null for what only the CPU AdamW
   *  implements (adamw_torch, or a finite host resident budget that spills to disk). */
  createOptimizer(params: readonly ParamSpec[], opts: AdamWOptions): Optimizer | null {
    const bits = cudaOptimizerBits(opts);
    if (bits === null) return null;
    const paged = this.createPagedAdamW({ bits });
    try {
      return new CudaOptimizer(paged, bits, params, opts, `cuda:${this.device.name}`);
    } catch (e) {
      paged.destroy();
      throw e;
    }
  }

  /** bytes the device pool holds now and at its peak (activations of the biggest op so far) */
  memoryStats(): { poolBytes: number; peakPoolBytes: number } {
    return this.#native.memoryStats(this.#ctxOrThrow('memoryStats'));
  }

  #closeNow(): void {
    this.#tensors?.dispose(false);  // stc_close frees the device tensors
    this.#weights.close();  // stc_close frees the resident weights
    for (const o of [...this.#optimizers]) o.destroy();
    if (this.#ctx) this.#native.close(this.#ctx);
    this.#ctx = null;
  }

  dispose(): void {
    if (!this.#ctx) return;
    this.#closeWhenIdle = true;
    if (this.#inFlight === 0) this.#closeNow();
  }
}

/** One paged AdamW instance: register tensors, then step each with its gradient. */
export class CudaPagedAdamW {
  readonly plan: PagedPlan;
  readonly bits: OptimizerBits;
  #native: NativeCuda;
  #handle: OptHandle | null;
  #sizes: number[] = [];
  #run: (op: string, fn: () => Promise<void>) => Promise<void>;
  #onDestroy: () => void;

  constructor(native: NativeCuda, handle: OptHandle, plan: PagedPlan, bits: OptimizerBits,
    run: (op: string, fn: () => Promise<void>) => Promise<void>, onDestroy: () => void) {
    this.#native = native;
    this.#handle = handle;
    this.plan = plan;
    this.bits = bits;
    this.#run = run;
    this.#onDestroy = onDestroy;
  }

  #h(op: string): OptHandle {
    if (!this.#handle) throw new CudaArgumentError(`CudaPagedAdamW.${op}: optimizer already destroyed`);
    return this.#handle;
  }

  /** Registers a tensor of n elements (zero state); returns its id. */
  add(n: number): number {
    const h = this.#h('add');
    if (!Number.isSafeInteger(n) || n <= 0) throw new CudaArgumentError(`CudaPagedAdamW.add: n=${n} must be a positive integer`);
    try {
      const id = this.#native.pagedAdd(h, n);
      this.#sizes[id] = n;
      return id;
    } catch (e) {
      throw toCudaError(e, 'CudaPagedAdamW.add');
    }
  }

  #size(op: string, id: number): number {
    const n = this.#sizes[id];
    if (n === undefined) throw new CudaArgumentError(`CudaPagedAdamW.${op}: unknown tensor id ${id}`);
    return n;
  }

  async step(id: number, p: Float32Array, g: Float32Array, hp: AdamWHyper): Promise<void> {
    const h = this.#h('step');
    const n = this.#size('step', id);
    checkHyper('CudaPagedAdamW.step', hp);
    if (p.length !== n || g.length !== n) {
      throw new CudaArgumentError(`CudaPagedAdamW.step: tensor ${id} has ${n} elements but p has ${p.length} and g has ${g.length}`);
    }
    await this.#run('CudaPagedAdamW.step', () => this.#native.pagedStep(h, id, p, g, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weightDecay, hp.step));
  }

  /** Copy of a tensor's state: 32-bit → {m, v}; 8-bit → {state1, state2, absmax1, absmax2}. */
  readState(id: number): { m: Float32Array; v: Float32Array } | AdamW8bitState {
    const h = this.#h('readState');
    const n = this.#size('readState', id);
    const info = this.#native.pagedStateInfo(h, id);
    const a = new Uint8Array(info.aBytes), b = new Uint8Array(info.bBytes);
    this.#native.pagedStateRead(h, id, a, b);
    if (!info.is8bit) return { m: new Float32Array(a.buffer), v: new Float32Array(b.buffer) };
    const nb = info.bBytes / 8;
    return { state1: a.subarray(0, n), state2: a.subarray(n), absmax1: new Float32Array(b.buffer, 0, nb),
      absmax2: new Float32Array(b.buffer, nb * 4, nb) };
  }

  /** Restores a tensor's state (checkpoint resume); layout as readState returns it. */
  writeState(id: number, st: { m: Float32Array; v: Float32Array } | AdamW8bitState): void {
    const h = this.#h('writeState');
    const n = this.#size('writeState', id);
    const info = this.#native.pagedStateInfo(h, id);
    const a = new Uint8Array(info.aBytes), b = new Uint8Array(info.bBytes);
    if ('m' in st) {
      if (info.is8bit) throw new CudaArgumentError(`CudaPagedAdamW.writeState: tensor ${id} keeps 8-bit state, got fp32 m/v`);
      need('writeState', 'm', st.m, n); need('writeState', 'v', st.v, n);
      a.set(new Uint8Array(st.m.buffer, st.m.byteOffset, n * 4));
      b.set(new Uint8Array(st.v.buffer, st.v.byteOffset, n * 4));
    } else {
      if (!info.is8bit) throw new CudaArgumentError(`CudaPagedAdamW.writeState: tensor ${id} keeps fp32 state, got 8-bit codes`);
      const nb = info.bBytes / 8;
      need('writeState', 'state1', st.state1, n); need('writeState', 'state2', st.state2, n);
      need('writeState', 'absmax1', st.absmax1, nb); need('writeState', 'absmax2', st.absmax2, nb);
      a.set(st.state1.subarray(0, n));
      a.set(st.state2.subarray(0, n), n);
      b.set(new Uint8Array(st.absmax1.buffer, st.absmax1.byteOffset, nb * 4));
      b.set(new Uint8Array(st.absmax2.buffer, st.absmax2.byteOffset, nb * 4), nb * 4);
    }
    this.#native.pagedStateWrite(h, id, a, b);
  }

  stats(): { hostPinnedBytes: number; deviceBytes: number } {
    return this.#native.pagedStats(this.#h('stats'));
  }

  destroy(): void {
    if (!this.#handle) return;
    this.#native.pagedDestroy(this.#handle);
    this.#handle = null;
    this.#onDestroy();
  }
}
