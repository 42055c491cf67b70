// What a wire codec costs in quality, not only bytes (`npm run bench -- --only convergence`): the same
// data, steps and seed trained through a 2-stage pipeline split of the model, in process, with the codec
// applied at the stage boundary exactly as the swarm applies it (encodeTensor of the [B*S, C] hidden state
// and of the input gradient, decodeFloat on the other side: node/stage-host.ts), forward and backward.
// f32 is the reference; the eval loss on held-out data is computed at the end in f32 (no codec).
//
// Tasks: `demo` — the embedded tiny model and its bundled Q&A data (the demo's recipe; every 6th record
// held out), `markov` — a random 4-layer model learning a random token permutation with 20% noise
// (optimum ≈ 1.6 nats, from ln 256 = 5.5), held-out sequences from the same chain.
//
// The demo memorizes unrelated facts, so its held-out loss RISES as it learns (f32 ends highest): it is
// judged by train_set_loss, the loss on its training records in f32 at the end; markov by eval_loss.
//
// `markov3`: the same chain with 1072 training sequences, so 400 steps are 2.99 epochs (SFT's usual 2-3):
// the delta codecs (aq4, aq2) pay their cold first visit over fewer epochs there.
//
//   node bench/convergence.ts [--task demo|markov|markov3] [--codecs f32,int2,aq2,aq:COLD:DELTA:TAU[:BLOCK],...]
//                             [--steps N] [--quick] [--ref EVAL,TRAIN (f32 losses of an earlier run: skip f32)]
import os from 'node:os';
import path from 'node:path';
import { NativeBackend, defaultThreadCount } from '../engine/backends/native.ts';
import type { Backend } from '../engine/backend.ts';
import { loadStage } from '../engine/model/load.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { Rng } from '../engine/model/rng.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { ensureTinyModel, TINY_DATASET_PATH } from '../engine/tiny/index.ts';
import { DEFAULT_TRAIN_CONFIG, loraConfigOf } from '../engine/train/config.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { collate, dataOptionsOf, DataLoader, dropoutSeedFor, epochOrder, loadDataset } from '../engine/train/data.ts';
import type { TokenizedExample } from '../engine/train/data.ts';
import { clipGradNorm } from '../engine/train/clip.ts';
import { createOptimizer } from '../engine/train/optim.ts';
import { learningRateAt, warmupStepsFor } from '../engine/train/schedule.ts';
import { planStep, stepLoss } from '../engine/train/step-plan.ts';
import type { LlamaConfig, Stage, WeightSource } from '../engine/types.ts';
import { decodeFloat, encodeTensor, expectedByteLength, FLOAT_CODECS, isDeltaCodec, isFloatCodec } from '../protocol/tensor.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { decodeDelta, DELTA_SPECS, encodeDelta, parseDeltaSpec } from '../protocol/codecs/delta.ts';
import type { DeltaParams } from '../protocol/codecs/delta.ts';
import { DeltaCache } from '../protocol/codecs/delta-cache.ts';

/** One hop direction with the delta codec: the sender's and the receiver's caches, kept apart as in the swarm. */
class DeltaHop {
  readonly send = new DeltaCache(1 << 30);
  readonly recv = new DeltaCache(1 << 30);
  readonly p: DeltaParams;
  /** positions sent SAME, DELTA, FULL */
  readonly modes = [0, 0, 0, 0];
  constructor(p: DeltaParams) { this.p = p; }
  /** encode on the sender, decode on the receiver; both stage their reconstruction under `attempt` */
  pass(attempt: string, x: Float32Array, keys: string[], S: number, C: number, what: string): { bytes: number; out: Float32Array } {
    const T = keys.length * S;
    const s = this.send.lookup(keys, S, C);
    const bytes = encodeDelta(this.p, x, T, C, s.refs, s.digest);
    const mine = decodeDelta(this.p, bytes, T, C, s.refs, s.digest, what);
    const r = this.recv.lookup(keys, S, C);
    const out = decodeDelta(this.p, bytes, T, C, r.refs, r.digest, what);
    for (let i = 0; i < out.length; i++) if (out[i] !== mine[i]) throw new Error(`${what}: sender and receiver reconstructions differ at ${i}`);
    for (let t = 0; t < T; t++) this.modes[(bytes[8 + (t >> 2)]! >> (6 - 2 * (t & 3))) & 3]!++;
    this.send.stage(attempt, keys, S, C, mine);
    this.recv.stage(attempt, keys, S, C, out);
    return { bytes: bytes.length, out };
  }
  commit(attempt: string): void { this.send.commit(attempt); this.recv.commit(attempt); }
}

