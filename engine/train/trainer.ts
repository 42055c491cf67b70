// The local training loop (`swarmtune train`): data → Stage forward/backward over micro-batches → clip →
// schedule → paged AdamW, with checkpoints that resume bit-identically, a JSONL log, progress and Ctrl-C save.
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync } from 'node:fs';
import { appendFile, readFile, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join, resolve } from 'node:path';
import type { Backend } from '../backend.ts';
import type { LlamaConfig, LoraConfig, NamedTensor, Stage, WeightSource } from '../types.ts';
import { loadStage } from '../model/load.ts';
import { readAdapter, writeAdapter } from '../formats/peft.ts';
import { SafetensorsFile } from '../formats/safetensors/read.ts';
import { writeSafetensors } from '../formats/safetensors/write.ts';
import { clipGradNorm } from './clip.ts';
import { loraConfigOf } from './config.ts';
import type { TrainConfig } from './config.ts';
import { DataLoader, dropoutSeedFor } from './data.ts';
import type { CollatedMicroBatch, DataCursor, TokenizedExample } from './data.ts';
import { planStep, stepLoss } from './step-plan.ts';
import { createOptimizer } from './optim.ts';
import type { Optimizer } from '../optimizer.ts';
import type { OptimizerState, StateTensor } from '../optimizer.ts';
import { baseParamCount, trainableParamsLine } from './plan.ts';
import { learningRateAt, warmupStepsFor } from './schedule.ts';
import { BestModelTracker, checkEvalPlan, checkpointsToDelete, evaluateLoss, shouldEvaluate } from './evaluation.ts';
import type { BestModelState, EvalEvent } from './evaluation.ts';
import { TensorBoardWriter, defaultLoggingDir } from '../logging/tensorboard.ts';

export const TRAINER_STATE_FILE = 'trainer_state.json';
export const OPTIMIZER_FILE = 'optimizer.safetensors';
export const TRAINING_LOG_FILE = 'training_log.jsonl';

export class TrainerError extends Error {
  override readonly name = 'TrainerError';
}

export interface StepEvent {
  event: 'step';
  step: number;
  epoch: number;
  loss: number;
  lr: number;
  grad_norm: number;
  tokens_per_s: number;
  label_tokens: number;
}

/** What checkpoint-N/trainer_state.json holds (best_* as HF's TrainerState: set by evaluations). */
export interface TrainerState extends Partial<BestModelState> {
  version: 1;
  global_step: number;
  total_steps: number;
  epoch: number;
  /** next micro-batch to consume */
  data_cursor: DataCursor;
  /** all randomness is counter-based from the seed: shuffles from (seed, epoch), dropout from dropoutSeedFor(seed, step, micro-batch) */
  rng: { seed: number; kind: 'counter-based' };
  schedule: { lr_scheduler_type: string; learning_rate: number; warmup_steps: number; total_steps: number; next_lr: number };
  dataset: { examples: number; sha256: string };
  optim: string;
  /** step events and, with evaluation, eval events, in order */
  log_history: Array<StepEvent | EvalEvent>;
  args: Partial<TrainConfig>;
}

export interface TrainerHooks {
  /** one line for humans (stdout); the trainable-params line, summaries */
  info?: (line: string) => void;
  /** every optimizer step */
  onStep?: (e: StepEvent, progress: { step: number; totalSteps: number; elapsedMs: number }) => void;
  /** after each evaluation (eval_strategy) */
  onEval?: (e: EvalEvent) => void;
  /** set to stop after the current step with a checkpoint (Ctrl-C) */
  signal?: AbortSignal;
}

export interface TrainResult {
  globalStep: number;
  totalSteps: number;
  interrupted: boolean;
  lastLoss: number;
  checkpoints: string[];
  adapterDir: string;
  /** the LoRA tensors written as the adapter (copies): the best checkpoint's with load_best_model_at_end */
  params: NamedTensor[];
  /** the evaluations of this process, in order */
  evals: EvalEvent[];
  /** HF's best_* fields (null without evaluation) */
  best: BestModelState;
  /** the TensorBoard event file (report_to tensorboard) */
  tensorboardFile: string | null;
}

