// A checking stand-in for a device-resident TensorBackend (what CUDA's tensors() gives), over any host
// Backend. Buffers are opaque handles: the stage can only reach their values through download, exactly
// as with GPU memory. It enforces the TensorBackend rules the stage must follow on a device:
// - every alloc/upload is freed exactly once (live() counts what is still held; double free throws);
// - a freed buffer (or a slice of one) is never used again (its values are poisoned with NaN and any
//   op that touches it throws);
// - an op never gets the same memory as an input and an output, except where the op is in place;
// - download copies, upload copies: host arrays never alias device buffers.
import type { AttentionOptions, Backend, TensorBackend } from '../engine/backend.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { hostTensors } from '../engine/backend.ts';

export class SimBuf {
  readonly id: number;
  readonly root: SimBuf | null; // the allocation a slice views
  readonly start: number;
  readonly length: number;
  /** @internal the simulated device memory (never exposed to the code under test) */
  readonly mem: Float32Array;
  freed = false;
  readonly constant: boolean;
  constructor(id: number, mem: Float32Array, root: SimBuf | null, start: number, constant: boolean) {
    this.id = id;
    this.mem = mem;
    this.root = root;
    this.start = start;
    this.length = mem.length;
    this.constant = constant;
  }
}

export class SimDevice implements TensorBackend<SimBuf> {
  readonly name = 'sim-device';
  readonly resident = 'device' as const;
  readonly host: TensorBackend<Float32Array>;
  private nextId = 1;
  private readonly liveSet = new Set<SimBuf>();
  private readonly constants = new WeakMap<Float32Array, SimBuf>();
  /** counters for tests */
  uploads = 0;
  downloads = 0;
  constantUploads = 0;
  ops = 0;
  /** when an array, every upload ('U'), download ('D') and op ('O') is appended in order */
  log: string[] | null = null;

  constructor(host: Backend) {
    this.host = hostTensors(host);
  }

  /** buffers allocated or uploaded and not yet freed (constants excluded) */
  live(): number { return this.liveSet.size; }
  liveFloats(): number { let n = 0; for (const b of this.liveSet) n += b.length; return n; }

  private make(n: number, src?: Float32Array): SimBuf {
    const b = new SimBuf(this.nextId++, src ? new Float32Array(src) : new Float32Array(n), null, 0, false);
    this.liveSet.add(b);
    return b;
  }

  private mem(b: SimBuf, op: string, what: string): Float32Array {
    if (!(b instanceof SimBuf)) throw new TypeError(`sim-device ${op}: ${what} is not a device buffer (got ${Object.prototype.toString.call(b)})`);
    const root = b.root ?? b;
    if (root.freed) throw new Error(`sim-device ${op}: ${what} (buffer #${root.id}) used after free`);
    return b.mem;
  }

  alloc(n: number): SimBuf {
    if (!Number.isInteger(n) || n < 0) throw new RangeError(`sim-device alloc: bad size ${n}`);
    return this.make(n);
  }

  free(b: SimBuf | null | undefined): void {
    if (b === null || b === undefined) return;
    if (b.root !== null) throw new Error(`sim-device free: buffer #${b.id} is a slice of #${b.root.id}; slices are never freed`);
    if (b.constant) throw new Error(`sim-device free: buffer #${b.id} is a constant; constants are never freed by callers`);
    if (b.freed) throw new Error(`sim-device free: buffer #${b.id} freed twice`);
    b.freed = true;
    b.mem.fill(NaN);
    this.liveSet.delete(b);
  }

  async upload(src: Float32Array): Promise<SimBuf> {
    if (!(src instanceof Float32Array)) throw new TypeError('sim-device upload: src must be a Float32Array');
    this.uploads++;
    this.log?.push('U');
    return this.make(src.length, src);
  }

  async constant(src: Float32Array): Promise<SimBuf> {
    let b = this.constants.get(src);
    if (!b) {
      b = new SimBuf(this.nextId++, new Float32Array(src), null, 0, true);
      this.constants.set(src, b);
      this.constantUploads++;
    }
    return b;
  }

  async download(b: SimBuf, out?: Float32Array): Promise<Float32Array> {
    const m = this.mem(b, 'download', 'buffer');
    this.downloads++;
    this.log?.push('D');
    if (!out) return new Float32Array(m);
    if (out.length !== m.length) throw new RangeError(`sim-device download: out has ${out.length} elements, the buffer ${m.length}`);
    out.set(m);
    return out;
  }

