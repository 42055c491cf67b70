// Evaluation during training as transformers' Trainer does it: when to evaluate (eval_strategy, eval_steps),
// eval_loss as Trainer.evaluate computes it, and the best checkpoint for load_best_model_at_end.
import type { StageInput } from '../types.ts';
import { collate } from './data.ts';
import type { TokenizedExample } from './data.ts';
import { ConfigError } from './config.ts';
import type { TrainConfig } from './config.ts';

export class EvalError extends Error {
  override readonly name = 'EvalError';
}

/** What one evaluation reports (HF's metric names; eval_tokens and eval_samples are ours). */
export interface EvalMetrics {
  /** Trainer.evaluate's eval_loss: the mean over samples of their batch's mean token loss */
  eval_loss: number;
  eval_runtime: number;
  eval_samples_per_second: number;
  eval_steps_per_second: number;
  /** scored (non −100) label tokens */
  eval_tokens: number;
  eval_samples: number;
}

/** The event `train --json` and `launch --json` print after an evaluation (and what the log keeps). */
export interface EvalEvent extends EvalMetrics {
  event: 'eval';
  step: number;
  epoch: number;
}

/** eval_steps as a number of steps: HF's default is logging_steps; a fraction < 1 is ceil(total × it). */
export function evalInterval(cfg: Pick<TrainConfig, 'eval_steps' | 'logging_steps'>, totalSteps: number): number {
  const e = cfg.eval_steps ?? cfg.logging_steps;
  return e < 1 ? Math.max(1, Math.ceil(totalSteps * e)) : e;
}

/** Check what needs the total step count (a fractional eval_steps against save_steps). */
export function checkEvalPlan(cfg: TrainConfig, totalSteps: number): void {
  if (!cfg.load_best_model_at_end || cfg.eval_strategy !== 'steps') return;
  const every = evalInterval(cfg, totalSteps);
  if (cfg.save_steps % every !== 0) {
    throw new ConfigError(`load_best_model_at_end requires the saving steps to be a round multiple of the evaluation steps, but found save_steps ${cfg.save_steps}, which is not a round multiple of eval_steps ${every} (${cfg.eval_steps} of ${totalSteps} steps)`);
  }
}

/** Whether the run evaluates after optimizer step `done` (1-based). HF: "steps" when done % eval_steps
 *  is 0; "epoch" at each epoch's end and at the last step (the loop's on_epoch_end runs then too). */
export function shouldEvaluate(cfg: Pick<TrainConfig, 'eval_strategy' | 'eval_steps' | 'logging_steps'>, done: number, totalSteps: number, stepsPerEpoch: number): boolean {
  if (cfg.eval_strategy === 'no' || done <= 0) return false;
  if (cfg.eval_strategy === 'steps') return done % evalInterval(cfg, totalSteps) === 0;
  return done % stepsPerEpoch === 0 || done === totalSteps;
}

/** One forward without gradients of an eval batch: its summed token loss and scored tokens. */
export type EvalForward = (input: StageInput, o: { signal?: AbortSignal }) => Promise<{ lossSum: number; tokens: number }>;

/** eval_loss as Trainer.evaluate computes it: batches of per_device_eval_batch_size in file order
 *  (SequentialSampler), each padded to its longest example; a batch's loss is the mean over its scored
 *  tokens (the model's loss without num_items_in_batch), repeated once per sample of the batch, and
 *  eval_loss is the mean of those. A batch without scored tokens has no loss in HF (NaN); here it is
 *  left out of the mean and counted, so one all-prompt example does not poison every evaluation. */
