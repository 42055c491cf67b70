// The optimizer contract between the trainer, the volunteers and the backends: optimizer names, AdamW
// options, the params an optimizer updates and its exported state. The CPU AdamW is engine/train/optim.ts;
// a backend may bring its own (`Backend.createOptimizer`, e.g. CUDA's paged optimizer).

/** Hugging Face TrainingArguments `optim` values this engine implements. */
export const OPTIM_NAMES = ['adamw_torch', 'paged_adamw_32bit', 'adamw_8bit', 'paged_adamw_8bit'] as const;
export type OptimName = typeof OPTIM_NAMES[number];

/** `name` as an OptimName; names from outside the engine (the wire, a hand-made options object) are checked
 *  here, so every caller refuses an unknown one with the same RangeError. */
export function optimName(name: string, what: string): OptimName {
  if (!(OPTIM_NAMES as readonly string[]).includes(name)) throw new RangeError(`${what}: unknown optim "${name}"; expected ${OPTIM_NAMES.join(', ')}`);
  return name as OptimName;
}

export interface AdamWOptions {
  optim: OptimName;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** target page size in bytes (rounded to whole 256-element blocks) */
  pageBytes?: number;
  /** resident budget for state pages; Infinity (default) never spills */
  residentBytes?: number;
  /** where pages past the budget go */
  spillDir?: string;
}

export interface ParamSpec {
  name: string;
  numel: number;
}

/** One state tensor in exported form (safetensors-ready). */
export interface StateTensor {
  name: string;
  dtype: 'F32' | 'U8';
  shape: number[];
  data: Float32Array | Uint8Array;
}

export interface OptimizerState {
  optim: OptimName;
  step: number;
  tensors: StateTensor[];
}

/** What the trainer and the volunteers need from an optimizer: the CPU AdamW below, or a backend's own
 *  (CUDA's paged optimizer, `Backend.createOptimizer`) with the same semantics and state format, so
 *  checkpoints move between them. */
export interface Optimizer {
  readonly optim: OptimName;
  /** completed optimizer steps */
  readonly step: number;
  /** where the update runs, for logs: 'cpu' or the backend's name */
  readonly device: string;
  /** One optimizer step: params updated in place, aligned with the ParamSpec list; lr for this step. */
  update(params: readonly Float32Array[], grads: readonly Float32Array[], lr: number): void | Promise<void>;
  exportState(): OptimizerState | Promise<OptimizerState>;
  importState(state: OptimizerState): void | Promise<void>;
  dispose(): void;
}
