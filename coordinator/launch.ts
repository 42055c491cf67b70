// `swarmtune launch`: resolve the run spec, publish shards, serve the run, write the adapter.
import { existsSync } from 'node:fs';
import { mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { resolveTargets } from '../engine/model/arch.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { ADAPTER_WEIGHTS_FILE, readAdapter, writeAdapter } from '../engine/formats/peft.ts';
import type { LoraConfig, NamedTensor } from '../engine/types.ts';
import { createSwarmNode, lockDataDir } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { decodeShard } from '../engine/formats/shard.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { Coordinator } from './run.ts';
import type { CoordinatorOptions, RunEvent } from './run.ts';
import { RunStore } from './store.ts';
import type { RunMeta } from './store.ts';
import { ResumeError, RunMismatchError, describeRun, fileSha256, fingerprintDiff, ignoredFlags, mismatchMessage, modelSha256, resultConfig, storedTrainConfig, trainingArgs } from './identity.ts';
import type { RunFingerprint } from './identity.ts';
import { Retention, TRAINING_ARGS_FILE } from './retention.ts';
import { progressLine } from './progress.ts';
import { startDashboard } from './dashboard/server.ts';
import { buildRunData, stageMemoryFn } from './spec.ts';
import { coordinatorConfig } from './config.ts';
import { RunEvaluator } from './eval.ts';
import { checkEvalPlan } from '../engine/train/evaluation.ts';
import { dataOptionsOf, loadDataset } from '../engine/train/data.ts';
import { TensorBoardWriter, defaultLoggingDir } from '../engine/logging/tensorboard.ts';
import { knobs } from '../engine/env.ts';
import { createLogger } from '../protocol/log.ts';
import type { Logger } from '../protocol/log.ts';

export interface LaunchOptions {
  configFile: string | null;
  /** snake_case training keys from flags */
  flags: Record<string, unknown>;
  listen: string;
  minPeers: number;
  pipelineStages?: number;
  wireCodec: FloatCodec;
  private: boolean;
  /** peer ids admitted to a private run (the run is private when this is set or `private`) */
  allowPeers?: string[] | null;
  /** a private run's adapter may be pulled by anyone */
  publicPull?: boolean;
  exitOnFinish: boolean;
  dashboardPort?: number;
  dataDir: string | null;
  /** debug lines under swarmtune:coordinator:* (default: this process's DEBUG patterns, to stderr) */
  logger?: Logger;
  /** stops the run as SIGINT/SIGTERM do */
  signal?: AbortSignal;
  /** continue the run the data dir holds with its stored config, ignoring the training flags */
  resume?: boolean;
  /** NAT traversal (docs/swarm.md "NAT strategy"): serve circuit relay v2 and AutoNAT to admitted peers only */
  nat?: boolean;
}

/** Identifies the model's files (names, sizes, mtimes): unchanged files need no re-quantization. */
async function modelFilesKey(dir: string): Promise<string> {
  const h = createHash('sha256').update(path.resolve(dir));
  for (const f of (await readdir(dir)).sort()) {
    const st = await stat(path.join(dir, f));
    if (st.isFile()) h.update(`\0${f}\0${st.size}\0${st.mtimeMs}`);
  }
  return h.digest('hex');
}

export type ResumeState = NonNullable<CoordinatorOptions['resume']>;

/** What a restarted coordinator resumes from: the last committed step with its adapter (no committed
 *  step is redone; the optimizer moments of that step live on the volunteers that kept their stage
 *  and rejoin offering it) and the latest optimizer checkpoint (≤ that step, only for stages no
 *  volunteer kept). Null when nothing was committed yet, not even the initial adapter. */
export async function loadResume(store: RunStore, what = 'the run store'): Promise<ResumeState | null> {
  const latest = await store.latest();
  const step = latest?.step ?? 0;
  const bytes = await store.adapter(step);
  if (bytes === null) {
    if (latest !== null) throw new Error(`${what}: step ${step} is committed but its adapter is missing`);
    return null;
  }
  const t = decodeShard(bytes, `adapter of step ${step}`);
  const ckpt = await store.latestCheckpoint();
  const states: Uint8Array[] = [];
  for (let s = 0; ckpt !== null && s < ckpt.stages; s++) {
    const b = await store.optimizerState(ckpt.step, s);
    if (b === null) throw new Error(`${what}: the checkpoint of step ${ckpt.step} lacks stage ${s}'s optimizer state`);
    states.push(b);
  }
  return {
    step,
    adapter: new Map([...t.float].map(([name, x]) => [name, { name, shape: x.shape, data: x.data }])),
    optimizerStates: ckpt !== null ? states : null,
    checkpointStep: ckpt?.step ?? null,
  };
}

/** The fingerprint the asked-for run would have (weights_sha256 comes once the shards are published). */
async function askedFingerprint(train: TrainConfig, modelDir: string, wire: FloatCodec): Promise<RunFingerprint> {
  return {
    version: 1, model: train.model!, data: train.data!, model_sha256: await modelSha256(modelDir), weights_sha256: null,
    data_sha256: await fileSha256(train.data!),
    init_adapter_sha256: train.init_adapter !== null ? await fileSha256(path.join(train.init_adapter, ADAPTER_WEIGHTS_FILE)) : null,
    wire_dtype: wire, config: resultConfig(train),
  };
}

/** A store written before runs had a fingerprint: what its meta says, the data by path. */
function legacyFingerprint(meta: RunMeta, asked: RunFingerprint): RunFingerprint {
  const stored = storedTrainConfig(meta.config);
  const sameData = stored.data !== null && path.resolve(stored.data) === path.resolve(asked.data);
  return { ...asked, model: meta.model, data: stored.data ?? '?', data_sha256: sameData ? asked.data_sha256 : 'unknown', config: resultConfig(stored) };
}

export async function launchRun(o: LaunchOptions): Promise<number> {
  const asked: TrainConfig = resolveTrainConfig({ configFile: o.configFile, flags: o.flags });
  const log = (msg: string) => { process.stderr.write(`[swarmtune launch] ${msg}\n`); };
  // built once, before anything heavy: a bad environment knob fails here
  const config = coordinatorConfig();
  const logger = o.logger ?? createLogger({ debug: knobs().debug }).child('coordinator');
  const dataDir = path.resolve(o.dataDir ?? path.join(path.resolve(asked.output_dir), 'coordinator'));
  // released in reverse order however launchRun ends
  const releases: Array<() => Promise<void>> = [];
  try {
    return await launchIn(o, asked, dataDir, { log, config, logger, releases });
  } finally {
    for (const r of releases.reverse()) await r();
  }
}

async function launchIn(o: LaunchOptions, asked: TrainConfig, dataDir: string,
  env: { log: (msg: string) => void; config: ReturnType<typeof coordinatorConfig>; logger: Logger; releases: Array<() => Promise<void>> }): Promise<number> {
  const { log, config, logger, releases } = env;
  let store: RunStore | null = null;
  let meta: RunMeta | null = null;
  const openStore = async () => {
    await mkdir(dataDir, { recursive: true });
    releases.push(await lockDataDir(dataDir));
    const st = store = await RunStore.open(path.join(dataDir, 'db'));
    releases.push(() => st.close());
    meta = await st.getMeta();
  };
  let train = asked;
  let wireCodec = o.wireCodec;
  if (o.resume === true) {
    if (!existsSync(path.join(dataDir, 'db'))) throw new ResumeError(`--resume: ${dataDir} holds no run to resume (launch without --resume starts one)`);
    await openStore();
    const m = meta as RunMeta | null;
    if (m === null) throw new ResumeError(`--resume: ${dataDir} holds no run to resume (launch without --resume starts one)`);
    train = { ...storedTrainConfig(m.config), json: asked.json };
    wireCodec = (m.fingerprint?.wire_dtype as FloatCodec | undefined) ?? wireCodec;
    const ignored = [...ignoredFlags(train, asked, o.flags), ...(o.configFile !== null ? ['--config'] : []), ...(wireCodec !== o.wireCodec ? ['--wire-dtype'] : [])];
    log(`--resume: continuing run ${m.runId} with its stored config${ignored.length > 0 ? `; ignoring ${ignored.join(' ')}` : ''}`);
  }
  const json = train.json;
  if (train.model === null) throw new Error('launch: --model DIR is required');
  if (train.data === null) throw new Error('launch: --data FILE is required');
  // the model and the data are read and checked before anything is written: a refusal leaves no data dir
  const model = await openModelDir(train.model, { doubleQuant: train.bnb_4bit_use_double_quant });
  releases.push(() => model.close());
  let lora: LoraConfig = loraConfigOf(train);
  let initAdapter: Map<string, NamedTensor> | null = null;
  if (train.init_adapter !== null) {
    const a = await readAdapter(train.init_adapter);
    lora = a.lora; // the adapter's r, alpha and targets apply, as in `swarmtune train --init-adapter`
    initAdapter = new Map(a.tensors.map((t) => [t.name, t]));
  }
  // the family's own linears (Phi-3's fused qkv_proj, gate_up_proj): what assignments and the adapter name
  lora = { ...lora, targetModules: resolveTargets(model.config, lora.targetModules) };
  const data = await buildRunData(train, model);
  // eval_data goes through the run's own data pipeline (the coordinator evaluates: coordinator/eval.ts),
  // checked with the eval plan before anything is written
  const evalData = train.eval_data !== null && train.eval_strategy !== 'no' ? loadDataset(train.eval_data, model.tokenizer!, dataOptionsOf(train)) : null;
  checkEvalPlan(train, data.totalSteps);
  const want = await askedFingerprint(train, model.dir, wireCodec);
  if (store === null) await openStore();
  const runStore = store!;
  const existing = meta as RunMeta | null;

  let runId: string;
  let token: string | null = null;
  let allowPeers: Set<string> | null = o.allowPeers !== undefined && o.allowPeers !== null ? new Set(o.allowPeers) : null;
  let publicPull = o.publicPull === true;
  let resume: ResumeState | null = null;
  let pipelineStages = o.pipelineStages;
  let fingerprint: RunFingerprint = want;
  let finished = false;
  if (existing !== null) {
    runId = existing.runId;
    const stored = existing.fingerprint ?? legacyFingerprint(existing, want);
    const latestStep = (await runStore.latest())?.step ?? 0;
    const diff = fingerprintDiff(stored, want);
    if (diff.length > 0 && o.resume === true) {
      throw new ResumeError(`--resume: run ${runId}'s ${diff.map((d) => d.key).join(', ')} changed on disk since it was started (${diff.map((d) => `${d.stored} then, ${d.asked} now`).join('; ')}): restore them, or use a new --data-dir`);
    }
    if (diff.length > 0) throw new RunMismatchError(mismatchMessage({ runId, step: latestStep, totalSteps: existing.totalSteps, diff }));
    fingerprint = { ...want, weights_sha256: stored.weights_sha256, model: stored.model, data: stored.data };
    // the stored run's own LoRA config writes its adapters, whatever this process was given
    if (existing.lora !== undefined) lora = existing.lora;
    token = (existing.config.join_token as string | undefined) ?? null;
    // a restarted run keeps its access rules
    const saved = existing.config.allow_peers as string[] | null | undefined;
    if (saved !== undefined && saved !== null) allowPeers = new Set(saved);
    publicPull = existing.config.public_pull === true;
    if (existing.numStages > 0) pipelineStages = existing.numStages; // the restarted run keeps its stage split
    resume = await loadResume(runStore, dataDir);
    finished = resume !== null && resume.step >= existing.totalSteps;
    if (resume !== null && !finished) {
      log(`resuming run ${runId} at the last committed step ${resume.step} of ${existing.totalSteps} (latest optimizer checkpoint: ${resume.checkpointStep !== null ? `step ${resume.checkpointStep}` : 'none'}; volunteers that kept their stage resume it at step ${resume.step})`);
    }
  } else {
    runId = randomBytes(8).toString('hex');
    if (o.private) token = randomBytes(18).toString('base64url');
  }
  const outputDir = path.resolve(train.output_dir);
  const args = trainingArgs(train);
  log(`data: ${data.examples} examples from ${train.data}${data.skipped > 0 ? `, ${data.skipped} bad lines skipped` : ''}${data.truncated > 0 ? `, ${data.truncated} truncated at ${train.max_seq_length} tokens` : ''}`);
  log(`${data.totalSteps} optimizer steps of ${data.microBatchesPerStep} micro-batch(es) × ${train.per_device_train_batch_size} sequences (${data.stepsPerEpoch} steps per epoch)`);
  if (train.eval_data !== null && train.eval_strategy === 'no') log(`note: eval_data ${train.eval_data} is not evaluated during training: eval_strategy is "no" (set steps or epoch)`);
  if (evalData !== null) log(`eval data: ${evalData.examples.length} examples from ${train.eval_data}${evalData.skipped.length > 0 ? `, ${evalData.skipped.length} bad lines skipped` : ''}${evalData.truncated > 0 ? `, ${evalData.truncated} truncated at ${train.max_seq_length} tokens` : ''}`);
  let tb: TensorBoardWriter | null = null;
  if (train.report_to.includes('tensorboard') && !finished) {
    const tbw = tb = new TensorBoardWriter(train.logging_dir ?? defaultLoggingDir(outputDir));
    releases.push(async () => { tbw.close(); });
    log(`tensorboard: ${tbw.path} (tensorboard --logdir ${train.logging_dir ?? path.join(outputDir, 'runs')})`);
  }
  // HF logs the mean loss since the previous log line every logging_steps
  let tbWindow: number[] = [];

  let coordinator: Coordinator | null = null;
  let trainingStarted: { ms: number; step: number } | null = null;
  const emit = (e: RunEvent) => {
    if (e.event === 'step' && tb !== null) {
      const step = Number(e.step);
      tbWindow.push(Number(e.loss));
      if (step % train.logging_steps === 0 || step === Number(e.total_steps)) {
        tb.add(step, { loss: tbWindow.reduce((a, b) => a + b, 0) / tbWindow.length, grad_norm: Number(e.grad_norm), learning_rate: Number(e.lr), epoch: step / data.stepsPerEpoch });
        tbWindow = [];
      }
    }
    if (json) { process.stdout.write(JSON.stringify(e) + '\n'); return; }
    // without --json: what `swarmtune train` prints, a progress line per logged step
    if (e.event === 'training') trainingStarted = { ms: performance.now(), step: Number(e.step) };
    if (e.event === 'step') {
      const step = Number(e.step), total = Number(e.total_steps);
      if (step % train.logging_steps !== 0 && step !== total) return;
      const t0 = trainingStarted ?? { ms: performance.now(), step: step - 1 };
      log(progressLine({ step, totalSteps: total, loss: Number(e.loss), lr: Number(e.lr), tokensPerSecond: Number(e.tokens_per_s),
        peers: coordinator?.livePeers() ?? 0, elapsedMs: performance.now() - t0.ms, stepsDone: step - t0.step }));
    }
  };

  // released after the coordinator stopped (releases run in reverse), so no evaluation is cut short
  const evaluator: RunEvaluator = new RunEvaluator({
    train, llama: model.config, weights: model.weights, lora, examples: evalData?.examples ?? null, padId: model.tokenizer!.padTokenId ?? model.tokenizer!.eosTokenId ?? 0,
    totalSteps: data.totalSteps, stepsPerEpoch: data.stepsPerEpoch, outputDir, adapter: (): NamedTensor[] => c.currentAdapter(), tensorboard: tb, emit, log,
  });
  releases.push(async () => { evaluator.close(); });
  if (resume !== null) await evaluator.restore(resume.step);

  const node = await createSwarmNode({
    dataDir, listen: [o.listen],
    // no open relay: a reservation, and a relayed connection, only for peers this run admitted
    nat: o.nat === true ? { role: 'coordinator', isMember: (id) => coordinator?.isMember(id) ?? false } : undefined,
  });
  releases.push(async () => { await node.stop(); });
  const blobs = new BlobStore(dataDir);
  const c: Coordinator = coordinator = new Coordinator({
    node, store: runStore, blobs, runId, modelName: train.model, llama: model.config,
    modelConfigJson: JSON.stringify(model.config.raw), weights: model.weights, train, lora, data,
    memory: stageMemoryFn(model.config, train, lora, model.doubleQuant, model.vocabBf16 ? 2 : 4), minPeers: o.minPeers, pipelineStages,
    wireCodec, token, allowPeers, publicPull, initAdapter, resume, emit, log, config, logger,
    history: existing !== null ? await runStore.history() : [], alreadyFinished: finished,
    runConfig: describeRun(fingerprint),
    afterCommit: async (step: number, signal: AbortSignal): Promise<void> => {
      // HF evaluates a step before it saves it, so the checkpoint policy knows the best
      await evaluator.afterCommit(step, signal);
      await retention.afterCommit(step);
    },
  });
  releases.push(() => c.stop());
  const retention: Retention = new Retention({
    store: runStore, train, totalSteps: data.totalSteps, stepsPerEpoch: data.stepsPerEpoch, outputDir, lora, baseModel: train.model,
    trainingArgs: args, adapter: (): NamedTensor[] => c.currentAdapter(), pruneBlobsBefore: (step) => c.pruneBlobsBefore(step), log,
    protect: () => (train.load_best_model_at_end ? evaluator.best.state.best_model_checkpoint : null),
  });
  if (!finished) {
    // the weights' content hash is known once they are quantized into shard blobs (cached across launches)
    const weights = await c.publishShards({ file: path.join(dataDir, 'shards.json'), key: `${await modelFilesKey(model.dir)}:nf4-dq=${model.doubleQuant}` });
    if (fingerprint.weights_sha256 !== null && fingerprint.weights_sha256 !== weights) {
      const diff = [{ key: 'model', stored: `model=${path.basename(fingerprint.model)} (sha256 ${fingerprint.weights_sha256.slice(0, 8)}…)`, asked: `model=${path.basename(train.model)} (sha256 ${weights.slice(0, 8)}…)` }];
      if (o.resume === true) throw new ResumeError(`--resume: run ${runId}'s model weights changed on disk since it was started (sha256 ${fingerprint.weights_sha256.slice(0, 8)}… then, ${weights.slice(0, 8)}… now): restore them, or use a new --data-dir`);
      throw new RunMismatchError(mismatchMessage({ runId, step: resume?.step ?? 0, totalSteps: (existing as RunMeta | null)?.totalSteps ?? data.totalSteps, diff }));
    }
    fingerprint = { ...fingerprint, weights_sha256: weights };
  }
  if (existing === null) {
    await runStore.putMeta({
      runId, model: train.model, totalSteps: data.totalSteps, createdMs: Date.now(),
      config: { ...train, join_token: token, allow_peers: allowPeers !== null ? [...allowPeers] : null, public_pull: publicPull }, numStages: 0, stages: [],
      fingerprint, lora,
    });
  } else if (existing.fingerprint === undefined || existing.lora === undefined || existing.fingerprint.weights_sha256 === null) {
    await runStore.putMeta({ ...existing, fingerprint, lora: existing.lora ?? lora });
  }
  await c.start();
  const addrs = node.getMultiaddrs().map((m) => m.toString());
  emit({ event: 'listening', multiaddr: addrs[0], multiaddrs: addrs, peer_id: node.peerId.toString(), run_id: runId, token });
  log(`listening on ${addrs.join(' ')}`);
  if (resume !== null && !finished) emit({ event: 'resumed', run_id: runId, step: resume.step, checkpoint_step: resume.checkpointStep, total_steps: data.totalSteps });
  if (!finished) log(`volunteers: swarmtune join ${addrs[0]}${token !== null ? ` --token ${token}` : ''}`);

  let dashboard: { url: string; close(): Promise<void> } | null = null;
  if (o.dashboardPort !== undefined) {
    const d = await startDashboard({ port: o.dashboardPort, getState: () => ({ ...c.dashboardState(), evals: evaluator.evals.map((e) => ({ step: e.step, evalLoss: e.eval_loss })) }) });
    dashboard = d;
    releases.push(async () => { await d.close(); });
    emit({ event: 'dashboard', url: d.url });
    log(`dashboard at ${d.url}`);
  }

  let stopResolve!: () => void;
  const stopped = new Promise<void>((r) => { stopResolve = r; });
  const onSignal = () => { log('stopping on signal'); stopResolve(); };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  o.signal?.addEventListener('abort', onSignal, { once: true });
  if (o.signal?.aborted === true) onSignal();
  releases.push(async () => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    o.signal?.removeEventListener('abort', onSignal);
  });
  await Promise.race([c.finished, stopped]);
  if (c.runState === 'finished') {
    const tensors = await evaluator.finalAdapter(c.currentAdapter());
    await writeAdapter(outputDir, { lora, baseModel: train.model, tensors });
    await writeFile(path.join(outputDir, TRAINING_ARGS_FILE), JSON.stringify(args, null, 2) + '\n');
    emit({ event: 'finished', step: c.committedStep, output_dir: outputDir, ...(finished ? { already: true } : {}) });
    if (finished) log(`run ${runId} is finished (step ${c.committedStep} of ${data.totalSteps}); nothing to train. Wrote its adapter (${tensors.length} tensors) and ${TRAINING_ARGS_FILE} to ${outputDir}`);
    else log(`wrote the final adapter (${tensors.length} tensors) and ${TRAINING_ARGS_FILE} to ${outputDir}`);
    if (!o.exitOnFinish) {
      log('serving status and pulls until stopped (Ctrl-C)');
      await stopped;
    }
    return 0;
  }
  return c.runState === 'failed' ? 1 : 0;
}