export interface TrainInputs {
  config: TrainConfig;
  modelConfig: LlamaConfig;
  weights: WeightSource;
  backend: Backend;
  examples: TokenizedExample[];
  /** eval_data, tokenized (needed when eval_strategy is not "no") */
  evalExamples?: TokenizedExample[];
  padId: number;
  /** base_model_name_or_path written into the adapter config */
  baseModelName: string;
}

/** sha256 over the tokenized examples: a resume against different data is refused. */
export function datasetHash(examples: readonly TokenizedExample[]): string {
  const h = createHash('sha256');
  for (const e of examples) {
    h.update(new Uint8Array(e.ids.buffer, e.ids.byteOffset, e.ids.byteLength));
    h.update(new Uint8Array(e.labels.buffer, e.labels.byteOffset, e.labels.byteLength));
    h.update('|');
  }
  return h.digest('hex');
}

/** Where the trainer's LoRA config comes from: --init-adapter's adapter_config.json wins over flags. */
export async function resolveLora(cfg: TrainConfig): Promise<{ lora: LoraConfig; initTensors: NamedTensor[] | null }> {
  if (!cfg.init_adapter) return { lora: loraConfigOf(cfg), initTensors: null };
  const a = await readAdapter(cfg.init_adapter);
  return { lora: { ...a.lora, loraDropout: cfg.lora_dropout }, initTensors: a.tensors };
}

function copyTensorsInto(params: readonly NamedTensor[], tensors: readonly NamedTensor[], source: string): void {
  const byName = new Map(tensors.map((t) => [t.name, t]));
  for (const p of params) {
    const t = byName.get(p.name);
    if (!t) throw new TrainerError(`${source}: missing LoRA tensor ${p.name}`);
    if (t.data.length !== p.data.length) throw new TrainerError(`${source}: ${p.name} has ${t.data.length} values, the model expects ${p.data.length} [${p.shape.join(', ')}]`);
    p.data.set(t.data);
  }
  if (byName.size !== params.length) {
    const extra = [...byName.keys()].filter((n) => !params.some((p) => p.name === n));
    throw new TrainerError(`${source}: tensors the model does not have: ${extra.slice(0, 3).join(', ')}${extra.length > 3 ? ', ...' : ''}`);
  }
}

/** Write optimizer state as safetensors (one entry per state tensor, metadata: optim and step). */
export async function writeOptimizerState(path: string, st: OptimizerState): Promise<void> {
  await writeSafetensors(path, st.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, data: t.data })),
    { format: 'swarmtune-optimizer', optim: st.optim, step: String(st.step) });
}

export async function readOptimizerState(path: string): Promise<OptimizerState> {
  const f = await SafetensorsFile.open(path);
  try {
    const meta = f.metadata ?? {};
    const optim = meta.optim, step = Number(meta.step);
    if (!optim || !Number.isInteger(step)) throw new TrainerError(`${path}: metadata lacks optim/step (not a swarmtune optimizer state file)`);
    const tensors: StateTensor[] = [];
    for (const name of f.names()) {
      const info = f.info(name);
      if (info.dtype === 'F32') tensors.push({ name, dtype: 'F32', shape: [...info.shape], data: await f.readFloat32(name) });
      else if (info.dtype === 'U8') {
        const raw = await f.readRaw(name);
        tensors.push({ name, dtype: 'U8', shape: [...info.shape], data: Uint8Array.from(raw) });
      } else throw new TrainerError(`${path}: tensor ${name} has dtype ${info.dtype}, expected F32 or U8`);
    }
    return { optim: optim as OptimizerState['optim'], step, tensors };
  } finally {
    await f.close();
  }
}

