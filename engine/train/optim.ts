// AdamW optimizers over named Float32Array params with paged state: torch AdamW (adamw_torch) and the
// bitsandbytes AdamW family (paged_adamw_32bit, adamw_8bit, paged_adamw_8bit) with their exact semantics (facts §3, §9).
//
// State lives in a PagedStore: each page holds the state of one contiguous element range of one param.
// Updates walk page by page, so spilling changes where bytes sit, never the arithmetic: results are
// bit-identical with any resident budget. 8-bit pages are whole multiples of the 256-element quantization
// block, so page boundaries never split a block either.
import { defaultDynamicMap, nearestCodeIndex } from '../formats/dynamic-map.ts';
import { optimName } from '../optimizer.ts';
import type { AdamWOptions, OptimName, Optimizer, OptimizerState, ParamSpec, StateTensor } from '../optimizer.ts';
import { PagedStore } from './paged.ts';
import type { PagedStoreStats } from './paged.ts';

/** bitsandbytes BLOCKSIZE_2STATE (since 0.44) */
export const OPTIM8_BLOCKSIZE = 256;
/** bitsandbytes min_8bit_size: smaller tensors keep 32-bit state */
export const MIN_8BIT_SIZE = 4096;

interface PageRef {
  id: number;
  start: number;   // first element of the param this page covers
  count: number;   // elements
}

interface ParamSlot {
  name: string;
  numel: number;
  eightBit: boolean;
  pages: PageRef[];
}

const f32 = Math.fround;
/** C's signbit: true for negatives and -0 */
const signbit = (x: number): boolean => x < 0 || Object.is(x, -0);
function codes(): { s: Float32Array; u: Float32Array } {
  return { s: defaultDynamicMap(true), u: defaultDynamicMap(false) };
}

/** A backend's optimizer when it has one for these options, else the CPU AdamW. */
export function createOptimizer(backend: { createOptimizer?(params: readonly ParamSpec[], opts: AdamWOptions): Optimizer | null },
  params: readonly ParamSpec[], opts: AdamWOptions): Optimizer {
  return backend.createOptimizer?.(params, opts) ?? new AdamW(params, opts);
}

export class AdamW implements Optimizer {
  readonly device = 'cpu';
  readonly optim: OptimName;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  /** completed optimizer steps (bias-correction t of the next step is step + 1) */
  step = 0;
  private readonly slots: ParamSlot[];
  private readonly store: PagedStore;

  constructor(params: readonly ParamSpec[], opts: AdamWOptions) {
    optimName(opts.optim, 'AdamW');
    for (const [k, v] of [['beta1', opts.beta1], ['beta2', opts.beta2]] as const) {
      if (!(v >= 0 && v < 1)) throw new RangeError(`AdamW: ${k} must be in [0, 1), got ${v}`);
    }
    if (!(opts.eps >= 0)) throw new RangeError(`AdamW: eps must be >= 0, got ${opts.eps}`);
    if (!(opts.weightDecay >= 0)) throw new RangeError(`AdamW: weightDecay must be >= 0, got ${opts.weightDecay}`);
    this.optim = opts.optim;
    this.beta1 = opts.beta1;
    this.beta2 = opts.beta2;
    this.eps = opts.eps;
    this.weightDecay = opts.weightDecay;
    this.store = new PagedStore({ residentBytes: opts.residentBytes ?? Infinity, spillDir: opts.spillDir });
    const pageBytes = opts.pageBytes ?? 1 << 20;
    const is8 = this.optim === 'adamw_8bit' || this.optim === 'paged_adamw_8bit';
    const names = new Set<string>();
    this.slots = params.map((p) => {
      if (names.has(p.name)) throw new Error(`AdamW: duplicate param name ${p.name}`);
      names.add(p.name);
      if (!Number.isInteger(p.numel) || p.numel <= 0) throw new RangeError(`AdamW: param ${p.name} has bad numel ${p.numel}`);
      const eightBit = is8 && p.numel >= MIN_8BIT_SIZE;
      const perPage = elementsPerPage(pageBytes, eightBit);
      const pages: PageRef[] = [];
      for (let start = 0; start < p.numel; start += perPage) {
        const count = Math.min(perPage, p.numel - start);
        pages.push({ id: this.store.allocate(pageByteSize(count, eightBit)), start, count });
      }
      return { name: p.name, numel: p.numel, eightBit, pages };
    });
  }

  get paramNames(): string[] {
    return this.slots.map((s) => s.name);
  }

  storeStats(): PagedStoreStats {
    return this.store.stats();
  }

