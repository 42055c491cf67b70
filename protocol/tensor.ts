// Tensor wire format {dtype, shape, codec, bytes}: codecs f32 (exact), bf16, the blockwise absmax family
// int8 / int4 / nf4 / int2 (protocol/codecs/blockwise.ts) and low-rank factors lowrank8 / lowrank32
// (protocol/codecs/lowrank.ts), and the delta codecs aq4 / aq2 (protocol/codecs/delta.ts), stateful on a
// stage-to-stage hop only (protocol/hop.ts): here, with no references, they code every position cold.
//
// Byte layouts (little-endian; the host is assumed little-endian like every platform Node ships for):
//   f32  : n x float32
//   bf16 : n x uint16, the top half of the float32 rounded to nearest even
//   int8, int4, nf4, int2 : ceil(n/64) x float32 absmax, then the codes (see codecs/blockwise.ts)
//   lowrankK : int8 factors U [rows, k] and V [cols, k], k = min(K, rows, cols) (see codecs/lowrank.ts)
//   aq4, aq2 : 8-byte reference digest, 2-bit mode per row, then per row its codes (see codecs/delta.ts)
//   i32  : n x int32 (token ids and labels; dtype i32 only)
// Error bounds: bf16 |x - x'| <= 2^-8 |x| (relative, half an ulp of an 8-bit mantissa);
// int8 |x - x'| <= absmax_block / 254 (half a quantization step), int4 absmax/14, nf4 0.1519 absmax,
// int2 absmax/3; lowrankK: the best rank-K error plus the factors' int8 rounding.
import { INT8_BLOCK, MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK } from './constants.ts';
import { BLOCK, blockByteLength, decodeBlockwise, encodeBlockwise } from './codecs/blockwise.ts';
import type { BlockCodec } from './codecs/blockwise.ts';
import { decodeLowRank, encodeLowRank, lowRankByteLength } from './codecs/lowrank.ts';
import { coldDeltaByteLength, decodeDelta, DELTA_SPECS, DIGEST_BYTES, encodeDelta } from './codecs/delta.ts';
import type { DeltaCodecName } from './codecs/delta.ts';
import { TensorError } from './errors.ts';
import { arr, bytes, int, obj, oneOf } from './schema.ts';
import type { Validator } from './schema.ts';

/** The codecs a float tensor may use on the wire (the run's --wire-dtype picks one), cheapest last. */
export const FLOAT_CODECS = ['f32', 'bf16', 'int8', 'int4', 'nf4', 'int2', 'lowrank32', 'lowrank8', 'aq4', 'aq2'] as const;
export type FloatCodec = typeof FLOAT_CODECS[number];
export function isFloatCodec(s: string): s is FloatCodec {
  return (FLOAT_CODECS as readonly string[]).includes(s);
}
export const TENSOR_CODECS = [...FLOAT_CODECS, 'i32'] as const;
export type TensorCodec = typeof TENSOR_CODECS[number];
export type WireDtype = 'f32' | 'i32';

const BLOCK_CODECS: readonly string[] = ['int8', 'int4', 'nf4', 'int2'] satisfies BlockCodec[];
const LOW_RANK: Readonly<Record<string, number>> = { lowrank8: 8, lowrank32: 32 };
/** The delta codecs (protocol/codecs/delta.ts): stateful on a hop (protocol/hop.ts), stateless (every
 *  position in the cold codec) everywhere else. The activation parameters code a tensor here. */
export function isDeltaCodec(c: string): c is DeltaCodecName {
  return Object.hasOwn(DELTA_SPECS, c);
}
const rowsCols = (dims: readonly number[]): [number, number] => {
  const C = dims.length === 0 ? 1 : dims[dims.length - 1]!;
  return [C === 0 ? 0 : dims.reduce((a, b) => a * b, 1) / C, C];
};
if (BLOCK !== INT8_BLOCK) throw new Error(`protocol/codecs/blockwise.ts BLOCK ${BLOCK} != INT8_BLOCK ${INT8_BLOCK}`);

