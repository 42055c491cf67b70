// The simulator against a real swarm: a coordinator and 4 volunteers (2 stages × 2 replicas) in one process on
// real libp2p nodes over 127.0.0.1, native backend. The run's own compute per micro-batch and its LevelDB commit
// are measured (wrapping Stage.forward/backward through runVolunteer's onHost hook, as bench/swarm-trace.ts does);
// they and the committed link figures go into a scenario of the same shape, and the simulated step time is
// compared with the real one.
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NativeBackend } from '../engine/backends/native.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { createSwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { runVolunteer } from '../node/volunteer.ts';
import type { StageHost } from '../node/stage-host.ts';
import type { LlamaConfig } from '../engine/types.ts';
import { hfConfigOf } from './model.ts';
import { layerTrainFlopsPerToken, headTrainFlopsPerToken } from '../sim/cost.ts';
import type { Scenario } from '../sim/scenario.ts';
import { simulate } from '../sim/simulate.ts';

export interface RealRunOptions { llama: LlamaConfig; steps: number; microBatches: number; batch: number; seqLen: number; threads?: number }

export interface RealRun {
  /** wall time of each step after the first, ms (step event to step event) */
  stepMs: number[];
  /** mean compute per micro-batch, forward + backward, per stage (ms) */
  computeMsPerStage: number[];
  storeCommitMs: number;
  /** median from stage 0's backward end to its commit: a small request's round trip in this run */
  rttMs: number;
}

export async function realRun(o: RealRunOptions): Promise<RealRun> {
  const cfg = o.llama;
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-scale-real-'));
  const train = resolveTrainConfig({ flags: {
    max_steps: o.steps, per_device_train_batch_size: o.batch, gradient_accumulation_steps: o.microBatches, learning_rate: 1e-4,
    lora_r: 16, lora_alpha: 16, target_modules: 'all-linear', lora_dropout: 0, device: 'cpu', seed: 3,
  } });
  const mbFor = (seed: number): MicroBatch => {
    const T = o.batch * o.seqLen;
    const ids = new Int32Array(T), labels = new Int32Array(T);
    let s = seed * 7919 + 1;
    for (let i = 0; i < T; i++) { s = (s * 1103515245 + 12345) >>> 0; ids[i] = (s >>> 8) % cfg.vocabSize; }
    for (let i = 0; i < T; i++) labels[i] = i % o.seqLen === o.seqLen - 1 ? -100 : ids[i + 1]!;
    return { ids, labels, batch: o.batch, seqLen: o.seqLen };
  };
  const compute: Array<{ stage: number; ms: number }> = [];
  const hosts: Array<{ bwdEnds: number[]; commits: number[] }> = [];
  const commits: number[] = [];
  const stepTimes: number[] = [];
  const errors: string[] = [];
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'scale', model: 'scale', totalSteps: o.steps, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const origCommit = store.commitStep.bind(store);
  store.commitStep = async (...a: Parameters<typeof store.commitStep>) => {
    const t0 = performance.now();
    try { return await origCommit(...a); } finally { commits.push(performance.now() - t0); }
  };
  const backends = [0, 1, 2, 3].map(() => new NativeBackend({ threads: o.threads ?? 1 }));
  try {
    const coord = new Coordinator({
      node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'scale', modelName: 'scale', llama: cfg,
      modelConfigJson: JSON.stringify(hfConfigOf(cfg)), weights: randomWeightSource(cfg, 1), train, lora: loraConfigOf(train),
      data: { totalSteps: o.steps, microBatchesForStep: async (s) => Array.from({ length: o.microBatches }, (_, k) => mbFor(s * o.microBatches + k)), cursorAfter: (s) => s * o.microBatches },
      memory: () => 1, minPeers: 4, pipelineStages: 2, wireCodec: 'f32', token: null, initAdapter: null, resume: null,
      emit: (e: RunEvent) => {
        if (e.event === 'training' || e.event === 'step') stepTimes.push(performance.now());
        if (e.event === 'error') errors.push(String(e.message));
      },
      log: () => {},
    });
    await coord.publishShards();
    await coord.start();
    const addr = node.getMultiaddrs()[0]!.toString();
    const instrument = (h: StageHost) => {
      const st = h.stage as unknown as Record<'forward' | 'backward', (...a: unknown[]) => Promise<unknown>>;
      const mine = { bwdEnds: [] as number[], commits: [] as number[] };
      hosts.push(mine);
      for (const name of ['forward', 'backward'] as const) {
        const orig = st[name].bind(st);
        st[name] = async (...a: unknown[]) => {
          const t0 = performance.now();
          try { return await orig(...a); } finally {
            const t1 = performance.now();
            if (stepTimes.length >= 2) compute.push({ stage: h.stageIndex, ms: t1 - t0 });
            if (name === 'backward' && h.stageIndex === 0) mine.bwdEnds.push(t1);
          }
        };
      }
      // stage 0 finishes a micro-batch last: from its backward's end, its report reaches the coordinator and
      // the commit comes back — one round trip of a small request, on this machine under its load now
      const hh = h as unknown as Record<'commit', (...a: unknown[]) => unknown>;
      const commit = hh.commit.bind(h);
      hh.commit = (...a: unknown[]) => { if (h.stageIndex === 0) mine.commits.push(performance.now()); return commit(...a); };
    };
    const vols = backends.map((b, i) => runVolunteer({ coordinator: addr, token: null, device: 'cpu', maxMemoryBytes: 2 ** 32, dataDir: path.join(tmp, `v${i}`), json: false, listen: '/ip4/127.0.0.1/tcp/0' },
      { backend: b, onHost: instrument, onEvent: () => {} }));
    await coord.finished;
    const codes = await Promise.all(vols);
    await coord.stop();
    if (errors.length > 0 || codes.some((c) => c !== 0)) throw new Error(`real run failed: volunteers exited ${codes}; coordinator errors: ${errors.join('; ') || 'none'}`);
  } finally {
    try { await node.stop(); } catch { /* stopped */ }
    try { await store.close(); } catch { /* closed */ }
    for (const b of backends) { try { b.dispose(); } catch { /* disposed by the volunteer */ } }
    await rm(tmp, { recursive: true, force: true });
  }
  // steps after the first; compute recorded from the second step on (the first warms thread pools)
  const stepMs = stepTimes.slice(2).map((t, i) => t - stepTimes[i + 1]!);
  const measuredMbs = (o.steps - 1) * o.microBatches;
  const computeMsPerStage = [0, 1].map((s) => compute.filter((c) => c.stage === s).reduce((a, c) => a + c.ms, 0) / measuredMbs);
  const gaps = hosts.flatMap((h) => h.commits.map((c, k) => c - (h.bwdEnds[k] ?? c)).filter((g) => g > 0)).sort((a, b) => a - b);
  const rttMs = gaps.length > 0 ? gaps[Math.floor(gaps.length / 2)]! : LOOPBACK.rttMs;
  return { stepMs, computeMsPerStage, rttMs, storeCommitMs: commits.slice(1).reduce((a, b) => a + b, 0) / Math.max(1, commits.length - 1) };
}

