// Learning-rate schedules with Hugging Face Trainer semantics (facts §9), shared by the trainer and the coordinator.

export const LR_SCHEDULER_TYPES = ['linear', 'cosine', 'constant', 'constant_with_warmup'] as const;
export type LrSchedulerType = typeof LR_SCHEDULER_TYPES[number];

/** HF get_warmup_steps: an explicit warmup_steps > 0 wins, otherwise ceil(warmup_ratio × total steps). */
export function warmupStepsFor(totalSteps: number, warmupSteps: number, warmupRatio: number): number {
  if (warmupSteps > 0) return warmupSteps;
  return Math.ceil(warmupRatio * totalSteps);
}

/** Multiplier λ(step) of the base learning rate. `step` is the scheduler counter: 0 on the first
 *  optimizer step (so a warmup makes the first step's lr exactly 0, as in transformers). */
export function lrLambda(type: LrSchedulerType, step: number, warmupSteps: number, totalSteps: number): number {
  const W = warmupSteps, N = totalSteps;
  if (type === 'constant') return 1;
  if (step < W) return step / Math.max(1, W);
  switch (type) {
    case 'constant_with_warmup':
      return 1;
    case 'linear':
      return Math.max(0, (N - step) / Math.max(1, N - W));
    case 'cosine': {
      const progress = (step - W) / Math.max(1, N - W);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
    }
    default:
      throw new RangeError(`lrLambda: unknown lr_scheduler_type "${type as string}"; expected one of ${LR_SCHEDULER_TYPES.join(', ')}`);
  }
}

/** The learning rate used by optimizer step `step` (0-based). */
export function learningRateAt(baseLr: number, type: LrSchedulerType, step: number, warmupSteps: number, totalSteps: number): number {
  return baseLr * lrLambda(type, step, warmupSteps, totalSteps);
}
