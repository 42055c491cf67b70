// Independent TS reference of bitsandbytes AdamW (32-bit and 8-bit blockwise, facts §3) for the GPU optimizer checks.
//
// Written from the facts file, not from the CUDA code: float64 arithmetic, dynamic maps from
// create_dynamic_map's definition, nearest-code quantization with the sign-preserving bump.

export interface Hyper { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number }

/** The hyperparameters as the kernels (and bitsandbytes) receive them: float32 (stc_adamw_hparams). In float64,
 *  1 - 0.999 is 1.29e-5 relative away from 1 - fround(0.999), more than the tests' tolerance on v. */
function f32(hp: Hyper): Hyper {
  const f = Math.fround;
  return { lr: f(hp.lr), beta1: f(hp.beta1), beta2: f(hp.beta2), eps: f(hp.eps), weightDecay: f(hp.weightDecay), step: hp.step };
}

/** create_dynamic_map(signed, max_exponent_bits=7, total_bits=8), 256 sorted values rounded to float32. */
export function dynamicMap(signed: boolean): Float32Array {
  const data: number[] = [];
  for (let i = 0; i < 7; i++) {
    const n = signed ? 2 ** i + 1 : 2 ** (i + 1) + 1;
    const bounds = Array.from({ length: n }, (_, k) => 0.1 + (0.9 * k) / (n - 1));
    for (let k = 0; k + 1 < n; k++) {
      const mean = (bounds[k] + bounds[k + 1]) / 2;
      data.push(10 ** (-6 + i) * mean);
      if (signed) data.push(-(10 ** (-6 + i)) * mean);
    }
  }
  data.push(0, 1);
  data.sort((a, b) => a - b);
  if (data.length !== 256) throw new Error(`dynamicMap: ${data.length} values`);
  return Float32Array.from(data);
}

export const Q_SIGNED = dynamicMap(true);
export const Q_UNSIGNED = dynamicMap(false);

function nearest(code: Float32Array, x: number): number {
  let best = 0;
  for (let i = 1; i < 256; i++) if (Math.abs(code[i] - x) < Math.abs(code[best] - x)) best = i;
  return best;
}

function corrections(hp: Hyper): { stepSize: number; epsC2: number } {
  const c1 = 1 - hp.beta1 ** hp.step, c2 = Math.sqrt(1 - hp.beta2 ** hp.step);
  return { stepSize: (-hp.lr * c2) / c1, epsC2: hp.eps * c2 };
}

/** bitsandbytes 32-bit Adam with decoupled decay applied after the step; a non-finite gradient leaves
 *  p, m and v untouched (the CPU trainer's rule, engine/train/optim.ts). */
export function adamw32Ref(p: Float32Array, g: Float32Array, m: Float32Array, v: Float32Array, hp64: Hyper): void {
  const hp = f32(hp64);
  const { stepSize, epsC2 } = corrections(hp);
  for (let i = 0; i < p.length; i++) {
    if (!Number.isFinite(g[i])) continue;
    m[i] = hp.beta1 * m[i] + (1 - hp.beta1) * g[i];
    v[i] = hp.beta2 * v[i] + (1 - hp.beta2) * g[i] * g[i];
    let pi = p[i] + stepSize * (m[i] / (Math.sqrt(v[i]) + epsC2));
    if (hp.weightDecay > 0) pi *= 1 - hp.lr * hp.weightDecay;
    p[i] = pi;
  }
}

/** 8-bit blockwise (256) AdamW; non-finite gradients reset both states and leave p unchanged. `pre`, when
 *  given, receives the updated states before requantization (what each code stands for), so a check can
 *  tell a code that sits on a midpoint from a wrong one. */
export function adamw8bitRef(p: Float32Array, g: Float32Array, s1: Uint8Array, s2: Uint8Array, absmax1: Float32Array,
  absmax2: Float32Array, hp64: Hyper, pre?: { m: Float64Array; v: Float64Array }): void {
  const hp = f32(hp64);
  const { stepSize, epsC2 } = corrections(hp);
  const n = p.length;
  for (let b = 0; b * 256 < n; b++) {
    const lo = b * 256, hi = Math.min(n, lo + 256);
    const m = new Float64Array(hi - lo), v = new Float64Array(hi - lo);
    let a1 = 0, a2 = 0;
    for (let i = lo; i < hi; i++) {
      const gi = g[i];
      if (Number.isFinite(gi)) {
        v[i - lo] = Q_UNSIGNED[s2[i]] * absmax2[b] * hp.beta2 + (1 - hp.beta2) * gi * gi;
        m[i - lo] = Q_SIGNED[s1[i]] * absmax1[b] * hp.beta1 + (1 - hp.beta1) * gi;
        let pi = p[i] + stepSize * (m[i - lo] / (Math.sqrt(v[i - lo]) + epsC2));
        if (hp.weightDecay > 0) pi *= 1 - hp.lr * hp.weightDecay;
        p[i] = pi;
      }
      a1 = Math.max(a1, Math.abs(m[i - lo]));
      a2 = Math.max(a2, Math.abs(v[i - lo]));
    }
    absmax1[b] = a1;
    absmax2[b] = a2;
    if (pre) { pre.m.set(m, lo); pre.v.set(v, lo); }
    for (let i = lo; i < hi; i++) {
      const mi = m[i - lo];
      let c1 = nearest(Q_SIGNED, a1 > 0 ? mi / a1 : 0);
      const codeNeg = Q_SIGNED[c1] < 0 || Object.is(Q_SIGNED[c1], -0);
      if (codeNeg !== (mi < 0 || Object.is(mi, -0))) c1 += mi > 0 ? 1 : -1;
      s1[i] = c1;
      s2[i] = nearest(Q_UNSIGNED, a2 > 0 ? v[i - lo] / a2 : 0);
    }
  }
}
