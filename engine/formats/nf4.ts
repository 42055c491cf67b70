// NF4 4-bit quantization and bitsandbytes double quantization (8-bit blockwise dynamic map), bit-faithful to bnb.
import { defaultDynamicMap, dequantizeBlockwise8, quantizeBlockwise8 } from './dynamic-map.ts';

/** An NF4-quantized 2-D weight [rows, cols] = [out_features, in_features], bitsandbytes layout,
 *  with the per-block absmax already decoded to float32 (double quantization undone at load). */
export interface NF4Weight {
  /** packed codes: flat element 2j in the high nibble, 2j+1 in the low nibble; length ceil(n/2) */
  packed: Uint8Array;
  /** float32 absmax per block of `blocksize` consecutive flat elements; length ceil(n/blocksize) */
  absmax: Float32Array;
  rows: number;
  cols: number;
  /** power of two, 32..4096; 64 by default */
  blocksize: number;
}

const f32 = Math.fround;

/** bitsandbytes get_4bit_type("nf4"); index = 4-bit code. */
export const NF4_CODE: Float32Array = Float32Array.from([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
]);

// Thresholds of bnb's dQuantizeNF4 tree: float32 literals in the CUDA source, compared in float32.
const T_ROOT = f32(0.03979014977812767);
const T_U = f32(0.3893125355243683), T_UU = f32(0.6427869200706482), T_UUU = f32(0.8614784181118011);
const T_UUL = f32(0.5016634166240692), T_UL = f32(0.2035212516784668), T_ULU = f32(0.2920137718319893);
const T_ULL = f32(0.1202552504837513);
const T_L = f32(-0.33967943489551544), T_LU = f32(-0.13791173323988914), T_LUU = f32(-0.045525018125772476);
const T_LUL = f32(-0.23460740596055984), T_LL = f32(-0.6106329262256622), T_LLU = f32(-0.4599952697753906);
const T_LLL = f32(-0.8480964004993439);

/** bnb dQuantizeNF4: strict '>' so a value exactly on a midpoint takes the lower code. x is a float32
 *  value already scaled by 1/absmax. NaN falls through every '>' to code 0, as on the GPU. */
export function quantizeNF4Value(x: number): number {
  if (x > T_ROOT) {
    if (x > T_U) {
      if (x > T_UU) return x > T_UUU ? 15 : 14;
      return x > T_UUL ? 13 : 12;
    }
    if (x > T_UL) return x > T_ULU ? 11 : 10;
    return x > T_ULL ? 9 : 8;
  }
  if (x > T_L) {
    if (x > T_LU) return x > T_LUU ? 7 : 6;
    return x > T_LUL ? 5 : 4;
  }
  if (x > T_LL) return x > T_LLU ? 3 : 2;
  return x > T_LLL ? 1 : 0;
}

export function checkBlocksize(blocksize: number, what = 'blocksize'): void {
  if (!Number.isInteger(blocksize) || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) !== 0) {
    throw new Error(`${what} must be a power of two in 32..4096, got ${blocksize}`);
  }
}

/** Quantize a row-major [rows, cols] float32 weight to NF4 with blocks of `blocksize` consecutive flat
 *  elements (not per row), absmax multiplied as its float32 reciprocal, element 2j in the high nibble.
 *  An odd element count is padded with one 0.0 (code 7). An all-zero block gets absmax 0 and code 7
 *  (bnb's torch backend clamps absmax; its CUDA kernel would emit code 0 there, which also decodes to 0). */
