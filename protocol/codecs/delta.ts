// Delta codec against cached activations (AQ-SGD, arXiv 2206.01299): a [T, C] boundary tensor whose
// rows (token positions) the sender and the receiver both have a reference for (the last
// *reconstructed* value of the same sample's same position, protocol/codecs/delta-cache.ts) travels as
// the quantized difference to it, or as nothing at all when the difference is small; a position
// without a reference travels in a stateless blockwise codec. Sender and receiver reconstruct with the
// same function on the same bytes, so their next references stay bit-identical.
//
// Layout (little-endian):
//   8 bytes   digest of the references the encoder used (DeltaCache.digestOf); all zero = no reference
//             used (every position FULL): a receiver with another digest refuses the tensor (no silent
//             mismatch), a cold one accepts an all-zero digest whatever it holds
//   ceil(T/4) modes, 2 bits per position (position 4j in bits 7..6, as int2): 0 SAME (x' = ref),
//             1 DELTA (x' = ref + blockwise(delta codec) of x − ref), 2 FULL (x' = blockwise(cold codec)
//             of x), 3 is refused; unused trailing bits zero
//   then per position in order: FULL blockByteLength(cold, C) bytes, DELTA blockByteLength(delta, C)
//             bytes, SAME none.
// The encoder picks SAME when rms(x − ref) ≤ tau · rms(ref): the residual is not lost, it stays in the
// next visit's difference (the reference is the reconstruction, not x), which is AQ-SGD's error feedback.
import { TensorError } from '../errors.ts';
import { blockByteLength, decodeBlockwise, encodeBlockwise } from './blockwise.ts';
import type { BlockCodec } from './blockwise.ts';

export interface DeltaParams {
  /** stateless codec of a position without a reference (the first visit) */
  cold: BlockCodec;
  /** codec of the difference to the reference */
  delta: BlockCodec;
  /** relative rms of the difference below which a position is not sent (SAME) */
  tau: number;
  /** elements per scale of the difference's codec (the cold codec keeps the wire's 64) */
  block: number;
}

export const DIGEST_BYTES = 8;
const SAME = 0, DELTA = 1, FULL = 2;

/** The per-position references: refs[t] is the C-vector of position t, or undefined (cold). */
export type DeltaRefs = ReadonlyArray<Float32Array | undefined>;

function rms(x: Float32Array): number {
  let s = 0;
  for (let i = 0; i < x.length; i++) s += x[i]! * x[i]!;
  return Math.sqrt(s / Math.max(1, x.length));
}

/** Byte length of a delta-coded tensor with these modes counts. */
export function deltaByteLength(p: DeltaParams, C: number, T: number, counts: { delta: number; full: number }): number {
  return DIGEST_BYTES + Math.ceil(T / 4) + counts.full * blockByteLength(p.cold, C) + counts.delta * blockByteLength(p.delta, C, p.block);
}

/** Encode finite x [T, C]; `digest` names the references (zero bytes when refs are all undefined). */
export function encodeDelta(p: DeltaParams, x: Float32Array, T: number, C: number, refs: DeltaRefs, digest: Uint8Array): Uint8Array {
  if (x.length !== T * C) throw new TensorError(`delta codec: data has ${x.length} elements, [${T}, ${C}] needs ${T * C}`);
  if (digest.length !== DIGEST_BYTES) throw new TensorError(`delta codec: digest must be ${DIGEST_BYTES} bytes`);
  const modes = new Uint8Array(Math.ceil(T / 4));
  const parts: Uint8Array[] = [];
  const d = new Float32Array(C);
  let any = false;
  for (let t = 0; t < T; t++) {
    const row = x.subarray(t * C, (t + 1) * C);
    const ref = refs[t];
    let mode = FULL;
    if (ref !== undefined) {
      for (let i = 0; i < C; i++) d[i] = row[i]! - ref[i]!;
      const rd = rms(d), rr = rms(ref);
      mode = rd <= p.tau * rr ? SAME : DELTA;
      // a difference as large as the value itself is cheaper and as exact sent whole
      if (mode === DELTA && rd > rr && blockByteLength(p.cold, C) <= blockByteLength(p.delta, C, p.block)) mode = FULL;
      any = true;
    }
    modes[t >> 2]! |= mode << (6 - 2 * (t & 3));
    if (mode === FULL) parts.push(encodeBlockwise(p.cold, row));
    else if (mode === DELTA) parts.push(encodeBlockwise(p.delta, d, p.block));
  }
  const head = any ? digest : new Uint8Array(DIGEST_BYTES);
  const out = new Uint8Array(DIGEST_BYTES + modes.length + parts.reduce((a, b) => a + b.length, 0));
  out.set(head, 0);
  out.set(modes, DIGEST_BYTES);
  let o = DIGEST_BYTES + modes.length;
  for (const part of parts) { out.set(part, o); o += part.length; }
  return out;
}

/** The digest the bytes carry (all zero: no reference used). */
export function deltaDigest(bytes: Uint8Array): Uint8Array {
  return bytes.subarray(0, DIGEST_BYTES);
}

export function usesReferences(bytes: Uint8Array): boolean {
  return bytes.length >= DIGEST_BYTES && bytes.subarray(0, DIGEST_BYTES).some((b) => b !== 0);
}