/** Loopback link figures from the committed bench (docs/benchmarks.md, bench/results/2026-11-29.json): one-frame
 *  RPCs at 181.4 MB/s, a small request's round trip 2.82 ms median. */
export const LOOPBACK = { mbit: 181.4 * 8, rttMs: 2.82 };

/** The scenario of that run: 4 identical peers whose achieved FLOP/s make the simulator's per-stage compute
 *  equal the measured mean, the loopback link, the measured commit. */
export function scenarioOfRealRun(o: RealRunOptions, r: RealRun): Scenario {
  const cfg = o.llama, L = cfg.numHiddenLayers, T = o.batch * o.seqLen;
  const half = Math.ceil(L / 2);
  const flops = [half * layerTrainFlopsPerToken(cfg, o.seqLen) * T, ((L - half) * layerTrainFlopsPerToken(cfg, o.seqLen) + headTrainFlopsPerToken(cfg)) * T];
  const rate = (flops[0]! + flops[1]!) / ((r.computeMsPerStage[0]! + r.computeMsPerStage[1]!) / 1000);
  return {
    name: 'real-4-volunteers', seed: 1, model: cfg, modelName: 'bench model', steps: o.steps, microBatch: o.batch, seqLen: o.seqLen,
    accumulation: o.microBatches, loraR: 16, wireBytesPerElement: 4, pipelineStages: 2,
    peers: { count: 4, classes: [{ name: 'this-machine', share: 1, memoryGiB: 64, peakTflops: rate / 1e12, efficiency: 1 }], linkMbit: [LOOPBACK.mbit, LOOPBACK.mbit], rttMs: [r.rttMs, r.rttMs], natShare: 0, coneShare: 0 },
    churn: null,
    coordinator: { linkMbit: LOOPBACK.mbit, cpuMsPerRequest: 1.41, cpuNsPerByte: 3.9, storeCommitMs: r.storeCommitMs, controlBytesPerStage: 2854, heartbeatBytes: 600, heartbeatCpuMs: 1.41 },
    tail: 'coordinator', routes: 'as-built', lateJoin: 'as-built', heartbeats: 'bounded', schedule: 'as-built', maxHours: 1000, sources: {},
  };
}

/** Real and simulated step time (ms, mean of the steps after the first) and their ratio. */
export async function compareWithReal(o: RealRunOptions): Promise<{ real_step_ms: number; simulated_step_ms: number; ratio: number; compute_ms_per_stage: number[]; store_commit_ms: number; rtt_ms: number }> {
  const r = await realRun(o);
  const sim = await simulate(scenarioOfRealRun(o, r));
  const real = r.stepMs.reduce((a, b) => a + b, 0) / r.stepMs.length;
  // the simulator's first step also splits evenly (no throughput known yet); compare the later ones
  const simulated = sim.step_s.mean * 1000;
  return { real_step_ms: Number(real.toFixed(1)), simulated_step_ms: Number(simulated.toFixed(1)), ratio: Number((simulated / real).toFixed(3)), compute_ms_per_stage: r.computeMsPerStage.map((x) => Number(x.toFixed(1))), store_commit_ms: Number(r.storeCommitMs.toFixed(1)), rtt_ms: Number(r.rttMs.toFixed(2)) };
}

if (import.meta.main) {
  const { benchModelConfig } = await import('./model.ts');
  console.log(JSON.stringify(await compareWithReal({ llama: benchModelConfig(), steps: 3, microBatches: 8, batch: 2, seqLen: 128 })));
}