/** checkpoint-N dirs of an output dir, oldest first. */
export function listCheckpoints(outputDir: string): string[] {
  if (!existsSync(outputDir)) return [];
  return readdirSync(outputDir)
    .map((n) => /^checkpoint-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .sort((a, b) => Number(a[1]) - Number(b[1]))
    .map((m) => join(outputDir, m[0]));
}

export async function readTrainerState(dir: string): Promise<TrainerState> {
  const path = join(dir, TRAINER_STATE_FILE);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new TrainerError(`${dir}: no ${TRAINER_STATE_FILE} (not a checkpoint directory)`);
  }
  const st = JSON.parse(text) as TrainerState;
  if (st.version !== 1 || !Number.isInteger(st.global_step)) throw new TrainerError(`${path}: unsupported trainer state (version ${st.version})`);
  return st;
}

export class Trainer {
  readonly cfg: TrainConfig;
  readonly inputs: TrainInputs;
  private stage: Stage | null = null;
  private optimizer: Optimizer | null = null;
  private lora: LoraConfig | null = null;

  constructor(inputs: TrainInputs) {
    this.inputs = inputs;
    this.cfg = inputs.config;
  }

  async run(hooks: TrainerHooks = {}): Promise<TrainResult> {
    const cfg = this.cfg;
    const info = hooks.info ?? (() => {});
    const outputDir = resolve(cfg.output_dir);
    mkdirSync(outputDir, { recursive: true });

    const { lora, initTensors } = await resolveLora(cfg);
    this.lora = lora;
    const stage = await loadStage(this.inputs.weights, this.inputs.backend, {
      layerStart: 0, layerEnd: this.inputs.modelConfig.numHiddenLayers, lora,
      gradientCheckpointing: cfg.gradient_checkpointing, seed: cfg.seed,
    });
    this.stage = stage;
    let optimizer: Optimizer | null = null;
    let setup: { loader: DataLoader; totalSteps: number; warmup: number; dataSha: string; startStep: number; history: Array<StepEvent | EvalEvent>; best: BestModelTracker };
    try {
      if (initTensors) copyTensorsInto(stage.params, initTensors, `init adapter ${cfg.init_adapter}`);

      const loader = new DataLoader(this.inputs.examples, {
        batchSize: cfg.per_device_train_batch_size, accumulation: cfg.gradient_accumulation_steps,
        seed: cfg.seed, shuffle: cfg.shuffle, padId: this.inputs.padId,
      });
      const totalSteps = cfg.max_steps > 0 ? cfg.max_steps : Math.ceil(cfg.num_train_epochs * loader.stepsPerEpoch);
      const warmup = warmupStepsFor(totalSteps, cfg.warmup_steps, cfg.warmup_ratio);
      const dataSha = datasetHash(this.inputs.examples);
      checkEvalPlan(cfg, totalSteps);
      if (cfg.eval_strategy !== 'no' && (this.inputs.evalExamples === undefined || this.inputs.evalExamples.length === 0)) {
        throw new TrainerError(`eval_strategy ${cfg.eval_strategy}: no eval examples (eval_data ${cfg.eval_data})`);
      }
      let best = new BestModelTracker(cfg);

      optimizer = createOptimizer(this.inputs.backend, stage.params.map((p) => ({ name: p.name, numel: p.data.length })), {
        optim: cfg.optim, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weightDecay: cfg.weight_decay,
        pageBytes: cfg.optim_page_bytes, residentBytes: cfg.optim_resident_bytes ?? Infinity,
        spillDir: join(outputDir, `optimizer-pages-${process.pid}`),
      });
      this.optimizer = optimizer;

      let startStep = 0;
      let history: Array<StepEvent | EvalEvent> = [];
      if (cfg.resume_from_checkpoint) {
        const dir = cfg.resume_from_checkpoint === 'latest' ? listCheckpoints(outputDir).at(-1) : cfg.resume_from_checkpoint;
        if (!dir) throw new TrainerError(`resume_from_checkpoint latest: no checkpoint-N directory in ${outputDir}`);
        const st = await readTrainerState(dir);
        if (st.dataset.sha256 !== dataSha) throw new TrainerError(`${dir}: checkpoint was trained on different data (sha256 ${st.dataset.sha256.slice(0, 12)}…, now ${dataSha.slice(0, 12)}…); same --data, --max-seq-length and tokenizer are needed to resume`);
        if (st.optim !== cfg.optim) throw new TrainerError(`${dir}: checkpoint used optim ${st.optim}, now ${cfg.optim}`);
        if (st.rng.seed !== cfg.seed) throw new TrainerError(`${dir}: checkpoint used seed ${st.rng.seed}, now ${cfg.seed}`);
        const a = await readAdapter(dir, { config: this.inputs.modelConfig });
        copyTensorsInto(stage.params, a.tensors, `checkpoint ${dir}`);
        await optimizer.importState(await readOptimizerState(join(dir, OPTIMIZER_FILE)));
        if (optimizer.step !== st.global_step) throw new TrainerError(`${dir}: optimizer step ${optimizer.step} != trainer global_step ${st.global_step}`);
        startStep = st.global_step;
        history = st.log_history;
        best = new BestModelTracker(cfg, st);
        info(`resumed from ${dir} at step ${startStep}/${totalSteps}`);
      }

      const trainable = stage.params.reduce((s, p) => s + p.data.length, 0);
      info(trainableParamsLine(trainable, baseParamCount(this.inputs.modelConfig) + trainable));
      setup = { loader, totalSteps, warmup, dataSha, startStep, history, best };
    } catch (e) {
      // setup failed (bad init adapter, refused resume, ...): release what was loaded
      (optimizer as Optimizer | null)?.dispose();
      stage.dispose();
      throw e;
    }
    const { loader, totalSteps, warmup, dataSha } = setup;
    const history = setup.history;
    const startStep = setup.startStep;
    const best = setup.best;
    const evals: EvalEvent[] = [];
    let bestParams: NamedTensor[] | null = null;
    const tb = cfg.report_to.includes('tensorboard') ? new TensorBoardWriter(cfg.logging_dir ?? defaultLoggingDir(outputDir)) : null;
    if (tb) info(`tensorboard: ${tb.path} (tensorboard --logdir ${cfg.logging_dir ?? join(outputDir, 'runs')})`);
    const opt = optimizer!;
    const logPath = join(outputDir, TRAINING_LOG_FILE);
    const checkpoints: string[] = [];
    const t0 = performance.now();
    let lastLoss = Number.NaN;
    let step = startStep;
    let interrupted = false;
    let window: StepEvent[] = [];
    let params: NamedTensor[] = [];
    try {
      for (; step < totalSteps; step++) {
        if (hooks.signal?.aborted) {
          interrupted = true;
          break;
        }
        const tStep = performance.now();
        const mbs = loader.stepMicroBatches(step);
        const { grads, loss, labelTokens, inputTokens } = await accumulateStep(stage, mbs, { seed: cfg.seed, step });
        const gradNormValue = clipGradNorm(grads, cfg.max_grad_norm);
        // bitsandbytes optimizers skip non-finite gradient elements; torch AdamW would poison every weight
        if (!Number.isFinite(gradNormValue) && cfg.optim === 'adamw_torch') {
          throw new TrainerError(`step ${step + 1}: gradient norm is ${gradNormValue} (loss ${loss}); lower --learning-rate or check the data (micro-batches of epoch ${loader.cursorAt(step).epoch})`);
        }
        const lr = learningRateAt(cfg.learning_rate, cfg.lr_scheduler_type, step, warmup, totalSteps);
        await opt.update(stage.params.map((p) => p.data), grads, lr);
        lastLoss = loss;
        const dtMs = performance.now() - tStep;
        const event: StepEvent = {
          event: 'step', step: step + 1, epoch: (step + 1) / loader.stepsPerEpoch, loss, lr, grad_norm: gradNormValue,
          tokens_per_s: inputTokens / Math.max(dtMs, 1e-3) * 1000, label_tokens: labelTokens,
        };
        history.push(event);
        window.push(event);
        hooks.onStep?.(event, { step: step + 1, totalSteps, elapsedMs: performance.now() - t0 });
        if ((step + 1) % cfg.logging_steps === 0 || step + 1 === totalSteps) {
          // HF logs the mean loss since the previous log line
          const mean = window.reduce((s, e) => s + e.loss, 0) / window.length;
          await appendFile(logPath, JSON.stringify({ ...event, loss: mean }) + '\n');
          tb?.add(event.step, { loss: mean, grad_norm: gradNormValue, learning_rate: lr, epoch: event.epoch });
          window = [];
        }
        const done = step + 1;
        if (shouldEvaluate(cfg, done, totalSteps, loader.stepsPerEpoch)) {
          // HF evaluates before it saves the same step, so the checkpoint's trainer_state knows the best
          const m = await evaluateLoss(async (input) => {
            const r = await stage.forward(input, { train: false });
            return { lossSum: r.lossSum ?? 0, tokens: r.tokens ?? 0 };
          }, this.inputs.evalExamples!, { batchSize: cfg.per_device_eval_batch_size, padId: this.inputs.padId });
          const ev: EvalEvent = { event: 'eval', step: done, epoch: done / loader.stepsPerEpoch, ...m };
          history.push(ev);
          evals.push(ev);
          await appendFile(logPath, JSON.stringify(ev) + '\n');
          tb?.add(done, { eval_loss: m.eval_loss, eval_runtime: m.eval_runtime, eval_samples_per_second: m.eval_samples_per_second, eval_steps_per_second: m.eval_steps_per_second, epoch: ev.epoch });
          if (best.offer(done, m, join(outputDir, `checkpoint-${done}`)) && cfg.load_best_model_at_end) bestParams = stage.params.map(cloneTensor);
          hooks.onEval?.(ev);
        }
        const save = (cfg.save_strategy === 'steps' && done % cfg.save_steps === 0)
          || (cfg.save_strategy === 'epoch' && done % loader.stepsPerEpoch === 0);
        if (save && done < totalSteps) {
          checkpoints.push(await this.saveCheckpoint(outputDir, done, totalSteps, warmup, loader, dataSha, history, best.state));
        }
      }
      if (interrupted || step === totalSteps) {
        // a final checkpoint makes an interrupted or finished run resumable / extendable
        if (interrupted || cfg.save_strategy !== 'no') {
          checkpoints.push(await this.saveCheckpoint(outputDir, step, totalSteps, warmup, loader, dataSha, history, best.state));
        }
      }
      params = stage.params.map(cloneTensor);
      if (!interrupted && cfg.load_best_model_at_end && best.state.best_model_checkpoint !== null) {
        params = bestParams ?? await this.bestFromDisk(best.state, params, info);
        info(`loading best model from ${best.state.best_model_checkpoint} (score: ${best.state.best_metric})`);
      }
      if (!interrupted) await writeAdapter(outputDir, { lora, baseModel: this.inputs.baseModelName, tensors: params });
    } finally {
      tb?.close();
      opt.dispose();
      stage.dispose();
    }
    return { globalStep: step, totalSteps, interrupted, lastLoss, checkpoints, adapterDir: outputDir, params, evals, best: best.state, tensorboardFile: tb?.path ?? null };
  }

