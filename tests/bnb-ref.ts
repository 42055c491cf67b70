// An independent reference of bitsandbytes 4-bit quantization for tests, written from bitsandbytes' semantics
// (/work/shared/reference/qlora-facts.md §1-2), sharing no code with engine/formats: NF4 by bucketing the scaled
// value on the midpoints of the code table (the torch backend's bucketize; the CUDA tree has the same thresholds
// and the same tie rule), and double quantization (quantize_4bit(compress_statistics=True)): offset = mean of the
// float32 block absmaxes, quantize_blockwise(absmax - offset, blocksize=256) with create_dynamic_map(signed=True).
// What bitsandbytes computes in float32 is computed here in float32 (Math.fround at every float32 rounding).
//
// The one assumption not pinned by bitsandbytes' source: torch's float32 `absmax.mean()` is taken as the float64
// mean rounded once to float32 (torch's CUDA reduction accumulates in float32 in a tree; for the sizes of these
// tests both give the same float32 value, which the byte goldens in tests/formats-bnb.test.ts confirm for theirs).
import type { NF4DoubleQuant, NF4Weight } from '../engine/formats/nf4.ts';

const f32 = Math.fround;

/** bitsandbytes get_4bit_type("nf4"), index = code */
const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
].map(f32);
const NF4_MID = NF4.slice(1).map((v, i) => f32((v + NF4[i]!) / 2));

/** index of the first midpoint ≥ x (torch.bucketize, right=False): a value on a midpoint takes the lower code */
function bucketize(mids: readonly number[], x: number): number {
  let lo = 0, hi = mids.length;
  while (lo < hi) {
    const m = (lo + hi) >> 1;
    if (mids[m]! < x) lo = m + 1; else hi = m;
  }
  return lo;
}

/** torch.linspace(start, end, steps) in float32 as ATen's CPU kernel computes it: a float32 step, the first
 *  half counted up from start, the second half counted down from end. */
function torchLinspace(start: number, end: number, steps: number): number[] {
  const step = f32(f32(f32(end) - f32(start)) / (steps - 1));
  return Array.from({ length: steps }, (_, i) => (i < Math.floor(steps / 2) ? f32(f32(start) + f32(step * i)) : f32(f32(end) - f32(step * (steps - 1 - i)))));
}

/** bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), 256 sorted float32 values */
export function dynamicMapRef(): Float32Array {
  const data: number[] = [];
  for (let i = 0; i < 7; i++) {
    const bounds = torchLinspace(0.1, 1, 2 ** i + 1);
    const scale = f32(10 ** (-6 + i));
    for (let k = 0; k + 1 < bounds.length; k++) {
      const mean = f32(f32(bounds[k]! + bounds[k + 1]!) / 2);
      data.push(f32(scale * mean), f32(-scale * mean));
    }
  }
  data.push(0, 1);
  data.sort((a, b) => a - b);
  if (data.length !== 256) throw new Error(`dynamic map has ${data.length} values`);
  return Float32Array.from(data);
}

/** quantize_blockwise: per block absmax, x·(1/absmax) in float32, nearest code (midpoints, ties to the lower) */
function quantizeBlockwiseRef(x: Float32Array, code: Float32Array, blocksize: number): { q: Uint8Array; absmax: Float32Array } {
  const mids = Array.from({ length: 255 }, (_, i) => f32((code[i]! + code[i + 1]!) / 2));
  const q = new Uint8Array(x.length), absmax = new Float32Array(Math.ceil(x.length / blocksize));
  for (let b = 0; b < absmax.length; b++) {
    const lo = b * blocksize, hi = Math.min(x.length, lo + blocksize);
    let m = 0;
    for (let i = lo; i < hi; i++) m = Math.max(m, Math.abs(x[i]!));
    absmax[b] = m;
    const inv = m === 0 ? 0 : f32(1 / m);
    for (let i = lo; i < hi; i++) q[i] = bucketize(mids, f32(x[i]! * inv));
  }
  return { q, absmax };
}

/** bitsandbytes quantize_4bit(quant_type="nf4", blocksize) of a row-major [rows, cols] weight, with
 *  compress_statistics (double quantization) when asked: the state as bitsandbytes holds it. */
export function bnbQuantizeNF4Ref(data: Float32Array, rows: number, cols: number, opts: { blocksize?: number; compressStatistics: boolean }): NF4Weight {
  const bs = opts.blocksize ?? 64;
  const n = rows * cols;
  const nb = Math.ceil(n / bs);
  const absmax = new Float32Array(nb);
  const codes = new Uint8Array(n + (n % 2));
  codes.fill(7);  // the odd element's padding is a 0.0, code 7
  for (let b = 0; b < nb; b++) {
    const lo = b * bs, hi = Math.min(n, lo + bs);
    let m = 0;
    for (let i = lo; i < hi; i++) m = Math.max(m, Math.abs(data[i]!));
    absmax[b] = m;
    const inv = m === 0 ? 0 : f32(1 / m);
    for (let i = lo; i < hi; i++) codes[i] = bucketize(NF4_MID, f32(data[i]! * inv));
  }
  const packed = new Uint8Array(codes.length / 2);
  for (let j = 0; j < packed.length; j++) packed[j] = (codes[2 * j]! << 4) | codes[2 * j + 1]!;
  if (!opts.compressStatistics) return { packed, absmax, rows, cols, blocksize: bs };
  let sum = 0;
  for (const a of absmax) sum += a;
  const offset = f32(sum / nb);
  const code = dynamicMapRef();
  const { q, absmax: nested } = quantizeBlockwiseRef(absmax.map((a) => f32(a - offset)), code, 256);
  const dq: NF4DoubleQuant = { codes: q, nestedAbsmax: nested, offset, code, nestedBlocksize: 256 };
  return { packed, absmax: dq, rows, cols, blocksize: bs };
}
