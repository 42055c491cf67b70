// NF4 4-bit quantization and bitsandbytes double quantization (8-bit blockwise dynamic map), bit-faithful to bnb.
import { defaultDynamicMap, dequantizeBlockwise8, quantizeBlockwise8, sharedDynamicMap } from './dynamic-map.ts';

/** bitsandbytes double quantization of the per-block absmax (quantize_4bit(compress_statistics=True), what
 *  bnb_4bit_use_double_quant=True stores and holds): one 8-bit code per NF4 block into the signed dynamic map,
 *  a float32 absmax per `nestedBlocksize` codes, and the offset (the mean of the float32 absmaxes) added back.
 *  Block b decodes to `absmax_b = f32(f32(code[codes[b]] * nestedAbsmax[b >> log2(nestedBlocksize)]) + offset)`:
 *  a float32 product, then a float32 sum (never one fused multiply-add), as bitsandbytes computes it. */
export interface NF4DoubleQuant {
  /** 8-bit codes of absmax - offset, one per NF4 block */
  codes: Uint8Array;
  /** float32 absmax of the codes, one per `nestedBlocksize` of them */
  nestedAbsmax: Float32Array;
  /** the float32 mean of the block absmaxes (a float32 value held as a number) */
  offset: number;
  /** the 256-entry map the codes index (create_dynamic_map(signed=True) unless a checkpoint stored another) */
  code: Float32Array;
  /** codes per nested absmax: 256 (bitsandbytes' fixed choice); a power of two in 64..4096 when read */
  nestedBlocksize: number;
}

/** The quantization constants of an NF4 weight: float32 absmax per block, or the double-quantized form. */
export type NF4Absmax = Float32Array | NF4DoubleQuant;

/** An NF4-quantized 2-D weight [rows, cols] = [out_features, in_features], bitsandbytes layout. */
export interface NF4Weight {
  /** packed codes: flat element 2j in the high nibble, 2j+1 in the low nibble; length ceil(n/2) */
  packed: Uint8Array;
  /** per block of `blocksize` consecutive flat elements (ceil(n/blocksize) blocks): float32 absmax, or double
   *  quantized (NF4DoubleQuant). Every consumer handles both; decodeAbsmax() gives the float32 values. */
  absmax: NF4Absmax;
  rows: number;
  cols: number;
  /** power of two, 32..4096; 64 by default */
  blocksize: number;
}

/** An NF4 weight known to hold float32 absmax / known to hold the double-quantized form. */
export type NF4WeightF32 = NF4Weight & { absmax: Float32Array };
export type NF4WeightDQ = NF4Weight & { absmax: NF4DoubleQuant };

/** bitsandbytes' nested blocksize for the 4-bit absmax (quantize_4bit: quantize_blockwise(..., blocksize=256)). */
export const NESTED_BLOCKSIZE = 256;