  slice(b: SimBuf, start: number, end: number): SimBuf {
    const m = this.mem(b, 'slice', 'buffer');
    if (!(Number.isInteger(start) && Number.isInteger(end) && 0 <= start && start <= end && end <= m.length)) {
      throw new RangeError(`sim-device slice: [${start}, ${end}) outside [0, ${m.length})`);
    }
    const root = b.root ?? b;
    return new SimBuf(this.nextId++, m.subarray(start, end), root, b.start + start, root.constant);
  }

  /** the ops: resolve handles, check that outputs overlap no input, run the host op */
  private async run<R>(op: string, outs: (SimBuf | null)[], ins: (SimBuf | null)[], fn: (o: (Float32Array | null)[], i: (Float32Array | null)[]) => Promise<R>): Promise<R> {
    this.ops++;
    this.log?.push('O');
    const o = outs.map((b, k) => (b === null ? null : this.mem(b, op, `output ${k}`)));
    const i = ins.map((b, k) => (b === null ? null : this.mem(b, op, `input ${k}`)));
    const span = (b: SimBuf) => [(b.root ?? b).id, b.start, b.start + b.length] as const;
    for (let a = 0; a < outs.length; a++) {
      const oa = outs[a];
      if (!oa) continue;
      if (oa.constant) throw new Error(`sim-device ${op}: output ${a} is a constant`);
      const [ra, sa, ea] = span(oa);
      const others = [...outs.slice(a + 1), ...ins];
      for (const x of others) {
        if (!x || x.length === 0 || oa.length === 0) continue;
        const [rx, sx, ex] = span(x);
        if (rx === ra && sx < ea && sa < ex) throw new Error(`sim-device ${op}: output ${a} (buffer #${ra}) overlaps another argument`);
      }
    }
    return fn(o, i);
  }

