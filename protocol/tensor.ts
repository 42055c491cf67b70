// Tensor wire format {dtype, shape, codec, bytes} with codecs f32 (exact), bf16 and blockwise int8.
//
// Byte layouts (little-endian; the host is assumed little-endian like every platform Node ships for):
//   f32  : n x float32
//   bf16 : n x uint16, the top half of the float32 rounded to nearest even
//   int8 : ceil(n/INT8_BLOCK) x float32 absmax, then n x int8 with q = round(x * 127 / absmax)
//   i32  : n x int32 (token ids and labels; dtype i32 only)
// Error bounds: bf16 |x - x'| <= 2^-8 |x| (relative, half an ulp of an 8-bit mantissa);
// int8 |x - x'| <= absmax_block / 254 (half a quantization step).
import { INT8_BLOCK, MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK } from './constants.ts';
import { TensorError } from './errors.ts';
import { arr, bytes, int, obj, oneOf } from './schema.ts';
import type { Validator } from './schema.ts';

export const TENSOR_CODECS = ['f32', 'bf16', 'int8', 'i32'] as const;
export type TensorCodec = typeof TENSOR_CODECS[number];
export type WireDtype = 'f32' | 'i32';
/** The codecs a float tensor may use on the wire (the run's --wire-dtype picks one). */
export type FloatCodec = 'f32' | 'bf16' | 'int8';

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

export function expectedByteLength(codec: TensorCodec, n: number): number {
  switch (codec) {
    case 'f32': case 'i32': return 4 * n;
    case 'bf16': return 2 * n;
    case 'int8': return 4 * Math.ceil(n / INT8_BLOCK) + n;
  }
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
  const nb = Math.ceil(n / INT8_BLOCK);
  const buf = new ArrayBuffer(4 * nb + n);
  const absmax = new Float32Array(buf, 0, nb);
  const q = new Int8Array(buf, 4 * nb, n);
  for (let b = 0; b < nb; b++) {
    const lo = b * INT8_BLOCK;
    const hi = Math.min(n, lo + INT8_BLOCK);
    let m = 0;
    for (let i = lo; i < hi; i++) { const a = Math.abs(data[i]!); if (a > m) m = a; }
    absmax[b] = m;
    const s = m > 0 ? 127 / m : 0;
    for (let i = lo; i < hi; i++) q[i] = Math.max(-127, Math.min(127, Math.round(data[i]! * s)));
  }
  return { dtype: 'f32', shape: [...shape], codec, bytes: new Uint8Array(buf) };
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
  const want = expectedByteLength(t.codec, n);
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
  } else {
    const nb = Math.ceil(n / INT8_BLOCK);
    const buf = aligned(t.bytes);
    const absmax = new Float32Array(buf, 0, nb);
    const q = new Int8Array(buf, 4 * nb, n);
    out = new Float32Array(n);
    for (let b = 0; b < nb; b++) {
      const m = absmax[b]!;
      if (!Number.isFinite(m) || m < 0) throw new TensorError(`${what}: int8 block ${b} has bad absmax ${m}`);
      const s = m / 127;
      const hi = Math.min(n, (b + 1) * INT8_BLOCK);
      for (let i = b * INT8_BLOCK; i < hi; i++) {
        if (q[i] === -128) throw new TensorError(`${what}: int8 code -128 at element ${i} is outside the symmetric range`);
        out[i] = q[i]! * s;
      }
    }
    return { shape, data: out };
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