export interface WireTensor {
  dtype: WireDtype;
  shape: number[];
  codec: TensorCodec;
  bytes: Uint8Array;
}

const MAX_TENSOR_BYTES = MAX_TENSOR_ELEMENTS * 4 + Math.ceil(MAX_TENSOR_ELEMENTS / INT8_BLOCK) * 4;

/** Structural validator for a WireTensor; contents are checked by decodeTensor. */
export const wireTensor: Validator<WireTensor> = obj({
  dtype: oneOf(['f32', 'i32'] as const),
  shape: arr(int(0, MAX_TENSOR_ELEMENTS), MAX_TENSOR_RANK),
  codec: oneOf(TENSOR_CODECS),
  bytes: bytes(MAX_TENSOR_BYTES),
});

function numel(shape: number[], what: string): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new TensorError(`${what}: bad dimension ${d} in shape [${shape}]`);
    n *= d;
  }
  if (n > MAX_TENSOR_ELEMENTS) throw new TensorError(`${what}: ${n} elements exceeds the cap ${MAX_TENSOR_ELEMENTS}`);
  return n;
}

/** Bytes a tensor of this shape takes in this codec (a number: a flat tensor of that many elements). */
export function expectedByteLength(codec: TensorCodec, shape: readonly number[] | number): number {
  const dims = typeof shape === 'number' ? [shape] : shape;
  const n = dims.reduce((a, b) => a * b, 1);
  if (codec === 'f32' || codec === 'i32') return 4 * n;
  if (codec === 'bf16') return 2 * n;
  if (BLOCK_CODECS.includes(codec)) return blockByteLength(codec as BlockCodec, n);
  if (isDeltaCodec(codec)) { const [T, C] = rowsCols(dims); return coldDeltaByteLength(DELTA_SPECS[codec].act, T, C); }
  return lowRankByteLength(dims, LOW_RANK[codec]!);
}

