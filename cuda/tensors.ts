// Device-resident tensors for the CUDA backend: the engine's TensorBackend over device memory, so a stage
// keeps its activations on the GPU from op to op and crosses to the host only at its boundaries.
//
// A CudaTensor is a device address (BigInt) plus a length in floats. Allocations come from the
// library's caching pool (zero-filled) and go back with free(); slices are views into an allocation
// (never freed, they die with it); constants are device copies of frozen host arrays, cached per array
// object and released when that array is collected or the backend is disposed. Every op forwards to
// the CudaBackend op of the same name with device addresses in place of Float32Arrays: the library
// uses device pointers in place, so nothing crosses PCIe between ops.
//
// Bookkeeping that keeps the device memory safe without trusting callers:
// - use after free and double free throw CudaArgumentError naming the op, before any device work;
// - a tensor freed while an op still uses it is released only when that op completes;
// - a tensor dropped without free() is released when it is garbage collected (a backstop, counted in stats);
// - dispose() releases every tensor and constant still alive; tensors used afterwards throw.
import type { AttentionOptions, Ops, TensorBackend } from '../engine/backend.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { CudaArgumentError } from './errors.ts';

/** What CudaTensors needs from the device: the library's pool, copies and the three elementwise ops.
 *  CudaBackend provides the real one; tests may provide a host-memory stand-in. */
export interface TensorDevice {
  /** a zero-filled device buffer of `bytes` bytes; its address (synchronous, never waits for an op) */
  alloc(bytes: number): bigint;
  /** returns an allocation to the pool (synchronous); bytes as allocated */
  free(addr: bigint, bytes: number): void;
  /** bytes from src to dst, each a host Float32Array or a device address */
  copy(dst: Float32Array | bigint, src: Float32Array | bigint, bytes: number): Promise<void>;
  add(y: bigint, x: bigint, n: number): Promise<void>;
  addBias(y: bigint, bias: bigint, T: number, N: number): Promise<void>;
  maskScale(out: bigint, x: bigint, mask: Uint8Array, scale: number, n: number, accumulate: boolean): Promise<void>;
}

/** Per-allocation state (shared by the allocation and its slices). */
interface Root {
  tb: CudaTensors;
  addr: bigint;
  bytes: number;
  freed: boolean;
  /** ops in flight that use this allocation or one of its slices */
  busy: number;
  /** free() was called while busy: released when the last op completes */
  freePending: boolean;
  constant: boolean;
}

const roots = new WeakMap<CudaTensor, Root>();

/** A float32 buffer in device memory: `length` floats at device address `addr`. */
export class CudaTensor {
  readonly addr: bigint;
  readonly length: number;
  /** the allocation a slice views (null for an allocation or a constant) */
  readonly owner: CudaTensor | null;
  constructor(addr: bigint, length: number, owner: CudaTensor | null, root: Root) {
    this.addr = addr;
    this.length = length;
    this.owner = owner;
    roots.set(this, root);
  }
  /** true once its allocation was freed (explicitly, by disposal, or for a constant whose array was collected) */
  get freed(): boolean {
    const r = roots.get(this)!;
    return r.freed || r.tb.disposed;
  }
  /** a constant: owned by the backend, never freed by callers */
  get constant(): boolean {
    return roots.get(this)!.constant;
  }
}

export interface CudaTensorStats {
  /** allocations (alloc/upload) alive, and their bytes */
  tensors: number;
  tensorBytes: number;
  /** constants cached, and their bytes */
  constants: number;
  constantBytes: number;
  allocs: number;
  frees: number;
  /** frees that waited for an op still using the tensor */
  deferredFrees: number;
  /** allocations released by the garbage-collection backstop (never freed explicitly) */
  collected: number;
  /** constants released because their host array was collected */
  constantsCollected: number;
  /** failed device frees (backstop or deferred), which cannot throw to a caller */
  failedFrees: number;
}

const FLOAT = 4;

function count(op: string, what: string, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new CudaArgumentError(`CudaTensors.${op}: ${what}=${n} must be a non-negative integer`);
}