export function quantizeNF4(data: Float32Array, rows: number, cols: number, blocksize = 64): NF4Weight {
  checkBlocksize(blocksize);
  const n = rows * cols;
  if (!Number.isInteger(rows) || !Number.isInteger(cols) || rows <= 0 || cols <= 0) {
    throw new Error(`quantizeNF4: rows and cols must be positive integers, got ${rows}x${cols}`);
  }
  if (data.length !== n) throw new Error(`quantizeNF4: data has ${data.length} elements, expected rows*cols = ${rows}*${cols} = ${n}`);
  const nBlocks = Math.ceil(n / blocksize);
  const absmax = new Float32Array(nBlocks);
  const packed = new Uint8Array((n + 1) >> 1);
  for (let b = 0; b < nBlocks; b++) {
    const start = b * blocksize;
    const end = Math.min(start + blocksize, n);
    let m = 0;
    for (let i = start; i < end; i++) {
      const a = Math.abs(data[i]);
      if (a > m) m = a;
      else if (!(a <= m)) throw new Error(`quantizeNF4: non-finite value ${data[i]} at flat index ${i} (row ${Math.floor(i / cols)}, col ${i % cols})`);
    }
    if (m === Infinity) throw new Error(`quantizeNF4: infinite value in block ${b} (flat elements ${start}..${end - 1})`);
    absmax[b] = m;
    // blocksize is even, so a block always starts on a byte boundary
    if (m === 0) {
      for (let i = start; i < end; i += 2) packed[i >> 1] = 0x77;
      continue;
    }
    const inv = f32(1 / m);
    let i = start;
    for (; i + 1 < end; i += 2) {
      packed[i >> 1] = (quantizeNF4Value(f32(data[i] * inv)) << 4) | quantizeNF4Value(f32(data[i + 1] * inv));
    }
    if (i < end) packed[i >> 1] = (quantizeNF4Value(f32(data[i] * inv)) << 4) | 7; // odd tail: padded 0.0 → code 7
  }
  return { packed, absmax, rows, cols, blocksize };
}

/** out[i] = NF4_CODE[code_i] * absmax[block(i)] in float32. */
export function dequantizeNF4(W: NF4Weight, out?: Float32Array): Float32Array {
  const n = W.rows * W.cols;
  checkBlocksize(W.blocksize);
  if (W.packed.length !== (n + 1) >> 1) throw new Error(`dequantizeNF4: packed has ${W.packed.length} bytes, expected ceil(${n}/2) = ${(n + 1) >> 1}`);
  const nBlocks = Math.ceil(n / W.blocksize);
  if (W.absmax.length !== nBlocks) throw new Error(`dequantizeNF4: absmax has ${W.absmax.length} entries, expected ceil(${n}/${W.blocksize}) = ${nBlocks}`);
  const res = out ?? new Float32Array(n);
  if (res.length < n) throw new Error(`dequantizeNF4: output has ${res.length} elements, need ${n}`);
  const lut = NF4_CODE;
  const half = W.blocksize >> 1;
  for (let b = 0; b < nBlocks; b++) {
    const a = W.absmax[b];
    const startByte = b * half;
    const endByte = Math.min(startByte + half, W.packed.length);
    for (let j = startByte; j < endByte; j++) {
      const byte = W.packed[j];
      res[2 * j] = f32(lut[byte >> 4] * a);
      if (2 * j + 1 < n) res[2 * j + 1] = f32(lut[byte & 15] * a);
    }
  }
  return res;
}

export interface DoubleQuantized {
  /** absmax - offset, 8-bit codes; one per NF4 block */
  qabsmax: Uint8Array;
  /** float32 absmax per `nestedBlocksize` entries of qabsmax */
  nestedAbsmax: Float32Array;
  /** mean of the float32 absmax values (float32) */
  offset: number;
  /** the signed dynamic map the codes index */
  code: Float32Array;
  nestedBlocksize: number;
}

/** bitsandbytes compress_statistics: offset = mean(absmax); quantize_blockwise(absmax - offset, blocksize 256). */
export function doubleQuantize(absmax: Float32Array, nestedBlocksize = 256): DoubleQuantized {
  if (absmax.length === 0) throw new Error('doubleQuantize: empty absmax');
  let sum = 0;
  for (let i = 0; i < absmax.length; i++) sum += absmax[i];
  const offset = f32(sum / absmax.length);
  const centered = new Float32Array(absmax.length);
  for (let i = 0; i < absmax.length; i++) centered[i] = f32(absmax[i] - offset);
  const code = defaultDynamicMap(true);
  const { q, absmax: nested } = quantizeBlockwise8(centered, code, nestedBlocksize);
  return { qabsmax: q, nestedAbsmax: nested, offset, code: Float32Array.from(code), nestedBlocksize };
}

/** absmax[i] = code[qabsmax[i]] * nestedAbsmax[i / nestedBlocksize] + offset (float32). */
export function doubleDequantize(dq: { qabsmax: Uint8Array; nestedAbsmax: Float32Array; offset: number; code: Float32Array; nestedBlocksize?: number }): Float32Array {
  const out = dequantizeBlockwise8(dq.qabsmax, dq.nestedAbsmax, dq.code, dq.nestedBlocksize ?? 256);
  const off = f32(dq.offset);
  for (let i = 0; i < out.length; i++) out[i] = f32(out[i] + off);
  return out;
}
