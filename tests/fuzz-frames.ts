// Protocol fuzzing helpers: a seeded RNG, mutations of valid request objects and of their encoded
// frames (bit flips, truncation, bad length prefixes, missing/unknown/swapped fields, wrong types,
// tensors whose dtype, shape, bytes or values are wrong, stale ids, huge arrays, deep nesting), and a
// raw sender that puts any bytes on a real libp2p stream and classifies what comes back.
import { Packr } from 'msgpackr';
import type { Stream } from '@libp2p/interface';
import { MAX_FRAME_BYTES, PROTOCOLS } from '../protocol/constants.ts';
import { FrameReader } from '../protocol/frame.ts';
import type { DialTarget, ProtoName, SwarmNode } from '../protocol/net.ts';

/** mulberry32: small, seedable, good enough to drive mutations reproducibly */
export class Rng {
  private s: number;
  constructor(seed: number) { this.s = seed >>> 0; }
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number { return Math.floor(this.next() * n); }
  pick<T>(xs: readonly T[]): T { return xs[this.int(xs.length)]!; }
  bytes(n: number): Uint8Array { const b = new Uint8Array(n); for (let i = 0; i < n; i++) b[i] = this.int(256); return b; }
}

// plain msgpack, exactly as protocol/frame.ts writes it, but without its size check (we send oversize on purpose)
const packr = new Packr({ useRecords: false, moreTypes: false, structuredClone: false });

export function frameOf(body: Uint8Array, announced = body.length): Uint8Array {
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, announced >>> 0, false);
  out.set(body, 4);
  return out;
}
export function pack(v: unknown): Uint8Array { return packr.pack(v); }

/** A mutated request: the bytes to put on the stream, and what was done to them. */
export interface Mutant { kind: string; bytes: Uint8Array }

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof Uint8Array);
const isTensor = (v: unknown): v is Obj => isObj(v) && 'dtype' in v && 'shape' in v && 'codec' in v && 'bytes' in v;

/** Deep copy of a msgpack-able value (bytes copied too, so mutations never touch the template). */
function clone<T>(v: T): T {
  if (v instanceof Uint8Array) return v.slice() as T;
  if (Array.isArray(v)) return v.map(clone) as T;
  if (isObj(v)) { const o: Obj = {}; for (const [k, x] of Object.entries(v)) o[k] = clone(x); return o as T; }
  return v;
}

/** Every (container, key) slot of a value, depth first. */
function slots(v: unknown, out: Array<{ parent: Obj | unknown[]; key: string | number }> = []): Array<{ parent: Obj | unknown[]; key: string | number }> {
  if (Array.isArray(v)) v.forEach((x, i) => { out.push({ parent: v, key: i }); slots(x, out); });
  else if (isObj(v)) for (const [k, x] of Object.entries(v)) { out.push({ parent: v, key: k }); slots(x, out); }
  return out;
}
function objects(v: unknown, out: Obj[] = []): Obj[] {
  if (Array.isArray(v)) v.forEach((x) => objects(x, out));
  else if (isObj(v)) { out.push(v); for (const x of Object.values(v)) objects(x, out); }
  return out;
}
function tensors(v: unknown): Obj[] { return objects(v).filter(isTensor); }
function get(p: Obj | unknown[], k: string | number): unknown { return (p as Record<string | number, unknown>)[k]; }
function set(p: Obj | unknown[], k: string | number, x: unknown): void { (p as Record<string | number, unknown>)[k] = x; }

/** Encode `v` with the value at (parent, key) replaced by raw msgpack bytes (spliced in after encoding,
 *  so huge or deeply nested values cost no JS encoding). */
