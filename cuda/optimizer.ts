// The optimizer on CUDA: the paged AdamW of cuda/src/adamw.cu (CudaPagedAdamW: state in pinned host pages,
// streamed through device staging slots) and, over it, the engine's Optimizer (CudaOptimizer, engine/train/optim.ts's
// interface), so the trainer and volunteers use it unchanged, with its state in the CPU AdamW's checkpoint format,
// so a checkpoint moves between a CPU and a GPU run.
//
// Semantics: paged_adamw_32bit = bitsandbytes' 32-bit kernel, adamw_8bit / paged_adamw_8bit =
// bitsandbytes' 8-bit blockwise kernel (tensors under 4096 elements keep fp32 state), exactly what the
// CPU AdamW implements. adamw_torch (torch's order of operations) has no CUDA kernel here: the CPU
// AdamW serves it, as it does a run with a finite host resident budget (the CPU AdamW spills pages to
// disk; the CUDA optimizer keeps all state in pinned host memory).
import type { AdamWOptions, Optimizer, OptimizerState, ParamSpec, StateTensor } from '../engine/optimizer.ts';
import { stateTensorReader } from '../engine/train/optim.ts';
import type { OptimName } from '../engine/optimizer.ts';
import { MIN_8BIT_SIZE, OPT_QUANT_BLOCK, planPagedOptimizer, type OptimizerBits, type PagedPlan } from './paging.ts';
import { CudaArgumentError, toCudaError } from './errors.ts';
import { need } from './checks.ts';
import type { Ctx, NativeCuda, OptHandle } from './native.ts';

/** AdamW hyperparameters of one step, as the kernels take them. */
export interface AdamWHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1-based optimizer step (bias corrections use beta^step) */
  step: number;
}

/** 8-bit blockwise AdamW state of one tensor (bitsandbytes layout: blocks of 256). */
export interface AdamW8bitState {
  state1: Uint8Array;   // [n] codes into the signed dynamic map
  state2: Uint8Array;   // [n] codes into the unsigned dynamic map
  absmax1: Float32Array; // [ceil(n/256)]
  absmax2: Float32Array;
}

/** Hyperparameters the kernels can take: a 1-based integer step, every other value finite. */
export function checkHyper(op: string, hp: AdamWHyper): void {
  if (!Number.isInteger(hp.step) || hp.step < 1) throw new CudaArgumentError(`CudaBackend.${op}: step=${hp.step} must be an integer >= 1`);
  for (const k of ['lr', 'beta1', 'beta2', 'eps', 'weightDecay'] as const) {
    if (!Number.isFinite(hp[k])) throw new CudaArgumentError(`CudaBackend.${op}: ${k}=${hp[k]} must be finite`);
  }
}

/** What a paged AdamW is planned from: state bit width and the device bytes its staging slots may take. */
export interface PagedAdamWOptions {
  bits: OptimizerBits;
  /** default 256 MiB */
  deviceBudgetBytes?: number;
  pageElems?: number;
  maxSlots?: number;
}

/** How the optimizer runs its device work: through its backend, which counts it in flight and types its errors. */
export type RunOp = (op: string, fn: () => Promise<void>) => Promise<void>;

/** A paged AdamW on ctx's device: pages and slots planned within the device budget, the slots allocated. */
export function openPagedAdamW(native: NativeCuda, ctx: Ctx, opts: PagedAdamWOptions, run: RunOp,
  onDestroy: () => void): CudaPagedAdamW {
  const plan = planPagedOptimizer({ bits: opts.bits, deviceBudgetBytes: opts.deviceBudgetBytes ?? 256 * 2 ** 20,
    pageElems: opts.pageElems, maxSlots: opts.maxSlots });
  let handle: OptHandle;
  try {
    handle = native.pagedCreate(ctx, opts.bits, plan.pageElems, plan.slots, plan.deviceBytes);
  } catch (e) {
    throw toCudaError(e, 'createPagedAdamW');
  }
  return new CudaPagedAdamW(native, handle, plan, opts.bits, run, onDestroy);
}