/** The device-resident TensorBackend of a CudaBackend (`backend.tensors()`). */
export class CudaTensors implements TensorBackend<CudaTensor> {
  readonly name: string;
  readonly resident = 'device' as const;
  #device: TensorDevice;
  #ops: Ops<CudaTensor>;
  #disposed = false;
  /** live allocations by address: bytes (no references to the tensors, so the GC backstop can work) */
  #live = new Map<bigint, number>();
  #constants = new WeakMap<Float32Array, Promise<CudaTensor>>();
  /** live constants by address: bytes */
  #liveConstants = new Map<bigint, number>();
  #counters = { allocs: 0, frees: 0, deferredFrees: 0, collected: 0, constantsCollected: 0, failedFrees: 0 };
  #registry = new FinalizationRegistry<{ addr: bigint; bytes: number; root: Root }>((held) => {
    // an allocation collected without free(): hand its memory back (the last op using it has finished,
    // since an op in flight holds its tensors)
    if (held.root.freed || this.#disposed) return;
    held.root.freed = true;
    this.#counters.collected++;
    this.#release(held.addr, held.bytes, this.#live);
  });
  #constantRegistry = new FinalizationRegistry<{ addr: bigint; bytes: number; root: Root }>((held) => {
    if (held.root.freed || this.#disposed) return;
    held.root.freed = true;
    this.#counters.constantsCollected++;
    this.#release(held.addr, held.bytes, this.#liveConstants);
  });

  /** device: the pool and elementwise ops; ops: the backend ops, taking CudaTensors for their buffers. */
  constructor(device: TensorDevice, ops: Ops<CudaTensor>, name = 'cuda') {
    this.#device = device;
    this.#ops = ops;
    this.name = name;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  #release(addr: bigint, bytes: number, from: Map<bigint, number>): void {
    from.delete(addr);
    try {
      this.#device.free(addr, bytes);
    } catch {
      this.#counters.failedFrees++;
    }
  }

  #notDisposed(op: string): void {
    if (this.#disposed) throw new CudaArgumentError(`CudaTensors.${op}: the CUDA backend was disposed`);
  }

  /** The allocation behind b, checked: a CudaTensor of this backend that is still alive. */
  #root(op: string, what: string, b: unknown): Root {
    this.#notDisposed(op);
    const r = b instanceof CudaTensor ? roots.get(b) : undefined;
    if (!r) {
      const got = b instanceof Float32Array ? 'a host Float32Array (upload it first)' : b === null ? 'null' : typeof b;
      throw new CudaArgumentError(`CudaTensors.${op}: ${what} must be a CudaTensor, got ${got}`);
    }
    if (r.tb !== this) throw new CudaArgumentError(`CudaTensors.${op}: ${what} belongs to another CUDA backend`);
    if (r.freed) throw new CudaArgumentError(`CudaTensors.${op}: ${what} was freed (use after free)`);
    return r;
  }

  #newRoot(bytes: number, constant: boolean): { root: Root; addr: bigint } {
    const addr = this.#device.alloc(bytes);
    const root: Root = { tb: this, addr, bytes, freed: false, busy: 0, freePending: false, constant };
    return { root, addr };
  }

  // Runs fn with every tensor argument checked alive and marked busy, so a free() during the op waits for it.
  async #use<T>(op: string, args: Record<string, CudaTensor | null>, fn: () => Promise<T>): Promise<T> {
    const held: Root[] = [];
    for (const [what, b] of Object.entries(args)) {
      if (b === null) continue;
      held.push(this.#root(op, what, b));
    }
    for (const r of held) r.busy++;
    try {
      return await fn();
    } finally {
      for (const r of held) {
        r.busy--;
        if (r.busy === 0 && r.freePending) {
          r.freePending = false;
          if (!this.#disposed) this.#release(r.addr, r.bytes, this.#live);
        }
      }
    }
  }

  alloc(n: number): CudaTensor {
    this.#notDisposed('alloc');
    count('alloc', 'n', n);
    const bytes = n * FLOAT;
    const { root, addr } = this.#newRoot(bytes, false);
    const t = new CudaTensor(addr, n, null, root);
    this.#live.set(addr, bytes);
    this.#counters.allocs++;
    this.#registry.register(t, { addr, bytes, root }, t);
    return t;
  }

  free(b: CudaTensor | null | undefined): void {
    if (b === null || b === undefined) return;
    const r = this.#root('free', 'the buffer', b);
    if (b.owner !== null) throw new CudaArgumentError('CudaTensors.free: the buffer is a slice (views are never freed; free the tensor it was sliced from)');
    if (r.constant) throw new CudaArgumentError('CudaTensors.free: the buffer is a constant (owned by the backend, released with its host array)');
    r.freed = true;
    this.#registry.unregister(b);
    this.#counters.frees++;
    if (r.busy > 0) {
      r.freePending = true;
      this.#counters.deferredFrees++;
      return;
    }
    this.#release(r.addr, r.bytes, this.#live);
  }

  async upload(src: Float32Array): Promise<CudaTensor> {
    if (!(src instanceof Float32Array)) throw new CudaArgumentError(`CudaTensors.upload: src must be a Float32Array, got ${typeof src}`);
    const t = this.alloc(src.length);
    try {
      await this.#use('upload', { dst: t }, () => this.#device.copy(t.addr, src, src.length * FLOAT));
    } catch (e) {
      this.free(t);
      throw e;
    }
    return t;
  }

  constant(src: Float32Array): Promise<CudaTensor> {
    this.#notDisposed('constant');
    if (!(src instanceof Float32Array)) throw new CudaArgumentError(`CudaTensors.constant: src must be a Float32Array, got ${typeof src}`);
    const cached = this.#constants.get(src);
    if (cached) return cached;
    const p = (async () => {
      const bytes = src.length * FLOAT;
      const { root, addr } = this.#newRoot(bytes, true);
      const t = new CudaTensor(addr, src.length, null, root);
      this.#liveConstants.set(addr, bytes);
      try {
        await this.#use('constant', { dst: t }, () => this.#device.copy(addr, src, bytes));
      } catch (e) {
        this.#constants.delete(src);
        root.freed = true;
        if (!this.#disposed) this.#release(addr, bytes, this.#liveConstants);
        throw e;
      }
      this.#constantRegistry.register(src, { addr, bytes, root });
      return t;
    })();
    this.#constants.set(src, p);
    return p;
  }

  async download(b: CudaTensor, out?: Float32Array): Promise<Float32Array> {
    this.#root('download', 'the buffer', b);
    if (out !== undefined && !(out instanceof Float32Array)) throw new CudaArgumentError(`CudaTensors.download: out must be a Float32Array, got ${typeof out}`);
    if (out && out.length !== b.length) throw new CudaArgumentError(`CudaTensors.download: out has ${out.length} elements, the buffer ${b.length}`);
    const dst = out ?? new Float32Array(b.length);
    await this.#use('download', { buffer: b }, () => this.#device.copy(dst, b.addr, b.length * FLOAT));
    return dst;
  }

  slice(b: CudaTensor, start: number, end: number): CudaTensor {
    const r = this.#root('slice', 'the buffer', b);
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start || end > b.length) {
      throw new CudaArgumentError(`CudaTensors.slice: [${start}, ${end}) is not a range inside a buffer of ${b.length} elements`);
    }
    return new CudaTensor(b.addr + BigInt(start * FLOAT), end - start, b.owner ?? b, r);
  }

  async add(y: CudaTensor, x: CudaTensor, n: number): Promise<void> {
    count('add', 'n', n);
    this.#len('add', { y, x }, n);
    if (n === 0) return this.#use('add', { y, x }, async () => {});
    await this.#use('add', { y, x }, () => this.#device.add(y.addr, x.addr, n));
  }

  async addBias(y: CudaTensor, bias: CudaTensor, T: number, N: number): Promise<void> {
    count('addBias', 'T', T);
    count('addBias', 'N', N);
    this.#len('addBias', { y }, T * N);
    this.#len('addBias', { bias }, N);
    if (T === 0 || N === 0) return this.#use('addBias', { y, bias }, async () => {});
    await this.#use('addBias', { y, bias }, () => this.#device.addBias(y.addr, bias.addr, T, N));
  }

  async maskScale(out: CudaTensor, x: CudaTensor, mask: Uint8Array, scale: number, n: number, accumulate: boolean): Promise<void> {
    count('maskScale', 'n', n);
    this.#len('maskScale', { out, x }, n);
    if (!(mask instanceof Uint8Array)) throw new CudaArgumentError(`CudaTensors.maskScale: mask must be a Uint8Array, got ${typeof mask}`);
    if (mask.length < n) throw new CudaArgumentError(`CudaTensors.maskScale: mask has length ${mask.length}, expected at least ${n}`);
    if (typeof scale !== 'number') throw new CudaArgumentError(`CudaTensors.maskScale: scale must be a number, got ${typeof scale}`);
    if (n === 0) return this.#use('maskScale', { out, x }, async () => {});
    await this.#use('maskScale', { out, x }, () => this.#device.maskScale(out.addr, x.addr, mask, scale, n, accumulate));
  }

  #len(op: string, bufs: Record<string, CudaTensor>, n: number): void {
    for (const [what, b] of Object.entries(bufs)) {
      this.#root(op, what, b);
      if (b.length < n) throw new CudaArgumentError(`CudaTensors.${op}: ${what} has length ${b.length}, expected at least ${n}`);
    }
  }

  // ---- the Backend ops, on device buffers (CudaBackend checks lengths and dimensions, naming op and argument)

  gemm(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number, A: CudaTensor, B: CudaTensor,
    beta: number, C: CudaTensor): Promise<void> {
    return this.#use('gemm', { A, B, C }, () => this.#ops.gemm(transA, transB, M, N, K, alpha, A, B, beta, C));
  }
  gemmNF4(M: number, X: CudaTensor, W: NF4Weight, beta: number, Y: CudaTensor): Promise<void> {
    return this.#use('gemmNF4', { X, Y }, () => this.#ops.gemmNF4(M, X, W, beta, Y));
  }
  gemmNF4T(M: number, DY: CudaTensor, W: NF4Weight, beta: number, DX: CudaTensor): Promise<void> {
    return this.#use('gemmNF4T', { DY, DX }, () => this.#ops.gemmNF4T(M, DY, W, beta, DX));
  }
  dequantNF4(W: NF4Weight, out: CudaTensor): Promise<void> {
    return this.#use('dequantNF4', { out }, () => this.#ops.dequantNF4(W, out));
  }
  rmsnormForward(out: CudaTensor, rstd: CudaTensor, x: CudaTensor, w: CudaTensor, T: number, C: number, eps: number): Promise<void> {
    return this.#use('rmsnormForward', { out, rstd, x, w }, () => this.#ops.rmsnormForward(out, rstd, x, w, T, C, eps));
  }
  rmsnormBackward(dx: CudaTensor, dw: CudaTensor | null, dout: CudaTensor, x: CudaTensor, w: CudaTensor, rstd: CudaTensor,
    T: number, C: number): Promise<void> {
    return this.#use('rmsnormBackward', { dx, dw, dout, x, w, rstd }, () => this.#ops.rmsnormBackward(dx, dw, dout, x, w, rstd, T, C));
  }
  rope(x: CudaTensor, cos: CudaTensor, sin: CudaTensor, positions: Int32Array, T: number, nHeads: number, D: number,
    inverse: boolean): Promise<void> {
    return this.#use('rope', { x, cos, sin }, () => this.#ops.rope(x, cos, sin, positions, T, nHeads, D, inverse));
  }
  attentionForward(out: CudaTensor, lse: CudaTensor, q: CudaTensor, k: CudaTensor, v: CudaTensor, B: number, S: number,
    H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    return this.#use('attentionForward', { out, lse, q, k, v }, () => this.#ops.attentionForward(out, lse, q, k, v, B, S, H, KV, D, opts));
  }
  attentionBackward(dq: CudaTensor, dk: CudaTensor, dv: CudaTensor, dout: CudaTensor, q: CudaTensor, k: CudaTensor,
    v: CudaTensor, out: CudaTensor, lse: CudaTensor, B: number, S: number, H: number, KV: number, D: number,
    opts?: AttentionOptions): Promise<void> {
    return this.#use('attentionBackward', { dq, dk, dv, dout, q, k, v, out, lse },
      () => this.#ops.attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D, opts));
  }
  gegluForward(out: CudaTensor, gate: CudaTensor, up: CudaTensor, n: number): Promise<void> {
    return this.#use('gegluForward', { out, gate, up }, () => this.#ops.gegluForward(out, gate, up, n));
  }
  gegluBackward(dgate: CudaTensor, dup: CudaTensor, dout: CudaTensor, gate: CudaTensor, up: CudaTensor, n: number): Promise<void> {
    return this.#use('gegluBackward', { dgate, dup, dout, gate, up }, () => this.#ops.gegluBackward(dgate, dup, dout, gate, up, n));
  }
  softcapForward(y: CudaTensor, x: CudaTensor, cap: number, n: number): Promise<void> {
    return this.#use('softcapForward', { y, x }, () => this.#ops.softcapForward(y, x, cap, n));
  }
  softcapBackward(dx: CudaTensor, dy: CudaTensor, x: CudaTensor, cap: number, n: number): Promise<void> {
    return this.#use('softcapBackward', { dx, dy, x }, () => this.#ops.softcapBackward(dx, dy, x, cap, n));
  }
  swigluForward(out: CudaTensor, gate: CudaTensor, up: CudaTensor, n: number): Promise<void> {
    return this.#use('swigluForward', { out, gate, up }, () => this.#ops.swigluForward(out, gate, up, n));
  }
  swigluBackward(dgate: CudaTensor, dup: CudaTensor, dout: CudaTensor, gate: CudaTensor, up: CudaTensor, n: number): Promise<void> {
    return this.#use('swigluBackward', { dgate, dup, dout, gate, up }, () => this.#ops.swigluBackward(dgate, dup, dout, gate, up, n));
  }
  embeddingForward(out: CudaTensor, ids: Int32Array, table: CudaTensor, T: number, C: number, V: number): Promise<void> {
    return this.#use('embeddingForward', { out, table }, () => this.#ops.embeddingForward(out, ids, table, T, C, V));
  }
  crossEntropyChunkForward(logits: CudaTensor, labels: Int32Array, v0: number, T: number, Vc: number, m: CudaTensor,
    s: CudaTensor, picked: CudaTensor): Promise<void> {
    return this.#use('crossEntropyChunkForward', { logits, m, s, picked },
      () => this.#ops.crossEntropyChunkForward(logits, labels, v0, T, Vc, m, s, picked));
  }
  crossEntropyChunkBackward(logits: CudaTensor, labels: Int32Array, v0: number, T: number, Vc: number, lse: CudaTensor,
    scale: CudaTensor): Promise<void> {
    return this.#use('crossEntropyChunkBackward', { logits, lse, scale },
      () => this.#ops.crossEntropyChunkBackward(logits, labels, v0, T, Vc, lse, scale));
  }

  stats(): CudaTensorStats {
    let tensorBytes = 0, constantBytes = 0;
    for (const b of this.#live.values()) tensorBytes += b;
    for (const b of this.#liveConstants.values()) constantBytes += b;
    return { tensors: this.#live.size, tensorBytes, constants: this.#liveConstants.size, constantBytes, ...this.#counters };
  }

  /** Releases every allocation and constant still alive (deviceAlive = false when the library context
   *  is being closed anyway and frees them itself); any later use of this backend's tensors throws. */
  dispose(deviceAlive = true): void {
    if (this.#disposed) return;
    this.#disposed = true;
    if (deviceAlive) {
      for (const [addr, bytes] of [...this.#live, ...this.#liveConstants]) {
        try {
          this.#device.free(addr, bytes);
        } catch {
          this.#counters.failedFrees++;
        }
      }
    }
    this.#live.clear();
    this.#liveConstants.clear();
    this.#constants = new WeakMap();
  }
}