/** Decode [T, C] against the receiver's references and their digest; any inconsistency is a TensorError. */
export function decodeDelta(p: DeltaParams, bytes: Uint8Array, T: number, C: number, refs: DeltaRefs, digest: Uint8Array, what: string): Float32Array {
  const ml = Math.ceil(T / 4);
  if (bytes.length < DIGEST_BYTES + ml) throw new TensorError(`${what}: delta codec needs at least ${DIGEST_BYTES + ml} bytes for ${T} positions, got ${bytes.length}`);
  const warm = usesReferences(bytes);
  if (warm && !bytes.subarray(0, DIGEST_BYTES).every((b, i) => b === digest[i])) {
    throw new TensorError(`${what}: delta codec reference mismatch (sender's digest ${hex(bytes.subarray(0, DIGEST_BYTES))}, receiver's ${hex(digest)}): the receiver lacks the sender's cached activations`);
  }
  const modes = bytes.subarray(DIGEST_BYTES, DIGEST_BYTES + ml);
  if (T % 4 !== 0 && (modes[ml - 1]! & ((1 << (8 - 2 * (T % 4))) - 1)) !== 0) throw new TensorError(`${what}: delta codec mode padding bits are not zero`);
  const out = new Float32Array(T * C);
  const fl = blockByteLength(p.cold, C), dl = blockByteLength(p.delta, C, p.block);
  let o = DIGEST_BYTES + ml;
  for (let t = 0; t < T; t++) {
    const mode = (modes[t >> 2]! >> (6 - 2 * (t & 3))) & 3;
    if (mode === 3) throw new TensorError(`${what}: delta codec mode 3 at position ${t} is not defined`);
    if (mode === FULL) {
      if (o + fl > bytes.length) throw new TensorError(`${what}: delta codec bytes end inside position ${t}`);
      out.set(decodeBlockwise(p.cold, bytes.subarray(o, o + fl), C, `${what}, position ${t}`), t * C);
      o += fl;
      continue;
    }
    const ref = refs[t];
    if (!warm || ref === undefined || ref.length !== C) throw new TensorError(`${what}: delta codec position ${t} is coded against a reference the receiver does not have`);
    if (mode === SAME) { out.set(ref, t * C); continue; }
    if (o + dl > bytes.length) throw new TensorError(`${what}: delta codec bytes end inside position ${t}`);
    const dd = decodeBlockwise(p.delta, bytes.subarray(o, o + dl), C, `${what}, position ${t}`, p.block);
    for (let i = 0; i < C; i++) out[t * C + i] = ref[i]! + dd[i]!;
    o += dl;
  }
  if (o !== bytes.length) throw new TensorError(`${what}: delta codec has ${bytes.length - o} bytes after the last position`);
  for (let i = 0; i < out.length; i++) if (!Number.isFinite(out[i]!)) throw new TensorError(`${what}: non-finite value at element ${i}`);
  return out;
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString('hex');
}

/** A delta wire codec: its parameters for activations (forward) and activation gradients (backward). */
export interface DeltaSpec {
  act: DeltaParams;
  grad: DeltaParams;
}

const BLOCK_NAMES: readonly string[] = ['int8', 'int4', 'nf4', 'int2', 'int1'];

function parseParams(s: string, what: string): DeltaParams {
  const [cold, delta, tau, block, extra] = s.split(':');
  if (extra !== undefined || cold === undefined || delta === undefined || tau === undefined) throw new TensorError(`${what}: expected cold:delta:tau[:block], got "${s}"`);
  const bl = block === undefined ? 64 : Number(block);
  if (!Number.isInteger(bl) || bl < 1 || bl > 1 << 16) throw new TensorError(`${what}: block must be an integer in [1, 65536], got "${block}"`);
  if (!BLOCK_NAMES.includes(cold) || !BLOCK_NAMES.includes(delta)) throw new TensorError(`${what}: codecs must be one of ${BLOCK_NAMES.join(', ')}, got "${s}"`);
  const t = Number(tau);
  if (!(t >= 0 && t < 10)) throw new TensorError(`${what}: tau must be a number in [0, 10), got "${tau}"`);
  return { cold: cold as BlockCodec, delta: delta as BlockCodec, tau: t, block: bl };
}

/** "aq:COLD:DELTA:TAU" (both directions) or "aq:COLD:DELTA:TAU/COLD:DELTA:TAU" (activations / gradients). */
export function parseDeltaSpec(s: string): DeltaSpec {
  if (!s.startsWith('aq:')) throw new TensorError(`delta codec spec must start with "aq:", got "${s}"`);
  const [a, g, extra] = s.slice(3).split('/');
  if (extra !== undefined) throw new TensorError(`delta codec spec "${s}" has more than two parts`);
  const act = parseParams(a!, `delta codec spec "${s}"`);
  return { act, grad: g === undefined ? act : parseParams(g, `delta codec spec "${s}"`) };
}

/** The delta codecs a run may pick with --wire-dtype (docs/benchmarks.md, "Wire codecs"): cold codec, delta codec
 *  and skip threshold for activations / activation gradients. */
export const DELTA_PRESETS = {
  // int4 first visits, int4 differences, activations skipped within 30%, gradients within 10%
  aq4: 'aq:int4:int4:0.3/int4:int4:0.1',
  // int2 first visits and differences, both directions skipped within 60%
  aq2: 'aq:int2:int2:0.6',
} as const;
export type DeltaCodecName = keyof typeof DELTA_PRESETS;
export const DELTA_SPECS: Readonly<Record<DeltaCodecName, DeltaSpec>> = Object.fromEntries(
  Object.entries(DELTA_PRESETS).map(([k, v]) => [k, parseDeltaSpec(v)]),
) as Record<DeltaCodecName, DeltaSpec>;
// without references a delta codec is its cold codec whatever the direction (encodeTensor, the referee)
for (const [k, s] of Object.entries(DELTA_SPECS)) if (s.act.cold !== s.grad.cold) throw new Error(`delta codec ${k}: the cold codec must be the same both ways`);

/** Bytes of a cold (stateless, every position FULL) delta-coded [T, C] tensor. */
export function coldDeltaByteLength(p: DeltaParams, T: number, C: number): number {
  return deltaByteLength(p, C, T, { delta: 0, full: T });
}