export interface ConvergenceTask {
  name: string;
  llama: LlamaConfig;
  weights: WeightSource;
  train: TokenizedExample[];
  heldOut: TokenizedExample[];
  padId: number;
  cfg: TrainConfig;
  /** layer where stage 1 starts */
  split: number;
}

export interface CodecRun {
  task: string; codec: FloatCodec | string; steps: number;
  /** tensor bytes per token position crossing the boundary, forward and backward */
  bytes_per_token_forward: number; bytes_per_token_backward: number;
  bf16_over_codec: number;
  /** forward and backward together, averaged over the whole run (first epoch included) */
  bits_per_element: number;
  final_train_loss: number; eval_loss: number; eval_loss_regression_vs_f32: number | null;
  /** the training records themselves, f32, at the end: the demo's own goal is to memorize them */
  train_set_loss: number; train_set_loss_regression_vs_f32: number | null;
  codec_ms_per_step: number; seconds: number;
}

const TINY_RECIPE: Partial<TrainConfig> = {
  // the demo's training flags (coordinator/demo/run.ts demoTrainFlags)
  per_device_train_batch_size: 4, gradient_accumulation_steps: 2, learning_rate: 3e-3, lr_scheduler_type: 'constant_with_warmup',
  warmup_steps: 3, lora_r: 16, lora_alpha: 32, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  lora_dropout: 0, max_seq_length: 96,
};

export async function demoTask(steps: number): Promise<ConvergenceTask> {
  const md = await openModelDir(await ensureTinyModel(path.join(os.tmpdir(), 'swarmtune-bench-fixtures', 'tiny')));
  const cfg = { ...DEFAULT_TRAIN_CONFIG, ...TINY_RECIPE, max_steps: steps } as TrainConfig;
  const tok = md.tokenizer!;
  const ds = loadDataset(TINY_DATASET_PATH, tok, dataOptionsOf(cfg));
  const padId = tok.padTokenId ?? md.config.padTokenId ?? tok.eosTokenId!;
  return {
    name: 'demo', llama: md.config, weights: md.weights, padId, cfg, split: md.config.numHiddenLayers / 2,
    train: ds.examples.filter((_, i) => i % 6 !== 5), heldOut: ds.examples.filter((_, i) => i % 6 === 5),
  };
}

/** x[t+1] = perm[x[t]] with probability 0.8, else uniform: learnable only through the LoRA layers */
export function markovTask(steps: number, o: { vocab?: number; seqLen?: number; trainSeqs?: number; heldOutSeqs?: number } = {}): ConvergenceTask {
  const V = o.vocab ?? 256, S = o.seqLen ?? 64;
  const llama = tinyLlamaConfig({ hiddenSize: 128, intermediateSize: 344, numHiddenLayers: 4, numAttentionHeads: 4, numKeyValueHeads: 2, vocabSize: V });
  const rng = new Rng(7, 0x6d6b76);
  const perm = Array.from({ length: V }, (_, i) => i);
  for (let i = V - 1; i > 0; i--) { const j = Math.floor(rng.nextFloat() * (i + 1)); [perm[i], perm[j]] = [perm[j]!, perm[i]!]; }
  const seq = (line: number): TokenizedExample => {
    const ids = new Int32Array(S);
    ids[0] = Math.floor(rng.nextFloat() * V);
    for (let t = 1; t < S; t++) ids[t] = rng.nextFloat() < 0.8 ? perm[ids[t - 1]!]! : Math.floor(rng.nextFloat() * V);
    const labels = new Int32Array(S).fill(-100);
    for (let t = 0; t + 1 < S; t++) labels[t] = ids[t + 1]!;
    return { ids, labels, labelTokens: S - 1, line };
  };
  const train = Array.from({ length: o.trainSeqs ?? 512 }, (_, i) => seq(i + 1));
  const heldOut = Array.from({ length: o.heldOutSeqs ?? 64 }, (_, i) => seq(100_000 + i));
  const cfg = {
    ...DEFAULT_TRAIN_CONFIG, ...TINY_RECIPE, max_steps: steps, per_device_train_batch_size: 8, gradient_accumulation_steps: 1,
    learning_rate: 2e-3, lr_scheduler_type: 'cosine', warmup_steps: 10, max_seq_length: S,
  } as TrainConfig;
  return { name: 'markov', llama, weights: randomWeightSource(llama, 11), train, heldOut, padId: 0, cfg, split: 2 };
}

