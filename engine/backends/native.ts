// NativeBackend: the Backend interface over the C++ CPU kernels (engine/native), each op a Promise resolved off the event loop.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import type { AttentionOptions, Backend } from '../backend.ts';
import { attentionOptions } from '../backend.ts';
import type { NF4Weight } from '../formats/nf4.ts';
import { knobs } from '../env.ts';

/** An op rejected by the native kernels (argument lengths vs dims, ids outside the vocabulary, a
 *  disposed backend, out of memory). The message starts with the op name. */
export class NativeOpError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NativeOpError';
  }
}

/** The native addon could not be loaded (not built, or built for another platform). */
export class NativeAddonMissingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NativeAddonMissingError';
  }
}

type Op = (...args: unknown[]) => Promise<void>;
interface NativeEngine {
  readonly threads: number;
  gemm: Op; gemmNF4: Op; gemmNF4T: Op; dequantNF4: Op;
  rmsnormForward: Op; rmsnormBackward: Op; rope: Op;
  attentionForward: Op; attentionBackward: Op;
  swigluForward: Op; swigluBackward: Op; embeddingForward: Op;
  gegluForward: Op; gegluBackward: Op; softcapForward: Op; softcapBackward: Op;
  crossEntropyChunkForward: Op; crossEntropyChunkBackward: Op;
  dispose(): void;
}
export interface NativeAddon {
  NativeEngine: new (threads: number) => NativeEngine;
  hardwareThreads(): number;
  /** which GEMM micro-kernel this build selected, e.g. "avx512 6x32" */
  kernelName(): string;
  /** synchronous FMA-throughput probe (benchmarks only): GFLOP/s over `threads` threads */
  fmaPeakGflops(threads: number, iters: number): number;
}

const ADDON_PATH = '../native/build/Release/swarmtune_native.node';
let addon: NativeAddon | null = null;

/** Loads the compiled addon once; throws NativeAddonMissingError with the fix if it is not built.
 *  SWARMTUNE_NATIVE_ADDON=/abs/path.node loads another build (e.g. an AVX2-only build under test). */
export function loadNativeAddon(): NativeAddon {
  if (addon) return addon;
  const require = createRequire(import.meta.url);
  // outside the try: a malformed knob is the user's error to see, not a missing addon
  const path = knobs().nativeAddon ?? ADDON_PATH;
  try {
    addon = require(path) as NativeAddon;
  } catch (e) {
    throw new NativeAddonMissingError(`cannot load the native CPU kernels from engine/native/build/Release/swarmtune_native.node ` +
      `(${(e as Error).message}); build them with: npx node-gyp rebuild --directory engine/native`);
  }
  if (typeof addon.NativeEngine !== 'function') {
    addon = null;
    throw new NativeAddonMissingError('engine/native/build/Release/swarmtune_native.node is an old build without NativeEngine; ' +
      'rebuild with: npx node-gyp rebuild --directory engine/native');
  }
  return addon;
}

/** Physical cores this process may use: SMT siblings share one core's FMA units, so a second GEMM
 *  thread per core only adds contention. Linux /proc/cpuinfo (distinct physical id + core id pairs),
 *  capped by the CPUs this process is allowed to run on; elsewhere the available parallelism. */
export function defaultThreadCount(): number {
  const allowed = availableParallelism();
  try {
    const cores = new Set<string>();
    let phys = '0';
    for (const line of readFileSync('/proc/cpuinfo', 'utf8').split('\n')) {
      const [key, value] = line.split(':').map((x) => x?.trim());
      if (key === 'physical id') phys = value;
      else if (key === 'core id') cores.add(`${phys}:${value}`);
    }
    return cores.size > 0 ? Math.max(1, Math.min(allowed, cores.size)) : allowed;
  } catch {
    return allowed;
  }
}

/** attention options with defaults, or a rejected NativeOpError naming the op */
function nativeAttentionOptions(op: string, D: number, opts?: AttentionOptions): ReturnType<typeof attentionOptions> | Promise<void> {
  try {
    return attentionOptions(D, opts);
  } catch (e) {
    return Promise.reject(new NativeOpError(`${op}: ${(e as Error).message}`));
  }
}

async function call(p: Promise<void>): Promise<void> {
  try {
    await p;
  } catch (e) {
    throw new NativeOpError((e as Error).message);
  }
}

export class NativeBackend implements Backend {
  readonly name = 'cpu';
  readonly threads: number;
  private readonly engine: NativeEngine;

  /** threads defaults to the physical core count (defaultThreadCount) */
  constructor(opts: { threads?: number } = {}) {
    const lib = loadNativeAddon();
    const threads = opts.threads ?? defaultThreadCount();
    if (!Number.isInteger(threads) || threads < 1 || threads > 256) {
      throw new NativeOpError(`NativeBackend: threads=${threads} must be an integer in 1..256`);
    }
    this.engine = new lib.NativeEngine(threads);
    this.threads = this.engine.threads;
  }