  /** One optimizer step: params and grads aligned with the ParamSpec list; lr for this step. */
  update(params: readonly Float32Array[], grads: readonly Float32Array[], lr: number): void {
    if (params.length !== this.slots.length || grads.length !== this.slots.length) {
      throw new RangeError(`AdamW.update: expected ${this.slots.length} params and grads, got ${params.length} and ${grads.length}`);
    }
    if (!Number.isFinite(lr)) throw new RangeError(`AdamW.update: lr must be finite, got ${lr}`);
    const t = this.step + 1;
    for (let i = 0; i < this.slots.length; i++) {
      const slot = this.slots[i];
      const p = params[i], g = grads[i];
      if (p.length !== slot.numel || g.length !== slot.numel) {
        throw new RangeError(`AdamW.update: ${slot.name} expects ${slot.numel} elements, got param ${p.length}, grad ${g.length}`);
      }
      for (const page of slot.pages) {
        this.store.use(page.id, (bytes) => {
          if (slot.eightBit) this.update8bit(bytes, page, p, g, lr, t);
          else if (this.optim === 'adamw_torch') this.updateTorch(bytes, page, p, g, lr, t);
          else this.updateBnb32(bytes, page, p, g, lr, t);
        });
      }
    }
    this.step = t;
  }

  /** torch.optim.AdamW (decoupled decay first, then the Adam step). */
  private updateTorch(bytes: Uint8Array, page: PageRef, p: Float32Array, g: Float32Array, lr: number, t: number): void {
    const { m, v } = f32State(bytes, page.count);
    const b1 = this.beta1, b2 = this.beta2;
    const bc1 = 1 - b1 ** t, bc2 = 1 - b2 ** t;
    const stepSize = lr / bc1, bc2Sqrt = Math.sqrt(bc2);
    const decay = 1 - lr * this.weightDecay;
    for (let j = 0; j < page.count; j++) {
      const i = page.start + j;
      const gi = g[i];
      const pi = f32(p[i] * decay);
      const mi = m[j] = f32(m[j] + (gi - m[j]) * (1 - b1)); // lerp_ as torch does
      const vi = v[j] = f32(v[j] * b2 + (1 - b2) * gi * gi);
      const denom = f32(f32(Math.sqrt(vi) / bc2Sqrt) + this.eps);
      p[i] = f32(pi - stepSize * (mi / denom));
    }
  }

  /** A bitsandbytes Adam step's terms as its kernels see them: lr, betas, eps and weight decay arrive as
   *  float32 arguments, so 1 - β2 is 1 - fround(0.999), 1.3e-5 relative away from 1 - 0.999 (float64
   *  hyperparameters put that bias on every v); the bias corrections are computed exactly from those. */
  private bnbTerms(lr: number, t: number): { b1: number; b2: number; stepSize: number; epsC: number; wd: number; lr32: number } {
    const b1 = f32(this.beta1), b2 = f32(this.beta2), lr32 = f32(lr);
    const c1 = 1 - b1 ** t, c2 = Math.sqrt(1 - b2 ** t);
    return { b1, b2, stepSize: -lr32 * c2 / c1, epsC: f32(this.eps) * c2, wd: f32(this.weightDecay), lr32 };
  }

  /** bitsandbytes 32-bit Adam kernel: eps scaled by sqrt(1-β2^t), decay after the step, non-finite grads skip. */
  private updateBnb32(bytes: Uint8Array, page: PageRef, p: Float32Array, g: Float32Array, lr: number, t: number): void {
    const { m, v } = f32State(bytes, page.count);
    const { b1, b2, stepSize, epsC, wd, lr32 } = this.bnbTerms(lr, t);
    for (let j = 0; j < page.count; j++) {
      const i = page.start + j;
      const gi = g[i];
      if (!Number.isFinite(gi)) continue;
      const mi = m[j] = f32(m[j] * b1 + (1 - b1) * gi);
      const vi = v[j] = f32(v[j] * b2 + (1 - b2) * gi * gi);
      let pi = f32(p[i] + stepSize * (mi / (Math.sqrt(vi) + epsC)));
      if (wd > 0) pi = f32(pi * (1 - lr32 * wd));
      p[i] = pi;
    }
  }