async function evalLoss(stages: Stage[], examples: readonly TokenizedExample[], padId: number): Promise<number> {
  let sum = 0, tokens = 0;
  for (let i = 0; i < examples.length; i += 8) {
    const mb = collate(examples.slice(i, i + 8), padId);
    const key = `eval:${i}`;
    const h = await stages[0]!.forward({ key, batch: mb.batch, seqLen: mb.seqLen, ids: mb.ids }, { train: false });
    const r = await stages[1]!.forward({ key, batch: mb.batch, seqLen: mb.seqLen, hidden: h.hidden, labels: mb.labels }, { train: false });
    sum += r.lossSum!;
    tokens += r.tokens!;
  }
  return sum / tokens;
}

/** Train `task` for its steps with `codec` on the boundary; eval loss on the held-out data at the end. */
export async function runCodec(task: ConvergenceTask, codec: FloatCodec | string, backend: Backend, log: (s: string) => void = () => {}): Promise<Omit<CodecRun, 'eval_loss_regression_vs_f32' | 'train_set_loss_regression_vs_f32'>> {
  const t0 = performance.now();
  const { cfg, llama } = task;
  const lora = loraConfigOf(cfg);
  const C = llama.hiddenSize;
  const stages = [
    await loadStage(task.weights, backend, { layerStart: 0, layerEnd: task.split, lora, gradientCheckpointing: true, seed: cfg.seed }),
    await loadStage(task.weights, backend, { layerStart: task.split, layerEnd: llama.numHiddenLayers, lora, gradientCheckpointing: true, seed: cfg.seed }),
  ];
  const opts = stages.map((s) => createOptimizer(backend, s.params.map((p) => ({ name: p.name, numel: p.data.length })), {
    optim: cfg.optim, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weightDecay: cfg.weight_decay,
  }));
  try {
    const loader = new DataLoader(task.train, { batchSize: cfg.per_device_train_batch_size, accumulation: cfg.gradient_accumulation_steps, seed: cfg.seed, shuffle: cfg.shuffle, padId: task.padId });
    const total = cfg.max_steps;
    const warmup = warmupStepsFor(total, cfg.warmup_steps, cfg.warmup_ratio);
    let fwdBytes = 0, bwdBytes = 0, positions = 0, codecMs = 0;
    // a delta codec runs with its state, as on a swarm hop (encodeTensor alone would code it cold)
    const dp = isDeltaCodec(codec) ? DELTA_SPECS[codec] : isFloatCodec(codec) ? undefined : parseDeltaSpec(codec);
    const hops = dp === undefined ? undefined : { act: new DeltaHop(dp.act), grad: new DeltaHop(dp.grad) };
    const losses: number[] = [];
    for (let step = 0; step < total; step++) {
      const plan = planStep(step, loader.stepMicroBatches(step));
      const grads = stages.map((s) => s.newGrads());
      let lossSum = 0;
      for (let k = 0; k < plan.microBatches.length; k++) {
        const mb = plan.microBatches[k]!;
        const T = mb.batch * mb.seqLen;
        const key = `${step}:${k}:0`;
        const dropoutSeed = dropoutSeedFor(cfg.seed, step, k);
        const { epoch, microBatch } = loader.cursorAt(step);
        const order = epochOrder(task.train.length, cfg.seed, epoch, cfg.shuffle);
        const start = (microBatch + k) * cfg.per_device_train_batch_size;
        const keys = Array.from(order.subarray(start, start + mb.batch), (i) => `ex${i}`);
        const h = await stages[0]!.forward({ key, batch: mb.batch, seqLen: mb.seqLen, ids: mb.ids, dropoutSeed }, { train: true });
        let t = performance.now();
        let hidden: Float32Array, hwBytes: number;
        if (hops === undefined) {
          const hw = encodeTensor(h.hidden!, [T, C], codec as FloatCodec, 'forward.hidden');
          hidden = decodeFloat(hw, 'forward.hidden', [T, C]);
          hwBytes = hw.bytes.length;
        } else ({ out: hidden, bytes: hwBytes } = hops.act.pass(key, h.hidden!, keys, mb.seqLen, C, 'forward.hidden'));
        codecMs += performance.now() - t;
        const r = await stages[1]!.forward({ key, batch: mb.batch, seqLen: mb.seqLen, hidden, labels: mb.labels, dropoutSeed }, { train: true });
        lossSum += r.lossSum ?? 0;
        const { gradIn } = await stages[1]!.backward(key, grads[1]!, { lossScale: plan.lossScale });
        t = performance.now();
        let gradOut: Float32Array, gwBytes: number;
        if (hops === undefined) {
          const gw = encodeTensor(gradIn!, [T, C], codec as FloatCodec, 'backward.gradIn');
          gradOut = decodeFloat(gw, 'backward.gradOut', [T, C]);
          gwBytes = gw.bytes.length;
        } else ({ out: gradOut, bytes: gwBytes } = hops.grad.pass(key, gradIn!, keys, mb.seqLen, C, 'backward.gradOut'));
        codecMs += performance.now() - t;
        await stages[0]!.backward(key, grads[0]!, { gradOut });
        fwdBytes += hwBytes; bwdBytes += gwBytes; positions += T;
      }
      // every attempt of the step counted: its reconstructions become the references
      for (let k = 0; k < plan.microBatches.length && hops !== undefined; k++) { hops.act.commit(`${step}:${k}:0`); hops.grad.commit(`${step}:${k}:0`); }
      const all = [...grads[0]!, ...grads[1]!];
      clipGradNorm(all, cfg.max_grad_norm);
      const lr = learningRateAt(cfg.learning_rate, cfg.lr_scheduler_type, step, warmup, total);
      for (let s = 0; s < 2; s++) await opts[s]!.update(stages[s]!.params.map((p) => p.data), grads[s]!, lr);
      losses.push(stepLoss(plan, lossSum));
      if ((step + 1) % 50 === 0) log(`${task.name} ${codec}: step ${step + 1}/${total} loss ${losses.at(-1)!.toFixed(4)}`);
    }
    if (hops !== undefined) log(`${task.name} ${codec}: modes same/delta/full act ${hops.act.modes.slice(0, 3)} grad ${hops.grad.modes.slice(0, 3)}`);
    const evalL = await evalLoss(stages, task.heldOut, task.padId);
    const trainL = await evalLoss(stages, task.train, task.padId);
    const tail = losses.slice(-Math.min(10, losses.length));
    const bf16 = expectedByteLength('bf16', [1, C]) * 2;
    const perTok = (fwdBytes + bwdBytes) / positions;
    return {
      task: task.name, codec, steps: total,
      bytes_per_token_forward: Number((fwdBytes / positions).toFixed(2)), bytes_per_token_backward: Number((bwdBytes / positions).toFixed(2)),
      bf16_over_codec: Number((bf16 / perTok).toFixed(2)), bits_per_element: Number((perTok * 8 / (2 * C)).toFixed(3)),
      final_train_loss: Number((tail.reduce((a, b) => a + b, 0) / tail.length).toFixed(5)), eval_loss: Number(evalL.toFixed(5)), train_set_loss: Number(trainL.toFixed(5)),
      codec_ms_per_step: Number((codecMs / total).toFixed(2)), seconds: Number(((performance.now() - t0) / 1000).toFixed(1)),
    };
  } finally {
    for (const o of opts) o.dispose();
    for (const s of stages) s.dispose();
  }
}

