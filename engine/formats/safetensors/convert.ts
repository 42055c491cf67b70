// safetensors dtype conversion: raw little-endian tensor bytes to float32 and back (bf16, f16, f8 tables, ints).
import { DTYPE_BITS, SafetensorsError } from './header.ts';
import type { Dtype } from './header.ts';

function makeF8Lut(expBits: number, manBits: number, bias: number, kind: 'fn' | 'ieee' | 'fnuz'): Float32Array {
  const lut = new Float32Array(256);
  const expMax = (1 << expBits) - 1;
  for (let b = 0; b < 256; b++) {
    const sign = b & 0x80 ? -1 : 1;
    const e = (b >> manBits) & expMax;
    const m = b & ((1 << manBits) - 1);
    let v: number;
    if (kind === 'fnuz' && b === 0x80) v = NaN;
    else if (kind === 'ieee' && e === expMax) v = m === 0 ? sign * Infinity : NaN;
    else if (kind === 'fn' && e === expMax && m === (1 << manBits) - 1) v = NaN;
    else if (e === 0) v = sign * m * 2 ** (1 - bias - manBits);
    else v = sign * (1 + m / (1 << manBits)) * 2 ** (e - bias);
    lut[b] = v;
  }
  return lut;
}
let f8Luts: Partial<Record<Dtype, Float32Array>> | null = null;
function f8Lut(dtype: Dtype): Float32Array | undefined {
  if (!f8Luts) {
    const e8m0 = new Float32Array(256);
    for (let b = 0; b < 256; b++) e8m0[b] = b === 255 ? NaN : 2 ** (b - 127);
    f8Luts = {
      F8_E4M3: makeF8Lut(4, 3, 7, 'fn'),
      F8_E5M2: makeF8Lut(5, 2, 15, 'ieee'),
      F8_E4M3FNUZ: makeF8Lut(4, 3, 8, 'fnuz'),
      F8_E5M2FNUZ: makeF8Lut(5, 2, 16, 'fnuz'),
      F8_E8M0: e8m0,
    };
  }
  return f8Luts[dtype];
}

export function f16BitsToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

let f16Lut: Float32Array | null = null;

/** Dtypes readFloat32 can decode. */
export function isFloatDecodable(dtype: Dtype): boolean {
  return !['F4', 'F6_E2M3', 'F6_E3M2', 'C64'].includes(dtype);
}

/** Decode little-endian raw bytes of a tensor to float32. */
export function decodeToFloat32(dtype: Dtype, raw: Uint8Array, where = 'tensor'): Float32Array {
  const bytes = dtype === 'BOOL' || DTYPE_BITS[dtype] === 8 ? raw : alignedCopy(raw);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = (raw.byteLength * 8) / DTYPE_BITS[dtype];
  switch (dtype) {
    case 'F32': {
      const view = new Float32Array(bytes.buffer, bytes.byteOffset, n);
      // a freshly read tensor owns its buffer: hand it over instead of copying gigabytes
      return bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength ? view : view.slice();
    }
    case 'BF16': {
      const src = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const out = new Float32Array(n);
      const o32 = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) o32[i] = src[i] << 16;
      return out;
    }
    case 'F16': {
      if (!f16Lut) { f16Lut = new Float32Array(65536); for (let h = 0; h < 65536; h++) f16Lut[h] = f16BitsToFloat(h); }
      const lut = f16Lut;
      const src = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = lut[src[i]];
      return out;
    }
    case 'F64': return Float32Array.from(new Float64Array(bytes.buffer, bytes.byteOffset, n));
    case 'BOOL': return Float32Array.from(bytes, (b) => (b ? 1 : 0));
    case 'U8': return Float32Array.from(bytes);
    case 'I8': return Float32Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, n));
    case 'I16': return Float32Array.from(new Int16Array(bytes.buffer, bytes.byteOffset, n));
    case 'U16': return Float32Array.from(new Uint16Array(bytes.buffer, bytes.byteOffset, n));
    case 'I32': return Float32Array.from(new Int32Array(bytes.buffer, bytes.byteOffset, n));
    case 'U32': return Float32Array.from(new Uint32Array(bytes.buffer, bytes.byteOffset, n));
    case 'I64': { const out = new Float32Array(n); for (let i = 0; i < n; i++) out[i] = Number(dv.getBigInt64(i * 8, true)); return out; }
    case 'U64': { const out = new Float32Array(n); for (let i = 0; i < n; i++) out[i] = Number(dv.getBigUint64(i * 8, true)); return out; }
    default: {
      const lut = f8Lut(dtype);
      if (lut) { const out = new Float32Array(n); for (let i = 0; i < n; i++) out[i] = lut[bytes[i]]; return out; }
      throw new SafetensorsError(`${where}: dtype ${dtype} cannot be decoded to float32; read its raw bytes instead`);
    }
  }
}