function f32ToBf16Bits(u: Uint32Array, i: number): number {
  const x = u[i]!;
  // round to nearest even on the dropped 16 bits; inputs are finite (checked), so no NaN special case
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Encode a float32 or int32 tensor. Float data must be finite (a NaN never leaves this peer). */
export function encodeTensor(data: Float32Array | Int32Array, shape: number[], codec: TensorCodec, what = 'tensor'): WireTensor {
  const n = numel(shape, what);
  if (data.length !== n) throw new TensorError(`${what}: data has ${data.length} elements, shape [${shape}] needs ${n}`);
  if (data instanceof Int32Array) {
    if (codec !== 'i32') throw new TensorError(`${what}: int32 data must use codec i32, got ${codec}`);
    return { dtype: 'i32', shape: [...shape], codec, bytes: new Uint8Array(data.slice().buffer) };
  }
  if (codec === 'i32') throw new TensorError(`${what}: float data cannot use codec i32`);
  for (let i = 0; i < n; i++) {
    if (!Number.isFinite(data[i]!)) throw new TensorError(`${what}: non-finite value ${data[i]} at element ${i}`);
  }
  if (codec === 'f32') return { dtype: 'f32', shape: [...shape], codec, bytes: new Uint8Array(data.slice().buffer) };
  if (codec === 'bf16') {
    const u = new Uint32Array(data.buffer, data.byteOffset, n);
    const out = new Uint16Array(n);
    for (let i = 0; i < n; i++) out[i] = f32ToBf16Bits(u, i);
    return { dtype: 'f32', shape: [...shape], codec, bytes: new Uint8Array(out.buffer) };
  }
  if (isDeltaCodec(codec)) {
    const [T, C] = rowsCols(shape);
    return { dtype: 'f32', shape: [...shape], codec, bytes: encodeDelta(DELTA_SPECS[codec].act, data, T, C, [], new Uint8Array(DIGEST_BYTES)) };
  }
  const bytes = BLOCK_CODECS.includes(codec) ? encodeBlockwise(codec as BlockCodec, data) : encodeLowRank(data, shape, LOW_RANK[codec]!, what);
  return { dtype: 'f32', shape: [...shape], codec, bytes };
}

/** Copy bytes into a fresh, aligned buffer (msgpack hands us views at arbitrary offsets). */
function aligned(b: Uint8Array): ArrayBuffer {
  const out = new ArrayBuffer(b.length);
  new Uint8Array(out).set(b);
  return out;
}

export interface DecodeExpect {
  dtype?: WireDtype;
  /** exact shape; -1 entries match any size */
  shape?: number[];
}

/** Decode and check a WireTensor: codec/dtype pairing, byte length, expected shape, finite values. */
export function decodeTensor(t: WireTensor, what: string, expect: DecodeExpect = {}): { shape: number[]; data: Float32Array | Int32Array } {
  const n = numel(t.shape, what);
  if (expect.dtype !== undefined && t.dtype !== expect.dtype) throw new TensorError(`${what}: expected dtype ${expect.dtype}, got ${t.dtype}`);
  if (expect.shape !== undefined) {
    const es = expect.shape;
    if (es.length !== t.shape.length || es.some((d, i) => d >= 0 && d !== t.shape[i])) {
      throw new TensorError(`${what}: expected shape [${es}], got [${t.shape}]`);
    }
  }
  if ((t.dtype === 'i32') !== (t.codec === 'i32')) throw new TensorError(`${what}: dtype ${t.dtype} cannot use codec ${t.codec}`);
  const want = expectedByteLength(t.codec, t.shape);
  if (isDeltaCodec(t.codec)) {
    // a warm tensor is shorter than a cold one; without references only a cold one decodes
    if (t.bytes.length > want) throw new TensorError(`${what}: codec ${t.codec} with shape [${t.shape}] takes at most ${want} bytes, got ${t.bytes.length}`);
    const [T, C] = rowsCols(t.shape);
    return { shape: [...t.shape], data: decodeDelta(DELTA_SPECS[t.codec].act, t.bytes, T, C, [], new Uint8Array(DIGEST_BYTES), what) };
  }
  if (t.bytes.length !== want) throw new TensorError(`${what}: codec ${t.codec} with shape [${t.shape}] needs ${want} bytes, got ${t.bytes.length}`);
  const shape = [...t.shape];
  if (t.codec === 'i32') return { shape, data: new Int32Array(aligned(t.bytes)) };
  let out: Float32Array;
  if (t.codec === 'f32') {
    out = new Float32Array(aligned(t.bytes));
  } else if (t.codec === 'bf16') {
    const h = new Uint16Array(aligned(t.bytes));
    const u = new Uint32Array(n);
    for (let i = 0; i < n; i++) u[i] = h[i]! << 16;
    out = new Float32Array(u.buffer);
  } else if (BLOCK_CODECS.includes(t.codec)) {
    // finite by construction: finite absmax times a level in [-1, 1]
    return { shape, data: decodeBlockwise(t.codec as BlockCodec, t.bytes, n, what) };
  } else {
    out = decodeLowRank(t.bytes, t.shape, LOW_RANK[t.codec]!, what);
  }
  for (let i = 0; i < n; i++) {
    if (!Number.isFinite(out[i]!)) throw new TensorError(`${what}: non-finite value ${out[i]} at element ${i}`);
  }
  return { shape, data: out };
}

/** Decode a float tensor (any float codec), checking the expected shape. */
export function decodeFloat(t: WireTensor, what: string, shape?: number[]): Float32Array {
  return decodeTensor(t, what, { dtype: 'f32', shape }).data as Float32Array;
}

/** Decode an int32 tensor, checking the expected shape. */
export function decodeInt(t: WireTensor, what: string, shape?: number[]): Int32Array {
  return decodeTensor(t, what, { dtype: 'i32', shape }).data as Int32Array;
}