  /** After a resume the best step's tensors are no longer in memory: its checkpoint dir has them (the save
   *  and eval strategies match); a best step without one (eval more often than save) keeps the final ones. */
  private async bestFromDisk(b: BestModelState, final: NamedTensor[], info: (line: string) => void): Promise<NamedTensor[]> {
    if (b.best_model_checkpoint === null || !existsSync(join(b.best_model_checkpoint, 'adapter_model.safetensors'))) {
      info(`warning: could not locate the best model at ${b.best_model_checkpoint}; the adapter is the last step's`);
      return final;
    }
    const a = await readAdapter(b.best_model_checkpoint, { config: this.inputs.modelConfig });
    const byName = new Map(a.tensors.map((t) => [t.name, t]));
    return final.map((p) => {
      const t = byName.get(p.name);
      if (!t || t.data.length !== p.data.length) throw new TrainerError(`best checkpoint ${b.best_model_checkpoint}: ${p.name} is missing or has another shape`);
      return { name: p.name, shape: [...p.shape], data: Float32Array.from(t.data) };
    });
  }

  private async saveCheckpoint(outputDir: string, globalStep: number, totalSteps: number, warmup: number,
    loader: DataLoader, dataSha: string, history: Array<StepEvent | EvalEvent>, best: BestModelState): Promise<string> {
    const cfg = this.cfg;
    const dir = join(outputDir, `checkpoint-${globalStep}`);
    const tmp = `${dir}.tmp-${process.pid}`;
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp, { recursive: true });
    await writeAdapter(tmp, { lora: this.lora!, baseModel: this.inputs.baseModelName, tensors: this.stage!.params.map(cloneTensor) });
    await writeOptimizerState(join(tmp, OPTIMIZER_FILE), await this.optimizer!.exportState());
    const state: TrainerState = {
      version: 1, global_step: globalStep, total_steps: totalSteps, epoch: globalStep / loader.stepsPerEpoch,
      data_cursor: loader.cursorAt(globalStep), rng: { seed: cfg.seed, kind: 'counter-based' },
      schedule: {
        lr_scheduler_type: cfg.lr_scheduler_type, learning_rate: cfg.learning_rate, warmup_steps: warmup, total_steps: totalSteps,
        next_lr: learningRateAt(cfg.learning_rate, cfg.lr_scheduler_type, globalStep, warmup, totalSteps),
      },
      dataset: { examples: loader.examples.length, sha256: dataSha }, optim: cfg.optim, log_history: history,
      ...best,
      args: { ...cfg },
    };
    await writeFile(join(tmp, TRAINER_STATE_FILE), JSON.stringify(state, null, 2) + '\n');
    // rename last so a crash mid-save never leaves a checkpoint dir that looks complete
    rmSync(dir, { recursive: true, force: true });
    renameSync(tmp, dir);
    if (cfg.save_total_limit !== null) {
      const all = listCheckpoints(outputDir);
      const keepBest = cfg.load_best_model_at_end ? best.best_model_checkpoint : null;
      for (const old of checkpointsToDelete(all, cfg.save_total_limit, keepBest)) rmSync(old, { recursive: true, force: true });
    }
    return dir;
  }
}