/** One paged AdamW instance: register tensors, then step each with its gradient. */
export class CudaPagedAdamW {
  readonly plan: PagedPlan;
  readonly bits: OptimizerBits;
  #native: NativeCuda;
  #handle: OptHandle | null;
  #sizes: number[] = [];
  #run: RunOp;
  #onDestroy: () => void;

  constructor(native: NativeCuda, handle: OptHandle, plan: PagedPlan, bits: OptimizerBits,
    run: RunOp, onDestroy: () => void) {
    this.#native = native;
    this.#handle = handle;
    this.plan = plan;
    this.bits = bits;
    this.#run = run;
    this.#onDestroy = onDestroy;
  }

  #h(op: string): OptHandle {
    if (!this.#handle) throw new CudaArgumentError(`CudaPagedAdamW.${op}: optimizer already destroyed`);
    return this.#handle;
  }

  /** Registers a tensor of n elements (zero state); returns its id. */
  add(n: number): number {
    const h = this.#h('add');
    if (!Number.isSafeInteger(n) || n <= 0) throw new CudaArgumentError(`CudaPagedAdamW.add: n=${n} must be a positive integer`);
    try {
      const id = this.#native.pagedAdd(h, n);
      this.#sizes[id] = n;
      return id;
    } catch (e) {
      throw toCudaError(e, 'CudaPagedAdamW.add');
    }
  }

  #size(op: string, id: number): number {
    const n = this.#sizes[id];
    if (n === undefined) throw new CudaArgumentError(`CudaPagedAdamW.${op}: unknown tensor id ${id}`);
    return n;
  }

  async step(id: number, p: Float32Array, g: Float32Array, hp: AdamWHyper): Promise<void> {
    const h = this.#h('step');
    const n = this.#size('step', id);
    checkHyper('CudaPagedAdamW.step', hp);
    if (p.length !== n || g.length !== n) {
      throw new CudaArgumentError(`CudaPagedAdamW.step: tensor ${id} has ${n} elements but p has ${p.length} and g has ${g.length}`);
    }
    await this.#run('CudaPagedAdamW.step', () => this.#native.pagedStep(h, id, p, g, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weightDecay, hp.step));
  }

  /** Copy of a tensor's state: 32-bit → {m, v}; 8-bit → {state1, state2, absmax1, absmax2}. */
  readState(id: number): { m: Float32Array; v: Float32Array } | AdamW8bitState {
    const h = this.#h('readState');
    const n = this.#size('readState', id);
    const info = this.#native.pagedStateInfo(h, id);
    const a = new Uint8Array(info.aBytes), b = new Uint8Array(info.bBytes);
    this.#native.pagedStateRead(h, id, a, b);
    if (!info.is8bit) return { m: new Float32Array(a.buffer), v: new Float32Array(b.buffer) };
    const nb = info.bBytes / 8;
    return { state1: a.subarray(0, n), state2: a.subarray(n), absmax1: new Float32Array(b.buffer, 0, nb),
      absmax2: new Float32Array(b.buffer, nb * 4, nb) };
  }

  /** Restores a tensor's state (checkpoint resume); layout as readState returns it. */
  writeState(id: number, st: { m: Float32Array; v: Float32Array } | AdamW8bitState): void {
    const h = this.#h('writeState');
    const n = this.#size('writeState', id);
    const info = this.#native.pagedStateInfo(h, id);
    const a = new Uint8Array(info.aBytes), b = new Uint8Array(info.bBytes);
    if ('m' in st) {
      if (info.is8bit) throw new CudaArgumentError(`CudaPagedAdamW.writeState: tensor ${id} keeps 8-bit state, got fp32 m/v`);
      need('writeState', 'm', st.m, n); need('writeState', 'v', st.v, n);
      a.set(new Uint8Array(st.m.buffer, st.m.byteOffset, n * 4));
      b.set(new Uint8Array(st.v.buffer, st.v.byteOffset, n * 4));
    } else {
      if (!info.is8bit) throw new CudaArgumentError(`CudaPagedAdamW.writeState: tensor ${id} keeps fp32 state, got 8-bit codes`);
      const nb = info.bBytes / 8;
      need('writeState', 'state1', st.state1, n); need('writeState', 'state2', st.state2, n);
      need('writeState', 'absmax1', st.absmax1, nb); need('writeState', 'absmax2', st.absmax2, nb);
      a.set(st.state1.subarray(0, n));
      a.set(st.state2.subarray(0, n), n);
      b.set(new Uint8Array(st.absmax1.buffer, st.absmax1.byteOffset, nb * 4));
      b.set(new Uint8Array(st.absmax2.buffer, st.absmax2.byteOffset, nb * 4), nb * 4);
    }
    this.#native.pagedStateWrite(h, id, a, b);
  }

  stats(): { hostPinnedBytes: number; deviceBytes: number } {
    return this.#native.pagedStats(this.#h('stats'));
  }

  destroy(): void {
    if (!this.#handle) return;
    this.#native.pagedDestroy(this.#handle);
    this.#handle = null;
    this.#onDestroy();
  }
}

