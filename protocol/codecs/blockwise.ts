// Blockwise absmax codecs for float tensors on the wire: int8, int4, nf4 and int2. Stateless: the bytes
// are a function of the tensor alone, so a retried micro-batch, another route or a restarted peer
// encodes and decodes the same way with nothing to keep in step.
//
// Every codec: blocks of BLOCK consecutive elements of the flat (row-major) tensor, the last one short
// for odd lengths. Layout (little-endian): ceil(n/BLOCK) x float32 absmax (max |x| of the block), then
// the codes. A value decodes as level[code] * absmax.
//   int8: n x int8, code q = round(x * 127 / absmax) in [-127, 127]; -128 is refused.
//   int4: ceil(n/2) bytes, element 2j in the HIGH nibble, 2j+1 in the low one (bitsandbytes' NF4 order);
//         nibble c = q + 8 with q = round(x * 7 / absmax) in [-7, 7]; c = 0 is refused.
//   nf4 : the same packing; nibble = the bitsandbytes NF4 code (16 normal-float levels, nearest by the
//         midpoints, a tie goes to the lower code as in bitsandbytes' dQuantizeNF4).
//   int2: ceil(n/4) bytes, element 4j in bits 7..6, 4j+1 in 5..4, 4j+2 in 3..2, 4j+3 in 1..0;
//         levels (-1, -1/3, 1/3, 1), nearest (thresholds -2/3, 0, 2/3; x/absmax = 0 goes to -1/3).
//   int1: ceil(n/8) bytes, element 8j in bit 7 ... 8j+7 in bit 0; bit 1 = +, 0 = −; the block's float is
//         not its absmax but its mean |x| (the scale that minimizes the squared error of sign·scale), and
//         a value decodes as ±scale. Used for the delta codec's differences (codecs/delta.ts), not alone.
// Unused trailing bits of the last byte must be zero. Error bounds per element, with a = the block's
// absmax: int8 a/254, int4 a/14, nf4 a * 0.1519 (half the widest gap, between -1 and -0.6962), int2 a/3.
import { TensorError } from '../errors.ts';

export const BLOCK = 64;

export type BlockCodec = 'int8' | 'int4' | 'nf4' | 'int2' | 'int1';

/** bitsandbytes' NF4 levels (functional.py get_4bit_type("nf4")), index = code */
export const NF4_LEVELS = Float32Array.from([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);
const NF4_MID = Float32Array.from({ length: 15 }, (_, i) => (NF4_LEVELS[i]! + NF4_LEVELS[i + 1]!) / 2);
const INT2_LEVELS = [-1, -1 / 3, 1 / 3, 1];

const BITS: Record<BlockCodec, number> = { int8: 8, int4: 4, nf4: 4, int2: 2, int1: 1 };

/** `block`: elements per scale (BLOCK on the wire's own codecs; the delta codec may use longer ones) */
export function blockByteLength(codec: BlockCodec, n: number, block = BLOCK): number {
  return 4 * Math.ceil(n / block) + Math.ceil(n * BITS[codec] / 8);
}

function nf4Code(xn: number): number {
  // nearest level, ties to the lower code: the first midpoint the value does not exceed
  let c = 0;
  while (c < 15 && xn > NF4_MID[c]!) c++;
  return c;
}

/** Encode finite float data (the caller checked finiteness) into the codec's bytes. */
export function encodeBlockwise(codec: BlockCodec, data: Float32Array, block = BLOCK): Uint8Array {
  const n = data.length;
  const nb = Math.ceil(n / block);
  const out = new Uint8Array(blockByteLength(codec, n, block));
  const absmax = new Float32Array(out.buffer, 0, nb);
  const codes = out.subarray(4 * nb);
  const q8 = new Int8Array(out.buffer, 4 * nb);
  for (let b = 0; b < nb; b++) {
    const lo = b * block;
    const hi = Math.min(n, lo + block);
    let m = 0;
    if (codec === 'int1') {
      let sum = 0;
      for (let i = lo; i < hi; i++) { sum += Math.abs(data[i]!); if (data[i]! >= 0) codes[i >> 3]! |= 1 << (7 - (i & 7)); }
      absmax[b] = sum / (hi - lo);
      continue;
    }
    for (let i = lo; i < hi; i++) { const a = Math.abs(data[i]!); if (a > m) m = a; }
    absmax[b] = m;
    const inv = m > 0 ? 1 / m : 0;
    const s8 = m > 0 ? 127 / m : 0; // int8 keeps the original x * (127 / absmax) so its bytes do not change
    for (let i = lo; i < hi; i++) {
      const xn = data[i]! * inv; // in [-1, 1]
      switch (codec) {
        case 'int8': q8[i] = Math.max(-127, Math.min(127, Math.round(data[i]! * s8))); break;
        case 'int4': case 'nf4': {
          const c = codec === 'int4' ? Math.max(-7, Math.min(7, Math.round(xn * 7))) + 8 : nf4Code(xn);
          codes[i >> 1]! |= (i & 1) === 0 ? c << 4 : c;
          break;
        }
        case 'int2': {
          const c = xn > 2 / 3 ? 3 : xn > 0 ? 2 : xn > -2 / 3 ? 1 : 0;
          codes[i >> 2]! |= c << (6 - 2 * (i & 3));
          break;
        }
      }
    }
  }
  return out;
}

/** Decode the codec's bytes (length already checked) for n elements; bad absmax, codes or padding are TensorErrors. */
export function decodeBlockwise(codec: BlockCodec, bytes: Uint8Array, n: number, what: string, block = BLOCK): Float32Array {
  const nb = Math.ceil(n / block);
  const buf = new ArrayBuffer(bytes.length);
  const all = new Uint8Array(buf);
  all.set(bytes);
  const absmax = new Float32Array(buf, 0, nb);
  const codes = all.subarray(4 * nb);
  const q8 = new Int8Array(buf, 4 * nb);
  const out = new Float32Array(n);
  for (let b = 0; b < nb; b++) {
    const m = absmax[b]!;
    if (!Number.isFinite(m) || m < 0) throw new TensorError(`${what}: ${codec} block ${b} has bad absmax ${m}`);
    const hi = Math.min(n, (b + 1) * block);
    for (let i = b * block; i < hi; i++) {
      switch (codec) {
        case 'int8': {
          const q = q8[i]!;
          if (q === -128) throw new TensorError(`${what}: int8 code -128 at element ${i} is outside the symmetric range`);
          out[i] = q * (m / 127);
          break;
        }
        case 'int4': case 'nf4': {
          const c = (i & 1) === 0 ? codes[i >> 1]! >> 4 : codes[i >> 1]! & 0xf;
          if (codec === 'int4') {
            if (c === 0) throw new TensorError(`${what}: int4 code 0 at element ${i} is outside the symmetric range`);
            out[i] = (c - 8) * (m / 7);
          } else out[i] = NF4_LEVELS[c]! * m;
          break;
        }
        case 'int2': out[i] = INT2_LEVELS[(codes[i >> 2]! >> (6 - 2 * (i & 3))) & 3]! * m; break;
        case 'int1': out[i] = ((codes[i >> 3]! >> (7 - (i & 7))) & 1) === 1 ? m : -m; break;
      }
    }
    if (m === 0) out.fill(0, b * block, hi); // +0, not the -0 of a negative level times 0
  }
  const used = n * BITS[codec];
  if (used % 8 !== 0 && (codes[codes.length - 1]! & ((1 << (8 - used % 8)) - 1)) !== 0) {
    throw new TensorError(`${what}: ${codec} padding bits after element ${n - 1} are not zero`);
  }
  return out;
}