  gemm(transA: boolean, transB: boolean, M: number, N: number, K: number,
    alpha: number, A: Float32Array, B: Float32Array, beta: number, C: Float32Array): Promise<void> {
    return call(this.engine.gemm(transA, transB, M, N, K, alpha, A, B, beta, C));
  }
  gemmNF4(M: number, X: Float32Array, W: NF4Weight, beta: number, Y: Float32Array): Promise<void> {
    return call(this.engine.gemmNF4(M, X, W.packed, W.absmax, W.rows, W.cols, W.blocksize, beta, Y));
  }
  gemmNF4T(M: number, DY: Float32Array, W: NF4Weight, beta: number, DX: Float32Array): Promise<void> {
    return call(this.engine.gemmNF4T(M, DY, W.packed, W.absmax, W.rows, W.cols, W.blocksize, beta, DX));
  }
  dequantNF4(W: NF4Weight, out: Float32Array): Promise<void> {
    return call(this.engine.dequantNF4(W.packed, W.absmax, W.rows, W.cols, W.blocksize, out));
  }
  rmsnormForward(out: Float32Array, rstd: Float32Array, x: Float32Array, w: Float32Array,
    T: number, C: number, eps: number): Promise<void> {
    return call(this.engine.rmsnormForward(out, rstd, x, w, T, C, eps));
  }
  rmsnormBackward(dx: Float32Array, dw: Float32Array | null, dout: Float32Array, x: Float32Array,
    w: Float32Array, rstd: Float32Array, T: number, C: number): Promise<void> {
    return call(this.engine.rmsnormBackward(dx, dw, dout, x, w, rstd, T, C));
  }
  rope(x: Float32Array, cos: Float32Array, sin: Float32Array, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void> {
    return call(this.engine.rope(x, cos, sin, positions, T, nHeads, D, inverse));
  }
  attentionForward(out: Float32Array, lse: Float32Array, q: Float32Array, k: Float32Array,
    v: Float32Array, B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    const o = nativeAttentionOptions('attentionForward', D, opts);
    if (o instanceof Promise) return o;
    return call(this.engine.attentionForward(out, lse, q, k, v, B, S, H, KV, D, o.scale, o.softcap, o.window));
  }
  attentionBackward(dq: Float32Array, dk: Float32Array, dv: Float32Array, dout: Float32Array,
    q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, lse: Float32Array,
    B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    const o = nativeAttentionOptions('attentionBackward', D, opts);
    if (o instanceof Promise) return o;
    return call(this.engine.attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D, o.scale, o.softcap, o.window));
  }
  swigluForward(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): Promise<void> {
    return call(this.engine.swigluForward(out, gate, up, n));
  }
  swigluBackward(dgate: Float32Array, dup: Float32Array, dout: Float32Array, gate: Float32Array,
    up: Float32Array, n: number): Promise<void> {
    return call(this.engine.swigluBackward(dgate, dup, dout, gate, up, n));
  }
  gegluForward(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): Promise<void> {
    return call(this.engine.gegluForward(out, gate, up, n));
  }
  gegluBackward(dgate: Float32Array, dup: Float32Array, dout: Float32Array, gate: Float32Array,
    up: Float32Array, n: number): Promise<void> {
    return call(this.engine.gegluBackward(dgate, dup, dout, gate, up, n));
  }
  softcapForward(y: Float32Array, x: Float32Array, cap: number, n: number): Promise<void> {
    return call(this.engine.softcapForward(y, x, cap, n));
  }
  softcapBackward(dx: Float32Array, dy: Float32Array, x: Float32Array, cap: number, n: number): Promise<void> {
    return call(this.engine.softcapBackward(dx, dy, x, cap, n));
  }
  embeddingForward(out: Float32Array, ids: Int32Array, table: Float32Array, T: number, C: number,
    V: number): Promise<void> {
    return call(this.engine.embeddingForward(out, ids, table, T, C, V));
  }
  crossEntropyChunkForward(logits: Float32Array, labels: Int32Array, v0: number, T: number,
    Vc: number, m: Float32Array, s: Float32Array, picked: Float32Array): Promise<void> {
    return call(this.engine.crossEntropyChunkForward(logits, labels, v0, T, Vc, m, s, picked));
  }
  crossEntropyChunkBackward(logits: Float32Array, labels: Int32Array, v0: number, T: number,
    Vc: number, lse: Float32Array, scale: Float32Array): Promise<void> {
    return call(this.engine.crossEntropyChunkBackward(logits, labels, v0, T, Vc, lse, scale));
  }
  /** Stops the worker threads once in-flight ops finish; later calls reject with NativeOpError. */
  dispose(): void {
    this.engine.dispose();
  }
}