/** Forward+backward of one optimizer step's micro-batches on a whole-model stage; gradients of the step's
 *  mean token loss (facts §9, the step plan's lossScale: engine/train/step-plan.ts, as the swarm uses it). */
export async function accumulateStep(stage: Stage, mbs: readonly CollatedMicroBatch[], o: { seed: number; step: number }): Promise<{ grads: Float32Array[]; lossSum: number; loss: number; labelTokens: number; inputTokens: number }> {
  const plan = planStep(o.step, mbs);
  const { lossScale, microBatches } = plan;
  const grads = stage.newGrads();
  let lossSum = 0, inputTokens = 0;
  for (let k = 0; k < microBatches.length; k++) {
    const mb = microBatches[k];
    const key = `${o.step}:${k}:0`;
    const r = await stage.forward({
      key, batch: mb.batch, seqLen: mb.seqLen, ids: mb.ids, labels: mb.labels, dropoutSeed: dropoutSeedFor(o.seed, o.step, k),
    }, { train: true });
    lossSum += r.lossSum ?? 0;
    inputTokens += mb.inputTokens;
    await stage.backward(key, grads, { lossScale });
  }
  return { grads, lossSum, loss: stepLoss(plan, lossSum), labelTokens: plan.labelTokens, inputTokens };
}

function cloneTensor(t: NamedTensor): NamedTensor {
  return { name: t.name, shape: [...t.shape], data: t.data.slice() };
}
