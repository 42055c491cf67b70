// Evaluation during a swarm run (eval_strategy): after a committed step the coordinator evaluates the adapter
// it holds on eval_data with its own copy of the base model (the same NF4 weights the shards were cut from),
// emits `eval` events, logs to TensorBoard, tracks the best step for load_best_model_at_end and records
// HF's best_* fields in <output_dir>/trainer_state.json.
import { existsSync } from 'node:fs';
import { readFile, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Backend } from '../engine/backend.ts';
import { createBackend } from '../engine/backends/registry.ts';
import type { BackendKind } from '../engine/backends/registry.ts';
import { loadStage } from '../engine/model/load.ts';
import { readAdapter } from '../engine/formats/peft.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import type { TokenizedExample } from '../engine/train/data.ts';
import { BestModelTracker, checkEvalPlan, evaluateLoss, shouldEvaluate } from '../engine/train/evaluation.ts';
import type { BestModelState, EvalEvent } from '../engine/train/evaluation.ts';
import { TRAINER_STATE_FILE } from '../engine/train/trainer.ts';
import { TensorBoardWriter } from '../engine/logging/tensorboard.ts';
import type { LlamaConfig, LoraConfig, NamedTensor, Stage, WeightSource } from '../engine/types.ts';

export interface RunEvaluatorInit {
  train: TrainConfig;
  llama: LlamaConfig;
  weights: WeightSource;
  lora: LoraConfig;
  /** eval_data tokenized with the run's data pipeline (null: eval_strategy "no") */
  examples: TokenizedExample[] | null;
  padId: number;
  totalSteps: number;
  stepsPerEpoch: number;
  outputDir: string;
  /** the committed adapter, in stage order */
  adapter: () => NamedTensor[];
  /** TensorBoard writer (report_to tensorboard), shared with the step log */
  tensorboard: TensorBoardWriter | null;
  emit: (e: Record<string, unknown> & { event: string }) => void;
  log: (msg: string) => void;
  /** the backend the evaluation runs on (default: createBackend(train.device)) */
  backend?: Backend;
}

/** The coordinator's part of eval_strategy. Why here and not through the swarm: the coordinator already
 *  holds the adapter and the base model (it cut the shards from it), so an evaluation is forward passes
 *  on one machine with no protocol, no route and no volunteer time taken from training; through the swarm
 *  every eval batch would cross every stage boundary for a number the coordinator can compute alone. */
export class RunEvaluator {
  private readonly o: RunEvaluatorInit;
  private stage: Stage | null = null;
  private backend: Backend | null = null;
  readonly best: BestModelTracker;
  readonly evals: EvalEvent[] = [];
  private bestTensors: NamedTensor[] | null = null;

  constructor(o: RunEvaluatorInit) {
    this.o = o;
    checkEvalPlan(o.train, o.totalSteps);
    if (o.train.eval_strategy !== 'no' && (o.examples === null || o.examples.length === 0)) throw new Error(`eval_strategy ${o.train.eval_strategy}: no eval examples in ${o.train.eval_data}`);
    this.best = new BestModelTracker(o.train);
  }

  get enabled(): boolean { return this.o.train.eval_strategy !== 'no'; }

  /** A restarted coordinator picks up the evaluations and the best step recorded before `step`. */
  async restore(step: number): Promise<void> {
    const file = path.join(this.o.outputDir, TRAINER_STATE_FILE);
    if (!this.enabled || !existsSync(file)) return;
    const st = JSON.parse(await readFile(file, 'utf8')) as Partial<BestModelState> & { log_history?: EvalEvent[] };
    for (const e of st.log_history ?? []) if (e.event === 'eval' && e.step <= step) this.evals.push(e);
    if (st.best_global_step !== null && st.best_global_step !== undefined && st.best_global_step <= step) this.best.state = { best_metric: st.best_metric ?? null, best_global_step: st.best_global_step, best_model_checkpoint: st.best_model_checkpoint ?? null };
  }