export async function evaluateLoss(forward: EvalForward, examples: readonly TokenizedExample[],
  o: { batchSize: number; padId: number; signal?: AbortSignal }): Promise<EvalMetrics> {
  if (examples.length === 0) throw new EvalError('eval_data: no examples to evaluate');
  const t0 = performance.now();
  let weighted = 0, samples = 0, tokens = 0, batches = 0;
  for (let i = 0; i < examples.length; i += o.batchSize) {
    o.signal?.throwIfAborted();
    const group = examples.slice(i, i + o.batchSize);
    const mb = collate(group, o.padId);
    const r = await forward({ key: `eval:${i}`, batch: mb.batch, seqLen: mb.seqLen, ids: mb.ids, labels: mb.labels }, { signal: o.signal });
    batches++;
    if (r.tokens === 0) continue;
    weighted += group.length * (r.lossSum / r.tokens);
    samples += group.length;
    tokens += r.tokens;
  }
  if (samples === 0) throw new EvalError('eval_data: no scored tokens (every label is masked)');
  const runtime = (performance.now() - t0) / 1000;
  return {
    eval_loss: weighted / samples,
    // HF rounds these to 4 / 3 / 3 decimals
    eval_runtime: Math.round(runtime * 1e4) / 1e4,
    eval_samples_per_second: Math.round(examples.length / Math.max(runtime, 1e-9) * 1e3) / 1e3,
    eval_steps_per_second: Math.round(batches / Math.max(runtime, 1e-9) * 1e3) / 1e3,
    eval_tokens: tokens,
    eval_samples: examples.length,
  };
}

/** What trainer_state.json records of the best checkpoint (HF's TrainerState fields). */
export interface BestModelState {
  best_metric: number | null;
  best_global_step: number | null;
  best_model_checkpoint: string | null;
}

/** HF's _determine_best_metric: after each evaluation, the metric (metric_for_best_model, default loss,
 *  "eval_" prefixed) is compared strictly with the best so far (greater_is_better, default false for a
 *  loss), and a better one makes this step's checkpoint the best. As in HF, nothing is tracked unless
 *  load_best_model_at_end or metric_for_best_model is set (best_* stay null). */
export class BestModelTracker {
  readonly metric: keyof EvalMetrics;
  readonly greaterIsBetter: boolean;
  readonly enabled: boolean;
  state: BestModelState = { best_metric: null, best_global_step: null, best_model_checkpoint: null };

  constructor(cfg: Pick<TrainConfig, 'metric_for_best_model' | 'greater_is_better' | 'load_best_model_at_end'>, restored?: Partial<BestModelState>) {
    this.enabled = cfg.load_best_model_at_end || cfg.metric_for_best_model !== null;
    const name = cfg.metric_for_best_model ?? 'loss';
    this.metric = (name.startsWith('eval_') ? name : `eval_${name}`) as keyof EvalMetrics;
    this.greaterIsBetter = cfg.greater_is_better ?? !name.endsWith('loss');
    if (restored) this.state = { best_metric: restored.best_metric ?? null, best_global_step: restored.best_global_step ?? null, best_model_checkpoint: restored.best_model_checkpoint ?? null };
  }

  /** Offer an evaluation of step `step` whose checkpoint is (or will be) `checkpointDir`; true if it is the new best. */
  offer(step: number, m: EvalMetrics, checkpointDir: string): boolean {
    if (!this.enabled) return false;
    const v = m[this.metric];
    const best = this.state.best_metric;
    if (best !== null && this.state.best_model_checkpoint !== null && !(this.greaterIsBetter ? v > best : v < best)) return false;
    this.state = { best_metric: v, best_global_step: step, best_model_checkpoint: checkpointDir };
    return true;
  }
}

/** The checkpoint dirs save_total_limit deletes, as HF rotates them with load_best_model_at_end: the best
 *  is never deleted (with a limit of 1 and a best that is not the newest, two are kept). `all` oldest first. */
export function checkpointsToDelete(all: readonly string[], limit: number, best: string | null): string[] {
  if (best === null || !all.includes(best) || best === all.at(-1)) return all.slice(0, Math.max(0, all.length - limit));
  const others = all.filter((d) => d !== best);
  const keepOthers = Math.max(1, limit - 1);
  return others.slice(0, Math.max(0, others.length - keepOthers));
}
