// The volunteer's optimizer: the trainer's AdamW family (paged state) over this stage's LoRA tensors,
// with its state serialized for the coordinator's checkpoints and reloaded for a rollback.
import { Packr, Unpackr } from 'msgpackr';
import { createOptimizer } from '../engine/train/optim.ts';
import { OPTIM_NAMES, optimName } from '../engine/optimizer.ts';
import type { AdamWOptions, Optimizer, ParamSpec } from '../engine/optimizer.ts';
import type { OptimizerState, StateTensor } from '../engine/optimizer.ts';
import type { NamedTensor } from '../engine/types.ts';
import type { Backend } from '../engine/backend.ts';
import type { OptimSpec } from '../protocol/messages.ts';
import { arr, bytes, int, obj, oneOf, str } from '../protocol/schema.ts';

/** The optimizer a stage applies to its own LoRA tensors (the trainer's optimizers implement it). */
export interface ShardOptimizer {
  step(grads: Float32Array[], lr: number): Promise<void> | void;
  /** the full optimizer state (moments, step count) in the trainer's checkpoint format */
  saveState(): Promise<Uint8Array> | Uint8Array;
  /** replace the whole state (moments, step count) with bytes saveState produced: a rollback */
  loadState(bytes: Uint8Array): Promise<void> | void;
}

/** Makes a stage's optimizer (tests inject their own). */
export type OptimizerFactory = (spec: OptimSpec, params: NamedTensor[], opts: { spillDir: string; state: Uint8Array | null; backend?: Backend }) => Promise<ShardOptimizer>;

const packr = new Packr({ useRecords: false, moreTypes: false, structuredClone: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number', structuredClone: false });

const stateSchema = obj({
  optim: oneOf(OPTIM_NAMES),
  step: int(0, 2 ** 31 - 1),
  tensors: arr(obj({
    name: str({ max: 512 }),
    dtype: oneOf(['F32', 'U8'] as const),
    shape: arr(int(0, 2 ** 31 - 1), 4),
    data: bytes(2 ** 31 - 1),
  }), 1 << 20),
});

/** msgpack of {optim, step, tensors: [{name, dtype, shape, data (little-endian bytes)}]}. */
export function encodeOptimizerState(s: OptimizerState): Uint8Array {
  return packr.pack({
    optim: s.optim, step: s.step,
    tensors: s.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) })),
  });
}

export function decodeOptimizerState(b: Uint8Array, what: string): OptimizerState {
  const s = stateSchema(unpackr.unpack(b), what);
  const tensors: StateTensor[] = s.tensors.map((t) => {
    const copy = new Uint8Array(t.data); // aligned copy
    return { name: t.name, dtype: t.dtype, shape: t.shape, data: t.dtype === 'F32' ? new Float32Array(copy.buffer, 0, copy.length >> 2) : copy };
  });
  return { optim: s.optim, step: s.step, tensors };
}

export async function createShardOptimizer(spec: OptimSpec, params: NamedTensor[], opts: {
  spillDir: string; state: Uint8Array | null;
  /** the stage's backend: its own optimizer (CUDA's paged AdamW) is used where it has one */
  backend?: { createOptimizer?(params: readonly ParamSpec[], opts: AdamWOptions): Optimizer | null };
}): Promise<ShardOptimizer> {
  const paged = spec.optim.startsWith('paged_') && spec.residentBytes > 0;
  const adam = createOptimizer(opts.backend ?? {}, params.map((p) => ({ name: p.name, numel: p.data.length })), {
    optim: optimName(spec.optim, 'assignment'), beta1: spec.adamBeta1, beta2: spec.adamBeta2, eps: spec.adamEpsilon, weightDecay: spec.weightDecay,
    residentBytes: paged ? spec.residentBytes : Infinity, spillDir: paged ? opts.spillDir : undefined,
  });
  if (opts.state !== null) await adam.importState(decodeOptimizerState(opts.state, 'optimizer state'));
  return {
    // params' data is read at call time: the stage owns the arrays and updates land in place
    step: (grads, lr) => adam.update(params.map((p) => p.data), grads, lr),
    saveState: async () => encodeOptimizerState(await adam.exportState()),
    // a rollback to the state before the last update (coordinator restart): moments and step count
    loadState: async (b) => adam.importState(decodeOptimizerState(b, 'optimizer state to restore')),
  };
}
