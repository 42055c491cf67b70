// The engine's Optimizer on CUDA: the paged AdamW of cuda/src/adamw.cu (state in pinned host pages,
// streamed through device staging slots) behind engine/train/optim.ts's Optimizer interface, so the
// trainer and volunteers use it unchanged, and its state in the CPU AdamW's checkpoint format, so a
// checkpoint moves between a CPU and a GPU run.
//
// Semantics: paged_adamw_32bit = bitsandbytes' 32-bit kernel, adamw_8bit / paged_adamw_8bit =
// bitsandbytes' 8-bit blockwise kernel (tensors under 4096 elements keep fp32 state), exactly what the
// CPU AdamW implements. adamw_torch (torch's order of operations) has no CUDA kernel here: the CPU
// AdamW serves it, as it does a run with a finite host resident budget (the CPU AdamW spills pages to
// disk; the CUDA optimizer keeps all state in pinned host memory).
import type { AdamWOptions, Optimizer, OptimizerState, ParamSpec, StateTensor } from '../engine/optimizer.ts';
import { stateTensorReader } from '../engine/train/optim.ts';
import type { OptimName } from '../engine/optimizer.ts';
import { MIN_8BIT_SIZE, OPT_QUANT_BLOCK } from './paging.ts';
import type { OptimizerBits } from './paging.ts';

/** What CudaOptimizer needs of CudaPagedAdamW (cuda/index.ts). */
export interface PagedAdamWLike {
  add(n: number): number;
  step(id: number, p: Float32Array, g: Float32Array, hp: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number }): Promise<void>;
  readState(id: number): { m: Float32Array; v: Float32Array } | { state1: Uint8Array; state2: Uint8Array; absmax1: Float32Array; absmax2: Float32Array };
  writeState(id: number, st: { m: Float32Array; v: Float32Array } | { state1: Uint8Array; state2: Uint8Array; absmax1: Float32Array; absmax2: Float32Array }): void;
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
