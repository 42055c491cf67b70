// bitsandbytes' 8-bit dynamic map (create_dynamic_map) and blockwise 8-bit quantization with it: NF4 double
// quantization (engine/formats/nf4.ts) and the 8-bit optimizer state (engine/train/optim.ts) both use it.

const f32 = Math.fround;

/** torch.linspace(start, end, steps, dtype=float32) as ATen's CPU kernel computes it: float32 step,
 *  first half from start upward, second half from end downward. */
function linspaceF32(start: number, end: number, steps: number): Float32Array {
  const s = f32(start), e = f32(end);
  const out = new Float32Array(steps);
  if (steps === 1) { out[0] = s; return out; }
  const step = f32(f32(e - s) / (steps - 1));
  const halfway = Math.floor(steps / 2);
  for (let i = 0; i < steps; i++) {
    out[i] = i < halfway ? f32(s + f32(step * i)) : f32(e - f32(step * (steps - i - 1)));
  }
  return out;
}

/** bitsandbytes create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): 256 sorted float32 values.
 *  Signed: 127 negatives, 0 at index 127, 127 positives, 1.0 at index 255. Unsigned: 0 at index 0, 1.0 at 255. */
export function createDynamicMap(signed = true, maxExponentBits = 7, totalBits = 8): Float32Array {
  const data: number[] = [];
  // bnb uses total_bits - 1 for both signed and unsigned maps; unsigned doubles the fraction items instead
  const nonSignBits = totalBits - 1;
  const additionalItems = 2 ** (nonSignBits - maxExponentBits) - 1;
  for (let i = 0; i < maxExponentBits; i++) {
    const fractionItems = signed
      ? 2 ** (i + nonSignBits - maxExponentBits) + 1
      : 2 ** (i + nonSignBits - maxExponentBits + 1) + 1;
    const boundaries = linspaceF32(0.1, 1, fractionItems);
    const scale = f32(10 ** (-(maxExponentBits - 1) + i));
    for (let k = 0; k + 1 < boundaries.length; k++) {
      const mean = f32(f32(boundaries[k] + boundaries[k + 1]) / 2);
      data.push(f32(scale * mean));
      if (signed) data.push(f32(-scale * mean));
    }
  }
  if (additionalItems > 0) {
    const boundaries = linspaceF32(0.1, 1, additionalItems + 1);
    const scale = f32(10 ** (-(maxExponentBits - 1) + maxExponentBits - 1));
    for (let k = 0; k + 1 < boundaries.length; k++) {
      const mean = f32(f32(boundaries[k] + boundaries[k + 1]) / 2);
      data.push(f32(scale * mean));
      if (signed) data.push(f32(-scale * mean));
    }
  }
  data.push(0, 1.0);
  const total = 2 ** totalBits;
  if (data.length > total) throw new Error(`createDynamicMap: ${data.length} values exceed 2^${totalBits}`);
  while (data.length < total) data.push(0);
  data.sort((a, b) => a - b);
  return Float32Array.from(data);
}

/** Index of the code nearest to x (sorted code); a tie between two neighbours goes to the lower index,
 *  like bnb's midpoint search / bucketize on midpoints. */
export function nearestCodeIndex(code: Float32Array, x: number): number {
  let lo = 0, hi = code.length - 1;
  if (!(x > code[lo])) return 0;
  if (x >= code[hi]) return hi;
  // invariant: code[lo] < x < code[hi]... narrow to adjacent pair
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (x > code[mid]) lo = mid; else hi = mid;
  }
  if (x === code[hi]) return hi;
  const midpoint = f32(f32(code[lo] + code[hi]) * 0.5);
  return x > midpoint ? hi : lo;
}

/** Blockwise 8-bit quantization: per block absmax = max|x|, q = nearest code of x * (1/absmax).
 *  An all-zero block stores absmax 0 and the code nearest 0. */
export function quantizeBlockwise8(x: Float32Array, code: Float32Array, blocksize = 256): { q: Uint8Array; absmax: Float32Array } {
  if (code.length !== 256) throw new Error(`quantizeBlockwise8: code must have 256 entries, got ${code.length}`);
  if (!Number.isInteger(blocksize) || blocksize <= 0) throw new Error(`quantizeBlockwise8: bad blocksize ${blocksize}`);
  const n = x.length;
  const nBlocks = Math.ceil(n / blocksize);
  const q = new Uint8Array(n);
  const absmax = new Float32Array(nBlocks);
  const zeroIdx = nearestCodeIndex(code, 0);
  for (let b = 0; b < nBlocks; b++) {
    const start = b * blocksize, end = Math.min(start + blocksize, n);
    let m = 0;
    for (let i = start; i < end; i++) {
      const a = Math.abs(x[i]);
      if (a > m) m = a;
      else if (!(a <= m)) throw new Error(`quantizeBlockwise8: non-finite value ${x[i]} at index ${i}`);
    }
    if (m === Infinity) throw new Error(`quantizeBlockwise8: infinite value in block ${b}`);
    absmax[b] = m;
    if (m === 0) { q.fill(zeroIdx, start, end); continue; }
    const inv = f32(1 / m);
    for (let i = start; i < end; i++) q[i] = nearestCodeIndex(code, f32(x[i] * inv));
  }
  return { q, absmax };
}

/** out[i] = code[q[i]] * absmax[i / blocksize] (float32). */
export function dequantizeBlockwise8(q: Uint8Array, absmax: Float32Array, code: Float32Array, blocksize = 256, out?: Float32Array): Float32Array {
  const n = q.length;
  const nBlocks = Math.ceil(n / blocksize);
  if (absmax.length !== nBlocks) throw new Error(`dequantizeBlockwise8: absmax has ${absmax.length} entries, expected ceil(${n}/${blocksize}) = ${nBlocks}`);
  if (code.length !== 256) throw new Error(`dequantizeBlockwise8: code must have 256 entries, got ${code.length}`);
  const res = out ?? new Float32Array(n);
  for (let i = 0; i < n; i++) res[i] = f32(code[q[i]] * absmax[Math.floor(i / blocksize)]);
  return res;
}

const defaultMaps: { signed: Float32Array | null; unsigned: Float32Array | null } = { signed: null, unsigned: null };

/** createDynamicMap(signed) with the default bits, built once and shared: callers never mutate it. */
export function defaultDynamicMap(signed: boolean): Float32Array {
  if (signed) return defaultMaps.signed ??= createDynamicMap(true);
  return defaultMaps.unsigned ??= createDynamicMap(false);
}

/** The shared default map when `code` holds the same 256 values bit for bit (signed or unsigned), else `code`:
 *  weights read from storage then share one copy of the map instead of holding 1 KiB each. */
export function sharedDynamicMap(code: Float32Array): Float32Array {
  for (const signed of [true, false]) {
    const d = defaultDynamicMap(signed);
    if (code === d) return d;
    if (code.length !== d.length) continue;
    let same = true;
    for (let i = 0; i < d.length && same; i++) same = Object.is(code[i], d[i]);
    if (same) return d;
  }
  return code;
}