  gemm(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number, A: SimBuf, B: SimBuf, beta: number, C: SimBuf): Promise<void> {
    return this.run('gemm', [C], [A, B], (o, i) => this.host.gemm(transA, transB, M, N, K, alpha, i[0]!, i[1]!, beta, o[0]!));
  }
  gemmNF4(M: number, X: SimBuf, W: NF4Weight, beta: number, Y: SimBuf): Promise<void> {
    return this.run('gemmNF4', [Y], [X], (o, i) => this.host.gemmNF4(M, i[0]!, W, beta, o[0]!));
  }
  gemmNF4T(M: number, DY: SimBuf, W: NF4Weight, beta: number, DX: SimBuf): Promise<void> {
    return this.run('gemmNF4T', [DX], [DY], (o, i) => this.host.gemmNF4T(M, i[0]!, W, beta, o[0]!));
  }
  dequantNF4(W: NF4Weight, out: SimBuf): Promise<void> {
    return this.run('dequantNF4', [out], [], (o) => this.host.dequantNF4(W, o[0]!));
  }
  rmsnormForward(out: SimBuf, rstd: SimBuf, x: SimBuf, w: SimBuf, T: number, C: number, eps: number): Promise<void> {
    return this.run('rmsnormForward', [out, rstd], [x, w], (o, i) => this.host.rmsnormForward(o[0]!, o[1]!, i[0]!, i[1]!, T, C, eps));
  }
  rmsnormBackward(dx: SimBuf, dw: SimBuf | null, dout: SimBuf, x: SimBuf, w: SimBuf, rstd: SimBuf, T: number, C: number): Promise<void> {
    return this.run('rmsnormBackward', [dx, dw], [dout, x, w, rstd], (o, i) => this.host.rmsnormBackward(o[0]!, o[1], i[0]!, i[1]!, i[2]!, i[3]!, T, C));
  }
  rope(x: SimBuf, cos: SimBuf, sin: SimBuf, positions: Int32Array, T: number, nHeads: number, D: number, inverse: boolean): Promise<void> {
    // in place on x
    return this.run('rope', [x], [cos, sin], (o, i) => this.host.rope(o[0]!, i[0]!, i[1]!, positions, T, nHeads, D, inverse));
  }
  attentionForward(out: SimBuf, lse: SimBuf, q: SimBuf, k: SimBuf, v: SimBuf, B: number, S: number, H: number, KV: number, D: number,
    opts?: AttentionOptions): Promise<void> {
    return this.run('attentionForward', [out, lse], [q, k, v], (o, i) => this.host.attentionForward(o[0]!, o[1]!, i[0]!, i[1]!, i[2]!, B, S, H, KV, D, opts));
  }
  attentionBackward(dq: SimBuf, dk: SimBuf, dv: SimBuf, dout: SimBuf, q: SimBuf, k: SimBuf, v: SimBuf, out: SimBuf, lse: SimBuf,
    B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    return this.run('attentionBackward', [dq, dk, dv], [dout, q, k, v, out, lse],
      (o, i) => this.host.attentionBackward(o[0]!, o[1]!, o[2]!, i[0]!, i[1]!, i[2]!, i[3]!, i[4]!, i[5]!, B, S, H, KV, D, opts));
  }
  gegluForward(out: SimBuf, gate: SimBuf, up: SimBuf, n: number): Promise<void> {
    return this.run('gegluForward', [out], [gate, up], (o, i) => this.host.gegluForward(o[0]!, i[0]!, i[1]!, n));
  }
  gegluBackward(dgate: SimBuf, dup: SimBuf, dout: SimBuf, gate: SimBuf, up: SimBuf, n: number): Promise<void> {
    return this.run('gegluBackward', [dgate, dup], [dout, gate, up], (o, i) => this.host.gegluBackward(o[0]!, o[1]!, i[0]!, i[1]!, i[2]!, n));
  }
  /** in place when y is x (the only aliasing the op allows) */
  softcapForward(y: SimBuf, x: SimBuf, cap: number, n: number): Promise<void> {
    if (y === x) return this.run('softcapForward', [y], [], (o) => this.host.softcapForward(o[0]!, o[0]!, cap, n));
    return this.run('softcapForward', [y], [x], (o, i) => this.host.softcapForward(o[0]!, i[0]!, cap, n));
  }
  /** in place when dx is x or dy */
  softcapBackward(dx: SimBuf, dy: SimBuf, x: SimBuf, cap: number, n: number): Promise<void> {
    if (dx === x) return this.run('softcapBackward', [dx], [dy], (o, i) => this.host.softcapBackward(o[0]!, i[0]!, o[0]!, cap, n));
    if (dx === dy) return this.run('softcapBackward', [dx], [x], (o, i) => this.host.softcapBackward(o[0]!, o[0]!, i[0]!, cap, n));
    return this.run('softcapBackward', [dx], [dy, x], (o, i) => this.host.softcapBackward(o[0]!, i[0]!, i[1]!, cap, n));
  }
  swigluForward(out: SimBuf, gate: SimBuf, up: SimBuf, n: number): Promise<void> {
    return this.run('swigluForward', [out], [gate, up], (o, i) => this.host.swigluForward(o[0]!, i[0]!, i[1]!, n));
  }
  swigluBackward(dgate: SimBuf, dup: SimBuf, dout: SimBuf, gate: SimBuf, up: SimBuf, n: number): Promise<void> {
    return this.run('swigluBackward', [dgate, dup], [dout, gate, up], (o, i) => this.host.swigluBackward(o[0]!, o[1]!, i[0]!, i[1]!, i[2]!, n));
  }
  embeddingForward(out: SimBuf, ids: Int32Array, table: SimBuf, T: number, C: number, V: number): Promise<void> {
    return this.run('embeddingForward', [out], [table], (o, i) => this.host.embeddingForward(o[0]!, ids, i[0]!, T, C, V));
  }
  crossEntropyChunkForward(logits: SimBuf, labels: Int32Array, v0: number, T: number, Vc: number, m: SimBuf, s: SimBuf, picked: SimBuf): Promise<void> {
    return this.run('crossEntropyChunkForward', [m, s, picked], [logits], (o, i) => this.host.crossEntropyChunkForward(i[0]!, labels, v0, T, Vc, o[0]!, o[1]!, o[2]!));
  }
  crossEntropyChunkBackward(logits: SimBuf, labels: Int32Array, v0: number, T: number, Vc: number, lse: SimBuf, scale: SimBuf): Promise<void> {
    // in place on logits
    return this.run('crossEntropyChunkBackward', [logits], [lse, scale], (o, i) => this.host.crossEntropyChunkBackward(o[0]!, labels, v0, T, Vc, i[0]!, i[1]!));
  }
  add(y: SimBuf, x: SimBuf, n: number): Promise<void> {
    return this.run('add', [y], [x], (o, i) => this.host.add(o[0]!, i[0]!, n));
  }
  addBias(y: SimBuf, bias: SimBuf, T: number, N: number): Promise<void> {
    return this.run('addBias', [y], [bias], (o, i) => this.host.addBias(o[0]!, i[0]!, T, N));
  }
  maskScale(out: SimBuf, x: SimBuf, mask: Uint8Array, scale: number, n: number, accumulate: boolean): Promise<void> {
    return this.run('maskScale', [out], [x], (o, i) => this.host.maskScale(o[0]!, i[0]!, mask, scale, n, accumulate));
  }
}

/** host backend `be` presented as a device backend whose tensors() is a SimDevice */
export function simDeviceBackend(be: Backend): { backend: Backend; sim: SimDevice } {
  const sim = new SimDevice(be);
  const backend = new Proxy(be, {
    get(target, prop) {
      if (prop === 'tensors') return () => sim as TensorBackend<unknown>;
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
  return { backend, sim };
}