  /** bitsandbytes kOptimizerStatic8bit2StateBlockwise: dequantize, update in float, new block absmax,
   *  requantize (signed map for m with the sign fix, unsigned for v). A non-finite grad zeroes that
   *  element's state and leaves the param. */
  private update8bit(bytes: Uint8Array, page: PageRef, p: Float32Array, g: Float32Array, lr: number, t: number): void {
    const st = u8State(bytes, page.count);
    const { s: code1, u: code2 } = codes();
    const { b1, b2, stepSize, epsC, wd, lr32 } = this.bnbTerms(lr, t);
    const s1 = new Float32Array(OPTIM8_BLOCKSIZE), s2 = new Float32Array(OPTIM8_BLOCKSIZE);
    const zero1 = nearestCodeIndex(code1, 0), zero2 = nearestCodeIndex(code2, 0);
    for (let b = 0; b * OPTIM8_BLOCKSIZE < page.count; b++) {
      const j0 = b * OPTIM8_BLOCKSIZE, n = Math.min(OPTIM8_BLOCKSIZE, page.count - j0);
      const a1 = st.absmax1[b], a2 = st.absmax2[b];
      let max1 = 0, max2 = 0;
      for (let k = 0; k < n; k++) {
        const j = j0 + k, i = page.start + j, gi = g[i];
        if (Number.isFinite(gi)) {
          s1[k] = f32(f32(code1[st.q1[j]] * a1) * b1 + (1 - b1) * gi);
          s2[k] = f32(f32(code2[st.q2[j]] * a2) * b2 + (1 - b2) * gi * gi);
          let pi = f32(p[i] + stepSize * (s1[k] / (Math.sqrt(s2[k]) + epsC)));
          if (wd > 0) pi = f32(pi * (1 - lr32 * wd));
          p[i] = pi;
        } else {
          s1[k] = 0;
          s2[k] = 0;
        }
        max1 = Math.max(max1, Math.abs(s1[k]));
        max2 = Math.max(max2, s2[k]);
      }
      st.absmax1[b] = max1;
      st.absmax2[b] = max2;
      // bnb multiplies by 1/absmax; an all-zero block (e.g. lora_A's grads while B is still 0) would give
      // 0·inf = NaN there, so it stores the code of 0 instead
      const inv1 = max1 > 0 ? f32(1 / max1) : 0, inv2 = max2 > 0 ? f32(1 / max2) : 0;
      for (let k = 0; k < n; k++) {
        const j = j0 + k;
        if (max1 > 0) {
          let c = nearestCodeIndex(code1, f32(s1[k] * inv1));
          // bnb: `if (signbit(code[c]) != signbit(s1)) c += s1 > 0 ? 1 : -1` — so a negative s1 whose
          // nearest code is +0 moves to the smallest negative code (a positive one stays at 0)
          if (signbit(code1[c]!) !== signbit(s1[k]!)) c += s1[k]! > 0 ? 1 : -1;
          st.q1[j] = c;
        } else st.q1[j] = zero1;
        st.q2[j] = max2 > 0 ? nearestCodeIndex(code2, f32(s2[k] * inv2)) : zero2;
      }
    }
  }

  /** State as named tensors (per param: exp_avg/exp_avg_sq as F32, or the 8-bit codes and block absmax),
   *  independent of the page size, so a checkpoint loads under any budget or page size. */
  exportState(): OptimizerState {
    const tensors: StateTensor[] = [];
    for (const slot of this.slots) {
      if (slot.eightBit) {
        const nb = Math.ceil(slot.numel / OPTIM8_BLOCKSIZE);
        const q1 = new Uint8Array(slot.numel), q2 = new Uint8Array(slot.numel);
        const a1 = new Float32Array(nb), a2 = new Float32Array(nb);
        for (const page of slot.pages) {
          this.store.use(page.id, (bytes) => {
            const st = u8State(bytes, page.count);
            q1.set(st.q1, page.start);
            q2.set(st.q2, page.start);
            a1.set(st.absmax1, page.start / OPTIM8_BLOCKSIZE);
            a2.set(st.absmax2, page.start / OPTIM8_BLOCKSIZE);
          }, { write: false });
        }
        tensors.push({ name: `${slot.name}.state1`, dtype: 'U8', shape: [slot.numel], data: q1 });
        tensors.push({ name: `${slot.name}.state2`, dtype: 'U8', shape: [slot.numel], data: q2 });
        tensors.push({ name: `${slot.name}.absmax1`, dtype: 'F32', shape: [nb], data: a1 });
        tensors.push({ name: `${slot.name}.absmax2`, dtype: 'F32', shape: [nb], data: a2 });
      } else {
        const m = new Float32Array(slot.numel), v = new Float32Array(slot.numel);
        for (const page of slot.pages) {
          this.store.use(page.id, (bytes) => {
            const st = f32State(bytes, page.count);
            m.set(st.m, page.start);
            v.set(st.v, page.start);
          }, { write: false });
        }
        tensors.push({ name: `${slot.name}.exp_avg`, dtype: 'F32', shape: [slot.numel], data: m });
        tensors.push({ name: `${slot.name}.exp_avg_sq`, dtype: 'F32', shape: [slot.numel], data: v });
      }
    }
    return { optim: this.optim, step: this.step, tensors };
  }

