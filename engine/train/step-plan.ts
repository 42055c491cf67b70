// One optimizer step's work, defined once for the local trainer and the swarm coordinator: its micro-batches and loss scale.

/** Label value of a position that is not trained (padding, prompt tokens): as torch's cross-entropy ignore_index. */
export const IGNORE_INDEX = -100;

/** One micro-batch as the data pipeline hands it over: right padded, labels already shifted. */
export interface MicroBatch {
  batch: number;
  seqLen: number;
  /** (batch * seqLen) token ids, right padded */
  ids: Int32Array;
  /** (batch * seqLen) shifted targets, IGNORE_INDEX on padding and untrained positions */
  labels: Int32Array;
  /** packing: batch 1, the lengths of the examples in the row (engine/train/packing.ts) */
  segments?: Int32Array;
  /** the example index of each row (B), the same on every epoch's visit: a delta wire codec keys its
   *  cached activations by it (protocol/codecs/delta-cache.ts); absent for packed rows */
  samples?: readonly number[];
}

/** The micro-batches of optimizer step `step` (0-based) and what every one of them is scaled by. */
export interface StepPlan<M extends MicroBatch = MicroBatch> {
  step: number;
  microBatches: readonly M[];
  /** trained positions of the whole step */
  labelTokens: number;
  /** 1 / labelTokens: each micro-batch's summed token loss times this gives the step's mean token loss
   *  (TRL SFT: Σ token losses / all label tokens of the step), so gradients need no rescaling after
   *  accumulation. 0 for a step without label tokens: it contributes no gradient. */
  lossScale: number;
}

/** Positions of a micro-batch that are trained (label not IGNORE_INDEX). */
export function labelTokensOf(mb: MicroBatch): number {
  let n = 0;
  for (let i = 0; i < mb.labels.length; i++) if (mb.labels[i]! !== IGNORE_INDEX) n++;
  return n;
}

export function planStep<M extends MicroBatch>(step: number, microBatches: readonly M[]): StepPlan<M> {
  let labelTokens = 0;
  for (const mb of microBatches) labelTokens += labelTokensOf(mb);
  return { step, microBatches, labelTokens, lossScale: labelTokens > 0 ? 1 / labelTokens : 0 };
}

/** The step's mean token loss from the micro-batches' summed token losses (0 without label tokens). */
export function stepLoss(plan: StepPlan<MicroBatch>, lossSum: number): number {
  return plan.labelTokens > 0 ? lossSum / plan.labelTokens : 0;
}
