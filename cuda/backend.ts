// The CUDA backend: CudaBackend implements the engine's Backend interface on one GPU through the addon
// (cuda/native.ts), and loadCudaBackend opens it.
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
import type { AttentionOptions, Backend } from '../engine/backend.ts';
import { attentionOptions } from '../engine/backend.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { isDoubleQuant } from '../engine/formats/nf4.ts';
import type { AdamWOptions, Optimizer, ParamSpec } from '../engine/optimizer.ts';
import { CudaArgumentError, CudaError, toCudaError } from './errors.ts';
import { checkNF4, dims, need } from './checks.ts';
import { cudaAvailable, loadCudaAddon, openDevice, type CudaDeviceInfo, type CudaOpStats, type Ctx, type DevArg,
  type NativeCuda } from './native.ts';
import { checkHyper, CudaOptimizer, cudaOptimizerBits, CudaPagedAdamW, openPagedAdamW, type AdamW8bitState,
  type AdamWHyper, type PagedAdamWOptions } from './optimizer.ts';
import { NF4WeightCache, type WeightCacheStats, type WeightLease } from './weight-cache.ts';
import { CudaTensor, CudaTensors, type TensorDevice } from './tensors.ts';

/** A float buffer as CudaBackend's ops take it: a host array or a device tensor (cuda/tensors.ts). */
export type F32 = Float32Array | CudaTensor;
const d = (x: F32): DevArg => (x instanceof Float32Array ? x : x.addr);

/** attention's scale, soft-cap and window with their defaults; a bad one is an argument error */
function cudaAttentionOptions(op: string, D: number, opts?: AttentionOptions): ReturnType<typeof attentionOptions> {
  try {
    return attentionOptions(D, opts);
  } catch (e) {
    throw new CudaArgumentError(`CudaBackend.${op}: ${(e as Error).message}`);
  }
}

/** cudaErrorMemoryAllocation */
const CUDA_ERROR_MEMORY_ALLOCATION = 2;

/** How loadCudaBackend opens the device and sizes what it keeps resident. */
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
  cudaAvailable();
  if (opts?.syncEachOp !== undefined) native.setSync(opened.ctx, opts.syncEachOp === true);
  return new CudaBackend(native, opened.ctx, opened.info, precision === 1 ? 'fp32' : 'bf16',
    wc ?? defaultWeightCacheBytes(opened.info.freeMemoryBytes));
}

function scaleInPlace(Y: Float32Array, n: number, beta: number): void {
  for (let i = 0; i < n; i++) Y[i] = beta === 0 ? 0 : beta * Y[i];
}

