// `swarmtune launch`: resolve the run spec, publish shards, serve the run, write the adapter.
import { mkdir, readdir, stat } from 'node:fs/promises';
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { readAdapter, writeAdapter } from '../engine/formats/peft.ts';
import type { LoraConfig, NamedTensor } from '../engine/types.ts';
import { createSwarmNode, lockDataDir } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { decodeShard } from '../engine/formats/shard.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { Coordinator } from './run.ts';
import type { CoordinatorOptions, RunEvent } from './run.ts';
import { RunStore } from './store.ts';
import { startDashboard } from './dashboard/server.ts';
import { buildRunData, stageMemoryFn } from './spec.ts';
import { coordinatorConfig } from './config.ts';
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

export async function launchRun(o: LaunchOptions): Promise<number> {
  const train: TrainConfig = resolveTrainConfig({ configFile: o.configFile, flags: o.flags });
  const json = train.json;
  const emit = (e: RunEvent) => { if (json) process.stdout.write(JSON.stringify(e) + '\n'); };
  const log = (msg: string) => { process.stderr.write(`[swarmtune launch] ${msg}\n`); };
  if (train.model === null) throw new Error('launch: --model DIR is required');
  if (train.data === null) throw new Error('launch: --data FILE is required');
  // built once, before anything heavy: a bad environment knob fails here
  const config = coordinatorConfig();
  const logger = o.logger ?? createLogger({ debug: knobs().debug }).child('coordinator');
  const outputDir = path.resolve(train.output_dir);
  const dataDir = path.resolve(o.dataDir ?? path.join(outputDir, 'coordinator'));
  // the model and the data are read and checked before anything is written: a refusal leaves no data dir
  const model = await openModelDir(train.model, { doubleQuant: train.bnb_4bit_use_double_quant });
  const data = await buildRunData(train, model);
  await mkdir(dataDir, { recursive: true });
  const unlock = await lockDataDir(dataDir);

  let lora: LoraConfig = loraConfigOf(train);
  let initAdapter: Map<string, NamedTensor> | null = null;
  if (train.init_adapter !== null) {
    const a = await readAdapter(train.init_adapter);
    lora = a.lora; // the adapter's r, alpha and targets apply, as in `swarmtune train --init-adapter`
    initAdapter = new Map(a.tensors.map((t) => [t.name, t]));
  }
  const store = await RunStore.open(path.join(dataDir, 'db'));
  const meta = await store.getMeta();
  let runId: string;
  let token: string | null = null;
  let allowPeers: Set<string> | null = o.allowPeers !== undefined && o.allowPeers !== null ? new Set(o.allowPeers) : null;
  let publicPull = o.publicPull === true;
  let resume: ResumeState | null = null;
  let pipelineStages = o.pipelineStages;
  if (meta !== null) {
    runId = meta.runId;
    token = (meta.config.join_token as string | undefined) ?? null;
    // a restarted run keeps its access rules
    const saved = meta.config.allow_peers as string[] | null | undefined;
    if (saved !== undefined && saved !== null) allowPeers = new Set(saved);
    publicPull = meta.config.public_pull === true;
    if (meta.numStages > 0) pipelineStages = meta.numStages; // the restarted run keeps its stage split
    resume = await loadResume(store, dataDir);
    if (resume !== null) {
      log(`resuming run ${runId} at the last committed step ${resume.step} (latest optimizer checkpoint: ${resume.checkpointStep !== null ? `step ${resume.checkpointStep}` : 'none'}; volunteers that kept their stage resume it at step ${resume.step})`);
    }
  } else {
    runId = randomBytes(8).toString('hex');
    if (o.private) token = randomBytes(18).toString('base64url');
    await store.putMeta({
      runId, model: train.model, totalSteps: data.totalSteps, createdMs: Date.now(),
      config: { ...train, join_token: token, allow_peers: allowPeers !== null ? [...allowPeers] : null, public_pull: publicPull }, numStages: 0, stages: [],
    });
  }

  const node = await createSwarmNode({ dataDir, listen: [o.listen] });
  const blobs = new BlobStore(dataDir);
  const coordinator = new Coordinator({
    node, store, blobs, runId, modelName: train.model, llama: model.config,
    modelConfigJson: JSON.stringify(model.config.raw), weights: model.weights, train, lora, data,
    memory: stageMemoryFn(model.config, train, lora, model.doubleQuant), minPeers: o.minPeers, pipelineStages,
    wireCodec: o.wireCodec, token, allowPeers, publicPull, initAdapter, resume, emit, log, config, logger,
  });
  // the shard blobs hold the absmax in the form the stages will (double-quantized or not): part of the cache key
  await coordinator.publishShards({ file: path.join(dataDir, 'shards.json'), key: `${await modelFilesKey(model.dir)}:nf4-dq=${model.doubleQuant}` });
  await coordinator.start();
  const addrs = node.getMultiaddrs().map((m) => m.toString());
  emit({ event: 'listening', multiaddr: addrs[0], multiaddrs: addrs, peer_id: node.peerId.toString(), run_id: runId, token });
  log(`listening on ${addrs.join(' ')}`);
  if (resume !== null) emit({ event: 'resumed', run_id: runId, step: resume.step, checkpoint_step: resume.checkpointStep, total_steps: data.totalSteps });
  log(`volunteers: swarmtune join ${addrs[0]}${token !== null ? ` --token ${token}` : ''}`);

  let dashboard: { url: string; close(): Promise<void> } | null = null;
  if (o.dashboardPort !== undefined) {
    const d = await startDashboard({ port: o.dashboardPort, getState: () => coordinator.dashboardState() });
    dashboard = d;
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
  let code = 0;
  try {
    await Promise.race([coordinator.finished, stopped]);
    if (coordinator.runState === 'finished') {
      const tensors = coordinator.currentAdapter();
      await writeAdapter(outputDir, { lora, baseModel: train.model, tensors });
      emit({ event: 'finished', step: coordinator.committedStep, output_dir: outputDir });
      log(`wrote the final adapter (${tensors.length} tensors) to ${outputDir}`);
      if (!o.exitOnFinish) {
        log('serving status and pulls until stopped (Ctrl-C)');
        await stopped;
      }
    } else if (coordinator.runState === 'failed') {
      code = 1;
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    o.signal?.removeEventListener('abort', onSignal);
    await coordinator.stop();
    if (dashboard !== null) await dashboard.close();
    await node.stop();
    await store.close();
    await model.close();
    await unlock();
  }
  return code;
}