/** True when the absmax is held double-quantized. */
export function isDoubleQuant(a: NF4Absmax): a is NF4DoubleQuant {
  return !(a instanceof Float32Array);
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

export function checkNestedBlocksize(nestedBlocksize: number, what = 'nestedBlocksize'): void {
  if (!Number.isInteger(nestedBlocksize) || nestedBlocksize < 64 || nestedBlocksize > 4096 || (nestedBlocksize & (nestedBlocksize - 1)) !== 0) {
    throw new Error(`${what} must be a power of two in 64..4096 (bitsandbytes' quantize_blockwise block sizes), got ${nestedBlocksize}`);
  }
}

/** Blocks of an NF4 weight: ceil(rows * cols / blocksize). */
export function nf4BlockCount(W: { rows: number; cols: number; blocksize: number }): number {
  return Math.ceil((W.rows * W.cols) / W.blocksize);
}

/** Checks that W's quantization constants fit its geometry (block count, nested count, the 256-entry map, a
 *  finite float32 offset); throws one line naming `where` and the part that is wrong. `atLeast`: arrays may be
 *  longer than needed (the backends' convention for buffers), else their lengths must be exact. */
export function checkNF4Absmax(W: NF4Weight, where: string, atLeast = false): void {
  const nBlocks = nf4BlockCount(W);
  const a = W.absmax;
  const bad = (len: number, want: number) => (atLeast ? len < want : len !== want);
  const expect = atLeast ? 'at least ' : '';
  if (!isDoubleQuant(a)) {
    if (bad(a.length, nBlocks)) throw new Error(`${where}: absmax has ${a.length} entries, expected ${expect}ceil(${W.rows * W.cols}/${W.blocksize}) = ${nBlocks}`);
    return;
  }
  if (!(a.codes instanceof Uint8Array) || !(a.nestedAbsmax instanceof Float32Array) || !(a.code instanceof Float32Array)) {
    throw new Error(`${where}: double-quantized absmax needs codes (Uint8Array), nestedAbsmax and code (Float32Array)`);
  }
  checkNestedBlocksize(a.nestedBlocksize, `${where}: nestedBlocksize`);
  if (bad(a.codes.length, nBlocks)) throw new Error(`${where}: double-quantized absmax has ${a.codes.length} codes, expected ${expect}one per block = ${nBlocks}`);
  const nNested = Math.ceil(nBlocks / a.nestedBlocksize);
  if (bad(a.nestedAbsmax.length, nNested)) {
    throw new Error(`${where}: nestedAbsmax has ${a.nestedAbsmax.length} entries, expected ${expect}ceil(${nBlocks}/${a.nestedBlocksize}) = ${nNested}`);
  }
  if (a.code.length !== 256) throw new Error(`${where}: the nested code map has ${a.code.length} entries, expected 256`);
  if (typeof a.offset !== 'number' || !Number.isFinite(a.offset) || f32(a.offset) !== a.offset) throw new Error(`${where}: offset ${a.offset} is not a finite float32 value`);
}

/** Quantize a row-major [rows, cols] float32 weight to NF4 with blocks of `blocksize` consecutive flat
 *  elements (not per row), absmax multiplied as its float32 reciprocal, element 2j in the high nibble.
 *  An odd element count is padded with one 0.0 (code 7). An all-zero block gets absmax 0 and code 7
 *  (bnb's torch backend clamps absmax; its CUDA kernel would emit code 0 there, which also decodes to 0).
 *  `doubleQuant` then double-quantizes the absmax as bitsandbytes' compress_statistics does (default off here;
 *  the recipe's bnb_4bit_use_double_quant=true is the config default, threaded by the callers). */
export function quantizeNF4(data: Float32Array, rows: number, cols: number, blocksize?: number, opts?: { doubleQuant?: false }): NF4WeightF32;
export function quantizeNF4(data: Float32Array, rows: number, cols: number, blocksize: number, opts: { doubleQuant: true }): NF4WeightDQ;
export function quantizeNF4(data: Float32Array, rows: number, cols: number, blocksize?: number, opts?: { doubleQuant?: boolean }): NF4Weight;
export function quantizeNF4(data: Float32Array, rows: number, cols: number, blocksize = 64, opts: { doubleQuant?: boolean } = {}): NF4Weight {
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
  return { packed, absmax: opts.doubleQuant === true ? doubleQuantize(absmax) : absmax, rows, cols, blocksize };
}

/** The float32 absmax of block b (decoding the double-quantized form as bitsandbytes does). */
export function absmaxAt(a: NF4Absmax, b: number): number {
  if (!isDoubleQuant(a)) return a[b];
  const nested = a.nestedAbsmax[Math.floor(b / a.nestedBlocksize)];
  return f32(f32(a.code[a.codes[b]] * nested) + a.offset);
}

/** Every block's float32 absmax: the array itself, or the double-quantized form decoded (a new array). */
export function decodeAbsmax(a: NF4Absmax): Float32Array {
  return isDoubleQuant(a) ? doubleDequantize(a) : a;
}

/** out[i] = NF4_CODE[code_i] * absmax[block(i)] in float32 (absmax decoded first when double-quantized). */
export function dequantizeNF4(W: NF4Weight, out?: Float32Array): Float32Array {
  const n = W.rows * W.cols;
  checkBlocksize(W.blocksize);
  if (W.packed.length !== (n + 1) >> 1) throw new Error(`dequantizeNF4: packed has ${W.packed.length} bytes, expected ceil(${n}/2) = ${(n + 1) >> 1}`);
  checkNF4Absmax(W, 'dequantizeNF4');
  const nBlocks = nf4BlockCount(W);
  const absmax = decodeAbsmax(W.absmax);
  const res = out ?? new Float32Array(n);
  if (res.length < n) throw new Error(`dequantizeNF4: output has ${res.length} elements, need ${n}`);
  const lut = NF4_CODE;
  const half = W.blocksize >> 1;
  for (let b = 0; b < nBlocks; b++) {
    const a = absmax[b];
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

/** bitsandbytes compress_statistics: offset = mean(absmax); quantize_blockwise(absmax - offset, blocksize 256) with
 *  create_dynamic_map(signed=True). The map is the shared default one (callers never mutate it). */
export function doubleQuantize(absmax: Float32Array, nestedBlocksize = NESTED_BLOCKSIZE): NF4DoubleQuant {
  if (absmax.length === 0) throw new Error('doubleQuantize: empty absmax');
  checkNestedBlocksize(nestedBlocksize);
  let sum = 0;
  for (let i = 0; i < absmax.length; i++) sum += absmax[i];
  const offset = f32(sum / absmax.length);
  const centered = new Float32Array(absmax.length);
  for (let i = 0; i < absmax.length; i++) centered[i] = f32(absmax[i] - offset);
  const code = defaultDynamicMap(true);
  const { q, absmax: nested } = quantizeBlockwise8(centered, code, nestedBlocksize);
  return { codes: q, nestedAbsmax: nested, offset, code, nestedBlocksize };
}

/** absmax[i] = code[codes[i]] * nestedAbsmax[i / nestedBlocksize] + offset (two float32 roundings). */
export function doubleDequantize(dq: NF4DoubleQuant): Float32Array {
  const out = dequantizeBlockwise8(dq.codes, dq.nestedAbsmax, dq.code, dq.nestedBlocksize);
  const off = f32(dq.offset);
  for (let i = 0; i < out.length; i++) out[i] = f32(out[i] + off);
  return out;
}

/** W with double-quantized absmax (W itself when it already is): what a stage holds with
 *  bnb_4bit_use_double_quant on. */
export function withDoubleQuant(W: NF4Weight): NF4WeightDQ {
  return isDoubleQuant(W.absmax) ? W as NF4WeightDQ : { ...W, absmax: doubleQuantize(W.absmax) };
}

/** Double-quantized constants as read from storage: the map shared with the default one when it is
 *  bitwise equal, so a stage holds one copy of it. */
export function internDoubleQuant(dq: NF4DoubleQuant): NF4DoubleQuant {
  const code = sharedDynamicMap(dq.code);
  return code === dq.code ? dq : { ...dq, code };
}

/** Bytes the quantization constants of W take in memory: 4 per block, or 1 per block + 4 per nested block +
 *  the 256-entry map (1 KiB; shared between weights on the CPU, one copy per weight on a GPU) + the offset. */
export function nf4ConstantsBytes(W: NF4Weight): number {
  const a = W.absmax;
  if (!isDoubleQuant(a)) return 4 * a.length;
  return a.codes.length + 4 * a.nestedAbsmax.length + 4 * a.code.length + 4;
}

/** Rows [r0, r1) of W as an NF4 weight of their own, with exactly the values W decodes to there (a fused
 *  linear such as Phi-3's qkv_proj computed part by part). The rows must start and end on a block boundary
 *  (true for every real model: a block is 64 elements, a row thousands). The double-quantized form stays so
 *  when the rows start on a nested block; otherwise their absmax is decoded to float32 (the same values). */
export function nf4Rows(W: NF4Weight, r0: number, r1: number): NF4Weight {
  const e0 = r0 * W.cols, e1 = r1 * W.cols, n = W.rows * W.cols;
  if (!(r0 >= 0 && r1 > r0 && r1 <= W.rows)) throw new RangeError(`nf4Rows: rows [${r0}, ${r1}) are not inside [0, ${W.rows})`);
  if (e0 % W.blocksize !== 0 || (e1 % W.blocksize !== 0 && e1 !== n) || e0 % 2 !== 0) {
    throw new RangeError(`nf4Rows: rows [${r0}, ${r1}) of a [${W.rows}, ${W.cols}] weight do not start and end on a block of ${W.blocksize} elements`);
  }
  const b0 = e0 / W.blocksize, b1 = Math.ceil(e1 / W.blocksize);
  const packed = W.packed.slice(e0 >> 1, (e1 + 1) >> 1);
  const a = W.absmax;
  let absmax: NF4Absmax;
  if (!isDoubleQuant(a)) absmax = a.slice(b0, b1);
  else if (b0 % a.nestedBlocksize === 0) {
    const nb = a.nestedBlocksize;
    absmax = { ...a, codes: a.codes.slice(b0, b1), nestedAbsmax: a.nestedAbsmax.slice(b0 / nb, Math.ceil(b1 / nb)) };
  } else absmax = decodeAbsmax(a).slice(b0, b1);
  return { packed, absmax, rows: r1 - r0, cols: W.cols, blocksize: W.blocksize };
}