  /** After step `step` is committed, before its checkpoint dir is written (HF evaluates, then saves). */
  async afterCommit(step: number, signal?: AbortSignal): Promise<void> {
    if (!shouldEvaluate(this.o.train, step, this.o.totalSteps, this.o.stepsPerEpoch)) return;
    const stage = await this.stageWithAdapter();
    const m = await evaluateLoss(async (input) => {
      const r = await stage.forward(input, { train: false });
      return { lossSum: r.lossSum ?? 0, tokens: r.tokens ?? 0 };
    }, this.o.examples!, { batchSize: this.o.train.per_device_eval_batch_size, padId: this.o.padId, signal });
    const ev: EvalEvent = { event: 'eval', step, epoch: step / this.o.stepsPerEpoch, ...m };
    this.evals.push(ev);
    if (this.best.offer(step, m, path.join(this.o.outputDir, `checkpoint-${step}`)) && this.o.train.load_best_model_at_end) {
      this.bestTensors = this.o.adapter().map((t) => ({ name: t.name, shape: [...t.shape], data: t.data.slice() }));
    }
    this.o.tensorboard?.add(step, { eval_loss: m.eval_loss, eval_runtime: m.eval_runtime, eval_samples_per_second: m.eval_samples_per_second, eval_steps_per_second: m.eval_steps_per_second, epoch: ev.epoch });
    this.o.emit({ ...ev });
    this.o.log(`eval at step ${step}: eval_loss ${m.eval_loss.toFixed(4)} (${m.eval_samples} samples, ${m.eval_tokens} tokens, ${m.eval_runtime.toFixed(2)} s)`);
    await this.writeState(step);
  }

  /** HF's trainer_state.json fields this run knows: the evaluations and the best checkpoint. */
  private async writeState(step: number): Promise<void> {
    const file = path.join(this.o.outputDir, TRAINER_STATE_FILE);
    const tmp = `${file}.tmp-${process.pid}`;
    await writeFile(tmp, JSON.stringify({ global_step: step, total_steps: this.o.totalSteps, epoch: step / this.o.stepsPerEpoch, ...this.best.state, log_history: this.evals }, null, 2) + '\n');
    await rename(tmp, file);
  }

  /** The adapter to write at the end: with load_best_model_at_end the best evaluated step's. */
  async finalAdapter(last: NamedTensor[]): Promise<NamedTensor[]> {
    const b = this.best.state;
    if (!this.o.train.load_best_model_at_end || b.best_model_checkpoint === null) return last;
    this.o.log(`loading best model from ${b.best_model_checkpoint} (score: ${b.best_metric})`);
    if (this.bestTensors !== null) return this.bestTensors;
    // after a coordinator restart: the best step's checkpoint dir (save and eval strategies match)
    if (!existsSync(path.join(b.best_model_checkpoint, 'adapter_model.safetensors'))) {
      this.o.log(`warning: could not locate the best model at ${b.best_model_checkpoint}; the adapter is the last step's`);
      return last;
    }
    const a = await readAdapter(b.best_model_checkpoint, { config: this.o.llama });
    const byName = new Map(a.tensors.map((t) => [t.name, t]));
    return last.map((t) => {
      const x = byName.get(t.name);
      if (x === undefined || x.data.length !== t.data.length) throw new Error(`best checkpoint ${b.best_model_checkpoint}: ${t.name} is missing or has another shape`);
      return { name: t.name, shape: [...t.shape], data: Float32Array.from(x.data) };
    });
  }

  /** The whole model as one stage, built at the first evaluation, with the committed adapter copied in. */
  private async stageWithAdapter(): Promise<Stage> {
    if (this.stage === null) {
      this.backend = this.o.backend ?? await createBackend(this.o.train.device as BackendKind);
      this.stage = await loadStage(this.o.weights, this.backend, {
        layerStart: 0, layerEnd: this.o.llama.numHiddenLayers, lora: this.o.lora, gradientCheckpointing: false, seed: this.o.train.seed,
      });
    }
    const byName = new Map(this.o.adapter().map((t) => [t.name, t]));
    for (const p of this.stage.params) {
      const t = byName.get(p.name);
      if (t === undefined || t.data.length !== p.data.length) throw new Error(`eval: the committed adapter lacks ${p.name} or has another shape`);
      p.data.set(t.data);
    }
    return this.stage;
  }

  close(): void {
    this.stage?.dispose();
    this.stage = null;
    if (this.o.backend === undefined) this.backend?.dispose();
    this.backend = null;
  }
}