/** Typed-array views need an element-aligned offset; copy only when the bytes are misaligned. */
function alignedCopy(raw: Uint8Array): Uint8Array {
  return raw.byteOffset % 8 === 0 ? raw : raw.slice();
}

/** float32 → bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN. */
export function floatToBf16Bits(x: number): number {
  const u = floatBits(x);
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
const convF32 = new Float32Array(1);
const convU32 = new Uint32Array(convF32.buffer);
function floatBits(x: number): number { convF32[0] = x; return convU32[0]; }

/** float32 → IEEE half bits, round to nearest even, overflow to ±Inf, subnormals kept. */
export function floatToF16Bits(x: number): number {
  const u = floatBits(x);
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let man = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (man ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // rounds to zero (even the half-way case rounds to 0)
    man |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = man & ((1 << shift) - 1);
    let h = man >>> shift;
    if (rest > half || (rest === half && (h & 1))) h++;
    return sign | h; // may carry into the smallest normal, which is the right encoding
  }
  let h = (e << 10) | (man >>> 13);
  const rest = man & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h++; // carry may roll into exponent/Inf correctly
  return sign | h;
}

/** Encode float32 values as little-endian bytes of `dtype` (float and integer dtypes). */
export function encodeFromFloat32(dtype: Dtype, data: ArrayLike<number>): Uint8Array {
  const n = data.length;
  switch (dtype) {
    case 'F32': { const a = Float32Array.from(data); return new Uint8Array(a.buffer); }
    case 'F64': { const a = Float64Array.from(data); return new Uint8Array(a.buffer); }
    case 'BF16': { const a = new Uint16Array(n); for (let i = 0; i < n; i++) a[i] = floatToBf16Bits(data[i]); return new Uint8Array(a.buffer); }
    case 'F16': { const a = new Uint16Array(n); for (let i = 0; i < n; i++) a[i] = floatToF16Bits(data[i]); return new Uint8Array(a.buffer); }
    case 'BOOL': return Uint8Array.from(data, (v) => (v ? 1 : 0));
    case 'U8': return Uint8Array.from(data);
    case 'I8': return new Uint8Array(Int8Array.from(data).buffer);
    case 'I16': return new Uint8Array(Int16Array.from(data).buffer);
    case 'U16': return new Uint8Array(Uint16Array.from(data).buffer);
    case 'I32': return new Uint8Array(Int32Array.from(data).buffer);
    case 'U32': return new Uint8Array(Uint32Array.from(data).buffer);
    case 'I64': { const a = new BigInt64Array(n); for (let i = 0; i < n; i++) a[i] = BigInt(Math.trunc(data[i])); return new Uint8Array(a.buffer); }
    case 'U64': { const a = new BigUint64Array(n); for (let i = 0; i < n; i++) a[i] = BigInt(Math.trunc(data[i])); return new Uint8Array(a.buffer); }
    default: throw new SafetensorsError(`cannot encode float values as ${dtype}; pass raw bytes`);
  }
}
