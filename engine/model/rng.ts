// Seeded, platform-independent PRNG (xoshiro128**) so every machine derives identical LoRA inits and dropout masks.
//
// Only 32-bit integer ops (Math.imul, >>>) drive the state, so the integer stream is bit-identical on
// every JS engine. Floats are built from 24 random bits (exact in float32 and float64). normal() uses
// Math.log/cos, which V8 implements with a portable fdlibm port, so it is reproducible across machines
// running the same Node major version.

/** murmur3 fmix32 finalizer: a bijective 32-bit avalanche mixer. */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Mix any number of integer parts (each a safe integer, possibly > 2^32 or negative) into one 32-bit seed.
 *  Order matters: hashSeed(1, 2) != hashSeed(2, 1). */
export function hashSeed(...parts: number[]): number {
  let h = 0x9e3779b9;
  for (const p of parts) {
    if (!Number.isSafeInteger(p)) throw new RangeError(`hashSeed: part ${p} is not a safe integer`);
    const lo = p >>> 0; // low 32 bits (two's complement for negatives)
    const hi = Math.floor(p / 4294967296) >>> 0;
    h = fmix32((h ^ lo) + 0x7f4a7c15);
    h = fmix32((h ^ hi) + 0x165667b1);
  }
  return h;
}

/** splitmix32 step, used only to expand a 32-bit seed into the 128-bit xoshiro state. */
function splitmix32(state: { s: number }): number {
  state.s = (state.s + 0x9e3779b9) >>> 0;
  let z = state.s;
  z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
  z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
  return (z ^ (z >>> 15)) >>> 0;
}

/** xoshiro128** generator. `new Rng(seed, ...streams)` gives an independent stream per key tuple. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  private spareNormal: number | null = null;

  constructor(seed: number, ...streams: number[]) {
    const sm = { s: hashSeed(seed, ...streams) };
    this.a = splitmix32(sm);
    this.b = splitmix32(sm);
    this.c = splitmix32(sm);
    this.d = splitmix32(sm);
    // the all-zero state is a fixed point of xoshiro
    if ((this.a | this.b | this.c | this.d) === 0) this.a = 1;
  }

  /** uniform 32-bit unsigned integer */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return result;
  }

  /** out[i] = the next out.length values of nextU32(), with the state kept in locals (≈4x faster in bulk) */
  fillU32(out: Uint32Array): Uint32Array {
    let a = this.a, b = this.b, c = this.c, d = this.d;
    for (let i = 0; i < out.length; i++) {
      const m = Math.imul(b, 5);
      out[i] = Math.imul((m << 7) | (m >>> 25), 9);
      const t = b << 9;
      c ^= a;
      d ^= b;
      b ^= c;
      a ^= d;
      c ^= t;
      d = (d << 11) | (d >>> 21);
    }
    this.a = a; this.b = b; this.c = c; this.d = d;
    return out;
  }

  /** uniform in [0, 1) with 24 random bits (exactly representable in float32) */
  nextFloat(): number {
    return (this.nextU32() >>> 8) * 5.9604644775390625e-8; // 2^-24
  }

  /** uniform in [lo, hi) */
  uniform(lo: number, hi: number): number {
    return lo + (hi - lo) * this.nextFloat();
  }

  /** standard normal via Box–Muller (pairs cached) */
  normal(): number {
    if (this.spareNormal !== null) {
      const z = this.spareNormal;
      this.spareNormal = null;
      return z;
    }
    // 1 - u keeps the log argument in (0, 1]
    const u1 = 1 - this.nextFloat();
    const u2 = this.nextFloat();
    const rad = Math.sqrt(-2 * Math.log(u1));
    const theta = 2 * Math.PI * u2;
    this.spareNormal = rad * Math.sin(theta);
    return rad * Math.cos(theta);
  }

  /** fill with uniform [lo, hi) values */
  fillUniform(out: Float32Array, lo: number, hi: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = lo + (hi - lo) * this.nextFloat();
    return out;
  }

  /** fill with N(mean, std²) values */
  fillNormal(out: Float32Array, mean: number, std: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = mean + std * this.normal();
    return out;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