function packWithRaw(v: unknown, parent: Obj | unknown[], key: string | number, raw: Uint8Array): Uint8Array {
  const marker = 'RAW-VALUE-MARKER-7f3a';
  set(parent, key, marker);
  const enc = pack(v);
  const mk = new Uint8Array([0xa0 | marker.length, ...new TextEncoder().encode(marker)]);
  const at = indexOf(enc, mk);
  if (at < 0) throw new Error('fuzz: marker not found in the encoded frame');
  const out = new Uint8Array(enc.length - mk.length + raw.length);
  out.set(enc.subarray(0, at), 0);
  out.set(raw, at);
  out.set(enc.subarray(at + mk.length), at + raw.length);
  return out;
}
function header32(tag: number, n: number): Uint8Array {
  const h = new Uint8Array(5);
  h[0] = tag;
  new DataView(h.buffer).setUint32(1, n, false);
  return h;
}
function cat(a: Uint8Array, b: Uint8Array): Uint8Array { const o = new Uint8Array(a.length + b.length); o.set(a); o.set(b, a.length); return o; }
/** msgpack array32 of 100,001 small ints (over MAX_ARRAY_LENGTH), a 5 MB str32 (over every string bound), 3 MB bin32 */
const HUGE_ARRAY = cat(header32(0xdd, 100_001), new Uint8Array(100_001).fill(0x01));
const HUGE_STRING = cat(header32(0xdb, 5_000_000), new Uint8Array(5_000_000).fill(0x53));
const HUGE_BYTES = cat(header32(0xc6, 3_000_000), new Uint8Array(3_000_000));