export async function benchConvergence(o: { tasks?: string[]; codecs?: string[]; steps?: Record<string, number>; threads?: number; log?: (s: string) => void; reference?: { eval: number; train: number } } = {}): Promise<Record<string, unknown>> {
  const log = o.log ?? (() => {});
  const codecs = o.codecs ?? [...FLOAT_CODECS];
  if (codecs[0] !== 'f32' && o.reference === undefined) codecs.unshift('f32'); // the reference runs first
  const backend = new NativeBackend({ threads: o.threads ?? defaultThreadCount() });
  const runs: CodecRun[] = [];
  try {
    for (const name of o.tasks ?? ['demo', 'markov', 'markov3']) {
      const steps = o.steps?.[name] ?? (name === 'demo' ? 160 : 400);
      if (!['demo', 'markov', 'markov3'].includes(name)) throw new Error(`convergence: unknown task ${name}`);
      // markov: 512 sequences, 400 steps of 8 = 6.25 epochs; markov3: 1072 sequences, 2.99 epochs (SFT's usual 2-3)
      const task = name === 'demo' ? await demoTask(steps) : name === 'markov3' ? { ...markovTask(steps, { trainSeqs: 1072 }), name } : markovTask(steps);
      let ref: number | null = o.reference?.eval ?? null, refTrain: number | null = o.reference?.train ?? null;
      for (const codec of codecs) {
        log(`convergence: ${name}, ${codec}, ${steps} steps`);
        const r = await runCodec(task, codec, backend, log);
        if (codec === 'f32') { ref = r.eval_loss; refTrain = r.train_set_loss; }
        runs.push({
          ...r, eval_loss_regression_vs_f32: ref === null ? null : Number(((r.eval_loss - ref) / ref).toFixed(5)),
          train_set_loss_regression_vs_f32: refTrain === null ? null : Number(((r.train_set_loss - refTrain) / refTrain).toFixed(5)),
        });
        log(`convergence: ${name} ${codec}: eval ${r.eval_loss}, train set ${r.train_set_loss}, ${r.bf16_over_codec}x fewer bytes than bf16 (${r.bits_per_element} bits per element)`);
      }
    }
  } finally {
    backend.dispose();
  }
  return {
    note: 'eval_loss: held-out data, f32, after training with the codec on the stage boundary (forward and backward); regression relative to the f32 wire. ' +
      'The demo memorizes 40 unrelated facts, so its held-out loss rises as it learns: judge the demo by train_set_loss, the markov task by eval_loss',
    goal: '>= 20x fewer bytes than bf16 with <= 1% eval-loss regression', runs,
  };
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  const val = (name: string) => { const i = argv.indexOf(name); return i < 0 ? undefined : argv[i + 1]; };
  const quick = argv.includes('--quick');
  const codecs = val('--codecs')?.split(',');
  for (const c of codecs ?? []) if (!isFloatCodec(c) && !c.startsWith('aq:')) { process.stderr.write(`convergence: unknown codec "${c}" (known: ${FLOAT_CODECS.join(', ')})\n`); process.exit(2); }
  const task = val('--task');
  if (task !== undefined && !['demo', 'markov', 'markov3'].includes(task)) { process.stderr.write(`convergence: --task must be demo, markov or markov3, got "${task}"\n`); process.exit(2); }
  const steps = val('--steps');
  const stepMap = steps !== undefined ? { demo: Number(steps), markov: Number(steps), markov3: Number(steps) } : quick ? { demo: 40, markov: 60, markov3: 60 } : undefined;
  // --ref EVAL,TRAIN: the f32 losses of an earlier run with the same task and steps (skips re-running f32)
  const refArg = val('--ref')?.split(',').map(Number);
  const reference = refArg === undefined ? undefined : { eval: refArg[0]!, train: refArg[1]! };
  const r = await benchConvergence({ reference, tasks: task === undefined ? undefined : [task], codecs, steps: stepMap, log: (s) => process.stderr.write(`[convergence] ${s}\n`) });
  process.stdout.write(JSON.stringify(r, null, 2) + '\n');
}