  /** Load what exportState produced (same optim and param list); errors name the missing/mismatched tensor. */
  importState(state: OptimizerState): void {
    if (state.optim !== this.optim) throw new Error(`AdamW.importState: state is for optim ${state.optim}, this optimizer is ${this.optim}`);
    if (!Number.isInteger(state.step) || state.step < 0) throw new RangeError(`AdamW.importState: bad step ${state.step}`);
    const get = stateTensorReader(state, 'AdamW.importState');
    for (const slot of this.slots) {
      if (slot.eightBit) {
        const nb = Math.ceil(slot.numel / OPTIM8_BLOCKSIZE);
        const q1 = get(`${slot.name}.state1`, 'U8', slot.numel) as Uint8Array;
        const q2 = get(`${slot.name}.state2`, 'U8', slot.numel) as Uint8Array;
        const a1 = get(`${slot.name}.absmax1`, 'F32', nb) as Float32Array;
        const a2 = get(`${slot.name}.absmax2`, 'F32', nb) as Float32Array;
        for (const page of slot.pages) {
          this.store.use(page.id, (bytes) => {
            const st = u8State(bytes, page.count);
            st.q1.set(q1.subarray(page.start, page.start + page.count));
            st.q2.set(q2.subarray(page.start, page.start + page.count));
            const b0 = page.start / OPTIM8_BLOCKSIZE, nbp = st.absmax1.length;
            st.absmax1.set(a1.subarray(b0, b0 + nbp));
            st.absmax2.set(a2.subarray(b0, b0 + nbp));
          });
        }
      } else {
        const m = get(`${slot.name}.exp_avg`, 'F32', slot.numel) as Float32Array;
        const v = get(`${slot.name}.exp_avg_sq`, 'F32', slot.numel) as Float32Array;
        for (const page of slot.pages) {
          this.store.use(page.id, (bytes) => {
            const st = f32State(bytes, page.count);
            st.m.set(m.subarray(page.start, page.start + page.count));
            st.v.set(v.subarray(page.start, page.start + page.count));
          });
        }
      }
    }
    this.step = state.step;
  }

  dispose(): void {
    this.store.dispose();
  }
}

/** A lookup of an exported state's tensors by name that checks dtype and length; errors name `who`
 *  and the tensor. */
export function stateTensorReader(state: OptimizerState, who: string): (name: string, dtype: 'F32' | 'U8', len: number) => Float32Array | Uint8Array {
  const byName = new Map(state.tensors.map((t) => [t.name, t]));
  return (name, dtype, len) => {
    const t = byName.get(name);
    if (!t) throw new Error(`${who}: missing optimizer tensor ${name}`);
    if (t.dtype !== dtype || t.data.length !== len) {
      throw new Error(`${who}: ${name} expected ${dtype}[${len}], got ${t.dtype}[${t.data.length}]`);
    }
    return t.data;
  };
}

/** Elements per page: 32-bit state is 8 B/element; 8-bit is 2 B/element + 8 B per 256-element block.
 *  Always whole blocks so 8-bit blocks match a whole-tensor quantization. */
export function elementsPerPage(pageBytes: number, eightBit: boolean): number {
  const perBlock = eightBit ? 2 * OPTIM8_BLOCKSIZE + 8 : 8 * OPTIM8_BLOCKSIZE;
  return Math.max(1, Math.floor(pageBytes / perBlock)) * OPTIM8_BLOCKSIZE;
}

function pageByteSize(count: number, eightBit: boolean): number {
  if (!eightBit) return 8 * count;
  const nb = Math.ceil(count / OPTIM8_BLOCKSIZE);
  return 8 * nb + align4(count) * 2;
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

function f32State(bytes: Uint8Array, count: number): { m: Float32Array; v: Float32Array } {
  return {
    m: new Float32Array(bytes.buffer, bytes.byteOffset, count),
    v: new Float32Array(bytes.buffer, bytes.byteOffset + 4 * count, count),
  };
}

/** Layout: absmax1[nb] f32, absmax2[nb] f32, q1[count] u8, q2[count] u8 (floats first for alignment). */
function u8State(bytes: Uint8Array, count: number): { absmax1: Float32Array; absmax2: Float32Array; q1: Uint8Array; q2: Uint8Array } {
  const nb = Math.ceil(count / OPTIM8_BLOCKSIZE);
  const o = bytes.byteOffset;
  return {
    absmax1: new Float32Array(bytes.buffer, o, nb),
    absmax2: new Float32Array(bytes.buffer, o + 4 * nb, nb),
    q1: new Uint8Array(bytes.buffer, o + 8 * nb, count),
    q2: new Uint8Array(bytes.buffer, o + 8 * nb + align4(count), count),
  };
}