function indexOf(hay: Uint8Array, needle: Uint8Array): number {
  outer: for (let i = 0; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}
/** msgpack of `depth` nested one-element arrays built byte by byte (a JS encoder would overflow its stack). */
function deepNestBytes(depth: number): Uint8Array {
  const b = new Uint8Array(depth + 1);
  b.fill(0x91, 0, depth); // fixarray of 1
  b[depth] = 0xc0; // nil
  return b;
}

function wrongValue(rng: Rng, old: unknown): unknown {
  const choices: unknown[] = [
    null, true, false, 0, -1, 1.5, NaN, Infinity, -Infinity, 2 ** 31, 2 ** 53 + 2, -(2 ** 40), 1e308,
    '', 'x', 'A'.repeat(5000), '../../etc/passwd', '__proto__', new Uint8Array(0), new Uint8Array(16),
    [], [1, 2, 3], {}, { toString: 1 }, { hasOwnProperty: 'x' },
  ];
  if (typeof old === 'number') choices.push(old + 1, old - 1, -old, old * 1e6, String(old));
  if (typeof old === 'string') choices.push(old.slice(1), old + '!', old.toUpperCase(), Number(old));
  if (typeof old === 'boolean') choices.push(!old, Number(old), String(old));
  if (Array.isArray(old)) choices.push(old.slice(1), [...old, ...old], old[0]);
  return rng.pick(choices);
}

/** A tensor made wrong in one way: dtype/codec pairing, shape vs bytes, non-finite values, int8 codes. */
function breakTensor(rng: Rng, t: Obj): string {
  const shape = t.shape as number[];
  const bytes = t.bytes as Uint8Array;
  switch (rng.int(10)) {
    case 0: t.dtype = t.dtype === 'i32' ? 'f32' : 'i32'; return 'tensor-dtype';
    case 1: t.codec = rng.pick(['f32', 'bf16', 'int8', 'i32', 'f16', 'f64']); return 'tensor-codec';
    case 2: t.shape = shape.map((d) => d + 1 + rng.int(3)); return 'tensor-shape';
    case 3: t.shape = [...shape, 1 + rng.int(4)].slice(0, 1 + rng.int(6)); return 'tensor-rank';
    case 4: t.bytes = bytes.subarray(0, Math.max(0, bytes.length - 1 - rng.int(8))); return 'tensor-bytes';
    case 5: t.shape = [2 ** 20, 2 ** 20]; return 'tensor-huge-shape';
    case 6: t.shape = [-1, ...shape.slice(1)]; return 'tensor-negative-dim';
    case 7: {
      // NaN or ±Inf written into an f32 tensor's bytes (or the absmax of an int8 block)
      if (bytes.length >= 4) {
        const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
        const at = t.codec === 'int8' ? 0 : 4 * rng.int(Math.floor(bytes.length / 4));
        dv.setFloat32(at, rng.pick([NaN, Infinity, -Infinity]), true);
        if (t.codec === 'bf16') dv.setUint16(at, 0x7fc0, true);
      }
      return 'tensor-nonfinite';
    }
    case 8: {
      // int8 code -128, or a negative absmax
      if (t.codec === 'int8' && bytes.length > 4) { bytes[bytes.length - 1] = 0x80; return 'tensor-int8-code'; }
      t.bytes = new Uint8Array(bytes.length + 4 * (1 + rng.int(3))); return 'tensor-bytes-long';
    }
    default: t.bytes = rng.bytes(bytes.length); return 'tensor-random-bytes';
  }
}

/** Fields that name the run, step, micro-batch and attempt: mutated to stale or future values. */
const ID_FIELDS = ['runId', 'step', 'mb', 'attempt', 'stageIndex', 'sha256', 'offset', 'from', 'count'] as const;

/** One mutation of a valid request object (structural), or of its encoded frame (bytes). */
export function mutate(rng: Rng, valid: unknown): Mutant {
  const v = clone(valid);
  const body = pack(v);
  const r = rng.int(22);
  switch (r) {
    case 0: return { kind: 'valid', bytes: frameOf(body) };
    case 1: {
      // flip 1-8 bits of the body (prefix intact): gets past framing, often past msgpack
      const b = body.slice();
      const n = 1 + rng.int(8);
      for (let i = 0; i < n; i++) b[rng.int(b.length)]! ^= 1 << rng.int(8);
      return { kind: 'bit-flip', bytes: frameOf(b) };
    }
    case 2: {
      // overwrite a few bytes with random ones
      const b = body.slice();
      const n = 1 + rng.int(4);
      for (let i = 0; i < n; i++) b[rng.int(b.length)] = rng.int(256);
      return { kind: 'byte-smash', bytes: frameOf(b) };
    }
    case 3: {
      // truncated: the prefix announces the whole body, the stream ends early
      const cut = rng.int(body.length);
      return { kind: 'truncated', bytes: frameOf(body).subarray(0, 4 + cut) };
    }
    case 4: return { kind: 'short-prefix', bytes: rng.bytes(rng.int(4)) };
    case 5: {
      // a body cut short with a prefix that matches the cut: malformed or incomplete msgpack
      const cut = 1 + rng.int(Math.max(1, body.length - 1));
      return { kind: 'cut-body', bytes: frameOf(body.subarray(0, cut)) };
    }
    case 6: return { kind: 'trailing-bytes', bytes: frameOf(new Uint8Array([...body, ...rng.bytes(1 + rng.int(8))])) };
    case 7: return { kind: 'oversize-prefix', bytes: frameOf(rng.bytes(rng.int(64)), MAX_FRAME_BYTES + 1 + rng.int(0xffffffff - MAX_FRAME_BYTES)) };
    case 8: return { kind: 'random-body', bytes: frameOf(rng.bytes(1 + rng.int(256))) };
    case 9: {
      const objs = objects(v).filter((o) => Object.keys(o).length > 0);
      if (objs.length === 0) return { kind: 'not-an-object', bytes: frameOf(pack([v])) };
      const o = rng.pick(objs);
      delete o[rng.pick(Object.keys(o))];
      return { kind: 'missing-field', bytes: frameOf(pack(v)) };
    }
    case 10: {
      const objs = objects(v);
      const o = objs.length > 0 ? rng.pick(objs) : null;
      if (o === null) return { kind: 'not-an-object', bytes: frameOf(pack(7)) };
      // an own property even for "__proto__" (plain assignment would change the prototype instead)
      Object.defineProperty(o, rng.pick(['extra', '__proto__', 'toString', 'x'.repeat(300), 'hasOwnProperty', 'valueOf']), { value: wrongValue(rng, 1), enumerable: true, writable: true, configurable: true });
      return { kind: 'unknown-field', bytes: frameOf(pack(v)) };
    }
    case 11: case 12: {
      const s = slots(v);
      if (s.length === 0) return { kind: 'wrong-type', bytes: frameOf(pack(wrongValue(rng, v))) };
      const { parent, key } = rng.pick(s);
      set(parent, key, wrongValue(rng, get(parent, key)));
      return { kind: 'wrong-type', bytes: frameOf(pack(v)) };
    }
    case 13: {
      // two fields of one object swap their values
      const objs = objects(v).filter((o) => Object.keys(o).length >= 2);
      if (objs.length === 0) return { kind: 'field-swap', bytes: frameOf(pack([v, v])) };
      const o = rng.pick(objs);
      const ks = Object.keys(o);
      const a = rng.pick(ks), b = rng.pick(ks.filter((k) => k !== a));
      [o[a], o[b]] = [o[b], o[a]];
      return { kind: 'field-swap', bytes: frameOf(pack(v)) };
    }
    case 14: case 15: {
      const ts = tensors(v);
      if (ts.length === 0) break;
      return { kind: breakTensor(rng, rng.pick(ts)), bytes: frameOf(pack(v)) };
    }
    case 16: case 17: {
      // stale or foreign run / step / micro-batch / attempt (and other ids and offsets)
      const withIds = objects(v).filter((o) => ID_FIELDS.some((k) => k in o));
      if (withIds.length === 0) break;
      const o = rng.pick(withIds);
      const k = rng.pick(ID_FIELDS.filter((f) => f in o));
      const old = o[k];
      if (typeof old === 'number') o[k] = rng.pick([old - 1, old + 1, old + 1000, 0, 2 ** 31 - 1, old + 2 ** 20]);
      else if (typeof old === 'string') o[k] = k === 'sha256' ? '0'.repeat(64) : rng.pick(['other-run', old + 'x', 'r' + old.slice(1)]);
      return { kind: 'stale-id', bytes: frameOf(pack(v)) };
    }
    case 18: {
      // an array over its bound in place of some field, or as the whole body
      const s = slots(v);
      if (s.length === 0) return { kind: 'huge-array', bytes: frameOf(HUGE_ARRAY) };
      const { parent, key } = rng.pick(s);
      return { kind: 'huge-array', bytes: frameOf(packWithRaw(v, parent, key, HUGE_ARRAY)) };
    }
    case 19: {
      // deep nesting: in place of a field, or as the whole body
      const nest = deepNestBytes(rng.pick([100, 1000, 10_000, 100_000, 1_000_000]));
      const s = slots(v);
      if (s.length === 0 || rng.int(2) === 0) return { kind: 'deep-nesting', bytes: frameOf(nest) };
      const { parent, key } = rng.pick(s);
      return { kind: 'deep-nesting', bytes: frameOf(packWithRaw(v, parent, key, nest)) };
    }
    case 20: {
      if (rng.int(2) === 0) return { kind: 'empty-stream', bytes: new Uint8Array(0) };
      // {constructor: <the valid request>} or {__proto__: …}, encoded by hand (a JS encoder trips on such objects)
      const key = new TextEncoder().encode(rng.pick(['constructor', '__proto__', 'prototype']));
      return { kind: 'evil-key', bytes: frameOf(new Uint8Array([0x81, 0xa0 | key.length, ...key, ...body])) };
    }
    default: {
      // a big string or big bytes in a field (within the frame cap)
      const s = slots(v);
      const big = rng.int(2) === 0 ? HUGE_STRING : HUGE_BYTES;
      if (s.length === 0) return { kind: 'huge-value', bytes: frameOf(big) };
      const { parent, key } = rng.pick(s);
      return { kind: 'huge-value', bytes: frameOf(packWithRaw(v, parent, key, big)) };
    }
  }
  // the template had no tensors / ids: fall back to a bit flip
  const b = body.slice();
  b[rng.int(b.length)]! ^= 1 << rng.int(8);
  return { kind: 'bit-flip', bytes: frameOf(b) };
}

/** What came back for one raw request: an error frame (with its name), a response, or nothing. */
export type Outcome = { kind: 'error'; name: string; message: string } | { kind: 'ok'; value: unknown } | { kind: 'closed'; why: string } | { kind: 'unreachable'; why: string };

/** Open a stream for `proto`, write `bytes` as they are, close the write side and read one frame. */
export async function sendRaw(node: SwarmNode, target: DialTarget, proto: ProtoName, bytes: Uint8Array, timeoutMs = 30_000): Promise<Outcome> {
  const signal = AbortSignal.timeout(timeoutMs);
  let stream: Stream | undefined;
  try {
    try {
      stream = await node.dialProtocol(target, PROTOCOLS[proto], { signal });
    } catch (e) {
      if (signal.aborted) throw e;
      return { kind: 'unreachable', why: (e as Error).message };
    }
    if (bytes.length > 0 && !stream.send(bytes)) await stream.onDrain({ signal });
    await stream.close({ signal });
    const raw = await new FrameReader(stream, MAX_FRAME_BYTES).read();
    if (raw === undefined) return { kind: 'closed', why: 'end of stream without a frame' };
    if (raw !== null && typeof raw === 'object' && 'error' in raw) {
      const e = (raw as { error: { name: string; message: string } }).error;
      return { kind: 'error', name: String(e.name), message: String(e.message) };
    }
    return { kind: 'ok', value: raw };
  } catch (e) {
    if (signal.aborted) throw new Error(`${proto}: no answer within ${timeoutMs} ms (the peer hangs on this frame)`);
    return { kind: 'closed', why: (e as Error).message };
  } finally {
    if (stream !== undefined && stream.status === 'open') stream.abort(new Error('fuzz request done'));
  }
}

/** The typed error names a handler may answer with (protocol/errors.ts). */
export const TYPED_ERRORS = new Set(['FrameTooLargeError', 'DecodeError', 'SchemaError', 'TensorError', 'StaleError', 'AuthError', 'CapacityError', 'IntegrityError', 'TimeoutError', 'SwarmError']);

/** Tally of outcomes per protocol and per (mutation, outcome) pair. */
export class Tally {
  readonly perProto = new Map<string, number>();
  readonly outcomes = new Map<string, number>();
  readonly kinds = new Map<string, number>();
  readonly untyped: string[] = [];
  total = 0;
  unreachable = 0;
  add(proto: string, m: Mutant, o: Outcome): void {
    if (o.kind === 'unreachable') { this.unreachable++; return; } // the target was gone: not a frame it read
    this.total++;
    this.perProto.set(proto, (this.perProto.get(proto) ?? 0) + 1);
    this.kinds.set(m.kind, (this.kinds.get(m.kind) ?? 0) + 1);
    const name = o.kind === 'error' ? o.name : o.kind;
    this.outcomes.set(name, (this.outcomes.get(name) ?? 0) + 1);
    if (o.kind === 'error' && !TYPED_ERRORS.has(o.name) && this.untyped.length < 20) this.untyped.push(`${proto} ${m.kind}: ${o.name}: ${o.message.slice(0, 300)}`);
  }
  report(): string {
    const fmt = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k}=${n}`).join(' ');
    return `${this.total} frames (${this.unreachable} more found the target gone)\n  per protocol: ${fmt(this.perProto)}\n  mutations: ${fmt(this.kinds)}\n  outcomes: ${fmt(this.outcomes)}`;
  }
}

/** What valid requests are made of: the run and step to address, a micro-batch shape, a blob to ask for. */
export interface TemplateContext {
  runId: string;
  step: number;
  stageIndex: number;
  /** hidden size of the model, and the micro-batch shape (batch x seqLen tokens) */
  hidden: number;
  batch: number;
  seqLen: number;
  vocab: number;
  /** a blob the target holds (sha256 hex) */
  sha256: string;
  /** peer ids for routes */
  route: string[];
  /** the shapes of the target stage's LoRA tensors, when known (aggregate apply pages then fit them) */
  paramShapes?: number[][];
}

function f32Tensor(rng: Rng, shape: number[]): Obj {
  const n = shape.reduce((a, b) => a * b, 1);
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = (rng.next() - 0.5) * 0.1;
  return { dtype: 'f32', shape, codec: 'f32', bytes: new Uint8Array(f.buffer) };
}
function i32Tensor(rng: Rng, n: number, vocab: number, ignore = false): Obj {
  const a = new Int32Array(n);
  for (let i = 0; i < n; i++) a[i] = ignore && rng.int(5) === 0 ? -100 : rng.int(vocab);
  return { dtype: 'i32', shape: [n], codec: 'i32', bytes: new Uint8Array(a.buffer) };
}

/** A valid request object for `proto` (valid by schema; whether the target accepts it depends on its state). */
export function validRequest(rng: Rng, proto: ProtoName, c: TemplateContext): unknown {
  const T = c.batch * c.seqLen;
  const mbKey = { runId: c.runId, step: c.step, mb: rng.int(8), attempt: rng.int(3) };
  switch (proto) {
    case 'join': return {
      token: rng.pick([null, 'not-the-token', 'x'.repeat(64)]),
      capabilities: {
        backend: 'cpu', deviceName: 'fuzz', memoryBytes: 2 ** 32, memoryTotalBytes: 2 ** 33, memoryFreeBytes: 2 ** 32,
        hostMemoryBytes: 2 ** 34, cores: 2, gemmGflops: 10, computeCapability: null, memoryBandwidthGBs: null, softwareVersion: '0.1.0',
      },
      listenAddrs: ['/ip4/127.0.0.1/tcp/1'],
      previousRunId: rng.pick([null, c.runId]),
    };
    case 'weights': return { sha256: c.sha256, offset: rng.int(4096), length: 1 + rng.int(65536) };
    case 'status': return {};
    case 'adapter': return rng.int(2) === 0 ? { from: rng.int(16), count: 1 + rng.int(16) } : { runId: c.runId, step: rng.int(c.step + 2), from: rng.int(16), count: 1 + rng.int(16) };
    case 'heartbeat': return { runId: c.runId, step: c.step, sentAtMs: Date.now() };
    case 'finish': return { runId: c.runId, reason: 'fuzz' };
    case 'optimizer': return { runId: c.runId, step: c.step, offset: rng.int(1024), length: 1 + rng.int(4096) };
    case 'microbatch': {
      const S = c.route.length, s = c.stageIndex;
      const req: Obj = { ...mbKey, stageIndex: s, route: c.route, batch: c.batch, seqLen: c.seqLen, dropoutSeed: rng.int(1000), train: rng.int(4) !== 0, jobTimeoutMs: 1000 };
      if (s === 0) req.ids = i32Tensor(rng, T, c.vocab);
      if (s === S - 1 || rng.int(4) === 0) { req.labels = i32Tensor(rng, T, c.vocab, true); req.lossScale = 1 / (1 + rng.int(1000)); }
      if (s + 1 < S) req.nextAddrs = [`/ip4/127.0.0.1/tcp/1/p2p/${c.route[s + 1]}`];
      if (s > 0) req.prevAddrs = [`/ip4/127.0.0.1/tcp/1/p2p/${c.route[s - 1]}`];
      return req;
    }
    case 'commit': return { ...mbKey, commit: rng.int(2) === 0 };
    case 'aggregate': {
      const shapes = c.paramShapes ?? Array.from({ length: 8 }, () => [4, c.hidden]);
      if (rng.int(2) === 0) return { runId: c.runId, step: c.step, phase: 'collect', from: rng.int(shapes.length + 1), count: 1 + rng.int(16) };
      const from = rng.int(2) === 0 ? 0 : rng.int(shapes.length);
      const count = Math.min(shapes.length - from, 1 + rng.int(shapes.length));
      return {
        runId: c.runId, step: c.step, phase: 'apply', from, count,
        grads: shapes.slice(from, from + count).map((sh) => f32Tensor(rng, sh)), lr: 1e-3, last: from + count === shapes.length || rng.int(4) === 0,
      };
    }
  }
}