/** What CudaOptimizer needs of CudaPagedAdamW (tests give it a host stand-in). */
export interface PagedAdamWLike {
  add(n: number): number;
  step(id: number, p: Float32Array, g: Float32Array, hp: AdamWHyper): Promise<void>;
  readState(id: number): { m: Float32Array; v: Float32Array } | AdamW8bitState;
  writeState(id: number, st: { m: Float32Array; v: Float32Array } | AdamW8bitState): void;
  destroy(): void;
}

/** The paged optimizer's bit width for an optim name, or null where only the CPU AdamW implements it. */
export function cudaOptimizerBits(opts: Pick<AdamWOptions, 'optim' | 'residentBytes'>): OptimizerBits | null {
  if (opts.residentBytes !== undefined && Number.isFinite(opts.residentBytes)) return null;
  switch (opts.optim) {
    case 'paged_adamw_32bit': return 32;
    case 'adamw_8bit': case 'paged_adamw_8bit': return 8;
    default: return null;
  }
}

export class CudaOptimizer implements Optimizer {
  readonly optim: OptimName;
  readonly device: string;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  #step = 0;
  #paged: PagedAdamWLike | null;
  readonly #params: { name: string; numel: number; id: number; eightBit: boolean }[];

  constructor(paged: PagedAdamWLike, bits: OptimizerBits, params: readonly ParamSpec[], opts: AdamWOptions, device = 'cuda') {
    for (const [k, v] of [['beta1', opts.beta1], ['beta2', opts.beta2]] as const) {
      if (!(v >= 0 && v < 1)) throw new RangeError(`CudaOptimizer: ${k} must be in [0, 1), got ${v}`);
    }
    if (!(opts.eps >= 0)) throw new RangeError(`CudaOptimizer: eps must be >= 0, got ${opts.eps}`);
    if (!(opts.weightDecay >= 0)) throw new RangeError(`CudaOptimizer: weightDecay must be >= 0, got ${opts.weightDecay}`);
    this.optim = opts.optim;
    this.device = device;
    this.beta1 = opts.beta1;
    this.beta2 = opts.beta2;
    this.eps = opts.eps;
    this.weightDecay = opts.weightDecay;
    this.#paged = paged;
    const names = new Set<string>();
    this.#params = params.map((p) => {
      if (names.has(p.name)) throw new Error(`CudaOptimizer: duplicate param name ${p.name}`);
      names.add(p.name);
      if (!Number.isInteger(p.numel) || p.numel <= 0) throw new RangeError(`CudaOptimizer: param ${p.name} has bad numel ${p.numel}`);
      return { name: p.name, numel: p.numel, id: paged.add(p.numel), eightBit: bits === 8 && p.numel >= MIN_8BIT_SIZE };
    });
  }

  get step(): number { return this.#step; }

  #opt(op: string): PagedAdamWLike {
    if (!this.#paged) throw new Error(`CudaOptimizer.${op}: optimizer already disposed`);
    return this.#paged;
  }

  async update(params: readonly Float32Array[], grads: readonly Float32Array[], lr: number): Promise<void> {
    const paged = this.#opt('update');
    if (params.length !== this.#params.length || grads.length !== this.#params.length) {
      throw new RangeError(`CudaOptimizer.update: expected ${this.#params.length} params and grads, got ${params.length} and ${grads.length}`);
    }
    if (!Number.isFinite(lr)) throw new RangeError(`CudaOptimizer.update: lr must be finite, got ${lr}`);
    for (let i = 0; i < this.#params.length; i++) {
      const s = this.#params[i]!;
      if (params[i]!.length !== s.numel || grads[i]!.length !== s.numel) {
        throw new RangeError(`CudaOptimizer.update: ${s.name} expects ${s.numel} elements, got param ${params[i]!.length}, grad ${grads[i]!.length}`);
      }
    }
    const hp = { lr, beta1: this.beta1, beta2: this.beta2, eps: this.eps, weightDecay: this.weightDecay, step: this.#step + 1 };
    for (let i = 0; i < this.#params.length; i++) await paged.step(this.#params[i]!.id, params[i]!, grads[i]!, hp);
    this.#step = hp.step;
  }

  /** the CPU AdamW's export format: per param exp_avg/exp_avg_sq (F32) or state1/state2 (U8) + absmax1/absmax2 (F32) */
  exportState(): OptimizerState {
    const paged = this.#opt('exportState');
    const tensors: StateTensor[] = [];
    for (const s of this.#params) {
      const st = paged.readState(s.id);
      if ('m' in st) {
        tensors.push({ name: `${s.name}.exp_avg`, dtype: 'F32', shape: [s.numel], data: st.m });
        tensors.push({ name: `${s.name}.exp_avg_sq`, dtype: 'F32', shape: [s.numel], data: st.v });
      } else {
        const nb = Math.ceil(s.numel / OPT_QUANT_BLOCK);
        tensors.push({ name: `${s.name}.state1`, dtype: 'U8', shape: [s.numel], data: st.state1 });
        tensors.push({ name: `${s.name}.state2`, dtype: 'U8', shape: [s.numel], data: st.state2 });
        tensors.push({ name: `${s.name}.absmax1`, dtype: 'F32', shape: [nb], data: st.absmax1 });
        tensors.push({ name: `${s.name}.absmax2`, dtype: 'F32', shape: [nb], data: st.absmax2 });
      }
    }
    return { optim: this.optim, step: this.#step, tensors };
  }

  importState(state: OptimizerState): void {
    const paged = this.#opt('importState');
    if (state.optim !== this.optim) throw new Error(`CudaOptimizer.importState: state is for optim ${state.optim}, this optimizer is ${this.optim}`);
    if (!Number.isInteger(state.step) || state.step < 0) throw new RangeError(`CudaOptimizer.importState: bad step ${state.step}`);
    const get = stateTensorReader(state, 'CudaOptimizer.importState');
    // validate everything before writing anything, so a bad state leaves the optimizer as it was
    const writes: (() => void)[] = [];
    for (const s of this.#params) {
      if (s.eightBit) {
        const nb = Math.ceil(s.numel / OPT_QUANT_BLOCK);
        const st = {
          state1: get(`${s.name}.state1`, 'U8', s.numel) as Uint8Array, state2: get(`${s.name}.state2`, 'U8', s.numel) as Uint8Array,
          absmax1: get(`${s.name}.absmax1`, 'F32', nb) as Float32Array, absmax2: get(`${s.name}.absmax2`, 'F32', nb) as Float32Array,
        };
        writes.push(() => paged.writeState(s.id, st));
      } else {
        const st = { m: get(`${s.name}.exp_avg`, 'F32', s.numel) as Float32Array, v: get(`${s.name}.exp_avg_sq`, 'F32', s.numel) as Float32Array };
        writes.push(() => paged.writeState(s.id, st));
      }
    }
    for (const w of writes) w();
    this.#step = state.step;
  }

  dispose(): void {
    this.#paged?.destroy();
    this.#paged = null;
  }
}