/** The engine's Backend on one GPU (see the top of this file); loadCudaBackend opens one. */
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
      residentBytes: (W) => native.nf4ResidentBytes(W.rows, W.cols, W.blocksize, isDoubleQuant(W.absmax) ? W.absmax.nestedBlocksize : 0),
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

  // Y = beta·Y (the empty sum of a zero-size weight), on the host or on the device; beta = 0 ignores NaN in Y.
  async #scale(op: string, Y: F32, n: number, beta: number): Promise<void> {
    if (Y instanceof Float32Array) return scaleInPlace(Y, n, beta);
    if (n === 0) return;
    const mask = new Uint8Array(n).fill(beta === 0 ? 0 : 1);
    await this.#run(op, (nat, c) => nat.maskScale(c, Y.addr, Y.addr, mask, beta, n, false));
  }

  // Runs an NF4 op on W's resident copy (uploaded on first use), or with a per-call upload when W
  // cannot be resident within the weight-cache budget.
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

  /** Device bytes a resident copy of an NF4 weight of this geometry takes: float32 absmax, or double-quantized
   *  constants with `nestedBlocksize` codes per nested absmax (bitsandbytes: 256). */
  nf4ResidentBytes(rows: number, cols: number, blocksize: number, nestedBlocksize = 0): number {
    return this.#native.nf4ResidentBytes(rows, cols, blocksize, nestedBlocksize);
  }

  /** Times NF4 dequantization and the fused NF4 GEMM on device-resident random data (benchmarks), with float32
   *  absmax or (doubleQuant) double-quantized constants decoded in the kernels. */
  async benchNF4(opts: { M: number; rows: number; cols: number; blocksize?: number; iters?: number; doubleQuant?: boolean }): Promise<CudaNF4Bench> {
    const bs = opts.blocksize ?? 64, iters = opts.iters ?? 20;
    dims('benchNF4', { M: opts.M, rows: opts.rows, cols: opts.cols, iters });
    if (opts.M < 1 || opts.rows < 1 || opts.cols < 1 || iters < 1 || iters > 1000) {
      throw new CudaArgumentError(`CudaBackend.benchNF4: M, rows, cols must be >= 1 and iters in 1..1000 (got ${opts.M}, ${opts.rows}, ${opts.cols}, ${iters})`);
    }
    const out = new Float64Array(3);
    await this.#run('benchNF4', (n, c) => n.benchNF4(c, opts.M, opts.rows, opts.cols, bs, opts.doubleQuant === true, iters, out));
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
    v: F32, B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    this.#checkAttention('attentionForward', B, S, H, KV, D);
    const o = cudaAttentionOptions('attentionForward', D, opts);
    const T = B * S;
    need('attentionForward', 'out', out, T * H * D); need('attentionForward', 'q', q, T * H * D);
    need('attentionForward', 'k', k, T * KV * D); need('attentionForward', 'v', v, T * KV * D);
    need('attentionForward', 'lse', lse, B * H * S);
    if (T === 0) return;
    await this.#run('attentionForward', (n, c) => n.attentionForward(c, d(out), d(lse), d(q), d(k), d(v), B, S, H, KV, D, o.scale, o.softcap, o.window));
  }

  async attentionBackward(dq: F32, dk: F32, dv: F32, dout: F32,
    q: F32, k: F32, v: F32, out: F32, lse: F32,
    B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    this.#checkAttention('attentionBackward', B, S, H, KV, D);
    const o = cudaAttentionOptions('attentionBackward', D, opts);
    const T = B * S;
    for (const [name, a, n] of [['dq', dq, T * H * D], ['dout', dout, T * H * D], ['q', q, T * H * D],
      ['out', out, T * H * D], ['dk', dk, T * KV * D], ['dv', dv, T * KV * D], ['k', k, T * KV * D],
      ['v', v, T * KV * D], ['lse', lse, B * H * S]] as const) need('attentionBackward', name, a, n);
    if (T === 0) return;
    await this.#run('attentionBackward', (n, c) => n.attentionBackward(c, d(dq), d(dk), d(dv), d(dout), d(q), d(k), d(v), d(out), d(lse), B, S, H, KV, D, o.scale, o.softcap, o.window));
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

  async gegluForward(out: F32, gate: F32, up: F32, n: number): Promise<void> {
    dims('gegluForward', { n });
    need('gegluForward', 'out', out, n); need('gegluForward', 'gate', gate, n); need('gegluForward', 'up', up, n);
    if (n === 0) return;
    await this.#run('gegluForward', (nat, c) => nat.gegluForward(c, d(out), d(gate), d(up), n));
  }

  async gegluBackward(dgate: F32, dup: F32, dout: F32, gate: F32, up: F32, n: number): Promise<void> {
    dims('gegluBackward', { n });
    for (const [name, a] of [['dgate', dgate], ['dup', dup], ['dout', dout], ['gate', gate], ['up', up]] as const) {
      need('gegluBackward', name, a, n);
    }
    if (n === 0) return;
    await this.#run('gegluBackward', (nat, c) => nat.gegluBackward(c, d(dgate), d(dup), d(dout), d(gate), d(up), n));
  }

  async softcapForward(y: F32, x: F32, cap: number, n: number): Promise<void> {
    dims('softcapForward', { n });
    need('softcapForward', 'y', y, n); need('softcapForward', 'x', x, n);
    if (!(cap > 0)) throw new CudaArgumentError(`CudaBackend.softcapForward: cap must be > 0, got ${cap}`);
    if (n === 0) return;
    await this.#run('softcapForward', (nat, c) => nat.softcapForward(c, d(y), d(x), cap, n));
  }

  async softcapBackward(dx: F32, dy: F32, x: F32, cap: number, n: number): Promise<void> {
    dims('softcapBackward', { n });
    need('softcapBackward', 'dx', dx, n); need('softcapBackward', 'dy', dy, n); need('softcapBackward', 'x', x, n);
    if (!(cap > 0)) throw new CudaArgumentError(`CudaBackend.softcapBackward: cap must be > 0, got ${cap}`);
    if (n === 0) return;
    await this.#run('softcapBackward', (nat, c) => nat.softcapBackward(c, d(dx), d(dy), d(x), cap, n));
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
  createPagedAdamW(opts: PagedAdamWOptions): CudaPagedAdamW {
    const ctx = this.#ctxOrThrow('createPagedAdamW');
    const opt = openPagedAdamW(this.#native, ctx, opts, (op, fn) => this.#run(op, () => fn()),
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
