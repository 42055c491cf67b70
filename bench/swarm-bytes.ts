// Bytes per peer in a swarm step: the coordinator against its volunteers, each in its own process and
// each counting the TCP bytes of every socket it opens or accepts (node:diagnostics_channel
// net.client.socket / net.server.socket; socket.bytesRead / bytesWritten: Noise and Yamux included).
//
// The coordinator runs in this process (the bench model with random weights, 2 stages × 1 replica,
// as bench/swarm-trace.ts); each volunteer is `node bench/swarm-bytes.ts --volunteer ADDR DIR`, which
// prints its counters as a JSON line whenever it gets SIGUSR2. The coordinator's counters are read at
// the `training` event, at each step's first reduce (the end of its micro-batches) and at
// each `step` event, so its bytes split into the micro-batch phase (control messages and reports:
// O(tokens)) and the step tail (the light tail's reduce and apply rounds, O(stages × replicas), plus
// the adapter upload and the optimizer state at their cadence: O(LoRA parameters), independent of
// the micro-batch size). `--replicas=2` runs 2 stages × 2 replicas (the reduce moves gradients
// between the replicas of a stage, not through the coordinator). The volunteers' counters are read at `training` and after the
// last step; their difference over the steps is what each moved per step.
import dc from 'node:diagnostics_channel';
import type { Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { NativeBackend } from '../engine/backends/native.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { createSwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { StagePeerClient } from '../protocol/stage-client.ts';
import { expectedByteLength } from '../protocol/tensor.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { runVolunteer } from '../node/volunteer.ts';
import { benchModelConfig, hfConfigOf } from './model.ts';
import { NODE, startProc, kill } from './procs.ts';
import type { Proc } from './procs.ts';
import type { LlamaConfig } from '../engine/types.ts';

interface Counts { bytesIn: number; bytesOut: number }

/** Every TCP socket this process opens or accepts from now on, for its byte counters. */
function countSockets(): () => Counts {
  const socks = new Set<Socket>();
  const add = (m: unknown) => { const s = (m as { socket?: Socket }).socket; if (s !== undefined) socks.add(s); };
  dc.subscribe('net.client.socket', add);
  dc.subscribe('net.server.socket', add);
  return () => {
    let bytesIn = 0, bytesOut = 0;
    for (const s of socks) { bytesIn += s.bytesRead; bytesOut += s.bytesWritten; }
    return { bytesIn, bytesOut };
  };
}

const sub = (a: Counts, b: Counts): Counts => ({ bytesIn: a.bytesIn - b.bytesIn, bytesOut: a.bytesOut - b.bytesOut });
const perStep = (c: Counts, n: number) => ({ in_bytes: Math.round(c.bytesIn / n), out_bytes: Math.round(c.bytesOut / n) });

export interface BytesOptions { llama?: LlamaConfig; codec: FloatCodec; steps: number; microBatches: number; batch: number; seqLen: number; log?: (s: string) => void;
  /** replicas per stage (default 1): with 2, the replicas of a stage reduce their gradients peer to peer */
  replicas?: number }

export async function benchSwarmBytes(o: BytesOptions): Promise<Record<string, unknown>> {
  const counts = countSockets();
  const cfg = o.llama ?? benchModelConfig();
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-bytes-'));
  const train = resolveTrainConfig({ flags: {
    max_steps: o.steps, per_device_train_batch_size: o.batch, gradient_accumulation_steps: o.microBatches, learning_rate: 1e-4,
    lora_r: 16, lora_alpha: 16, target_modules: 'all-linear', lora_dropout: 0, device: 'cpu', seed: 3,
    // the data plane alone: a spot check (bench/verify.ts measures them) brings the boundary tensors
    // through the coordinator, on micro-batches its random secret picks
    verify_fraction: 0,
  } });
  const mbFor = (seed: number): MicroBatch => {
    const T = o.batch * o.seqLen;
    const ids = new Int32Array(T), labels = new Int32Array(T);
    let s = seed * 7919 + 1;
    for (let i = 0; i < T; i++) { s = (s * 1103515245 + 12345) >>> 0; ids[i] = (s >>> 8) % cfg.vocabSize; }
    for (let i = 0; i < T; i++) labels[i] = i % o.seqLen === o.seqLen - 1 ? -100 : ids[i + 1]!;
    return { ids, labels, batch: o.batch, seqLen: o.seqLen };
  };
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'bytes', model: 'bench', totalSteps: o.steps, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const vols: Proc[] = [];
  const R = o.replicas ?? 1;
  // the coordinator's counters at: training, then per step [first collect, step event]
  let atTraining: Counts | null = null;
  const phase: Array<{ mbEnd?: Counts; end?: Counts }> = [];
  let stepNo = 0;
  // the end of a step's micro-batches: its first reduce (the light tail; a collect in older versions)
  const origReduce = StagePeerClient.prototype.reduce;
  StagePeerClient.prototype.reduce = function (...a: Parameters<StagePeerClient['reduce']>) {
    const p = (phase[stepNo] ??= {});
    p.mbEnd ??= counts();
    return origReduce.apply(this, a);
  };
  const volunteerCounts = (): Promise<Counts[]> => Promise.all(vols.map(async (v) => {
    const before = v.events.filter((e) => e.event === 'bytes').length;
    process.kill(v.child.pid!, 'SIGUSR2');
    for (let i = 0; i < 500; i++) {
      const got = v.events.filter((e) => e.event === 'bytes');
      if (got.length > before) return { bytesIn: Number(got.at(-1)!.bytesIn), bytesOut: Number(got.at(-1)!.bytesOut) };
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error('a volunteer did not report its byte counters');
  }));
  let volAtTraining: Promise<Counts[]> | null = null, volAtEnd: Promise<Counts[]> | null = null;
  const errors: string[] = [];
  try {
    const coord = new Coordinator({
      node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'bytes', modelName: 'bench', llama: cfg,
      modelConfigJson: JSON.stringify(hfConfigOf(cfg)), weights: randomWeightSource(cfg, 1), train, lora: loraConfigOf(train),
      data: { totalSteps: o.steps, microBatchesForStep: async (s) => Array.from({ length: o.microBatches }, (_, k) => mbFor(s * o.microBatches + k)), cursorAfter: (s) => s * o.microBatches },
      memory: () => 1, minPeers: 2 * R, pipelineStages: 2, wireCodec: o.codec, token: null, initAdapter: null, resume: null,
      emit: (e: RunEvent) => {
        if (e.event === 'training') { atTraining = counts(); volAtTraining = volunteerCounts(); }
        if (e.event === 'step') {
          (phase[stepNo] ??= {}).end = counts();
          stepNo++;
          if (stepNo === o.steps) volAtEnd = volunteerCounts();
        }
        if (e.event === 'error') errors.push(String(e.message));
      },
      log: (m: string) => o.log?.(`[coordinator] ${m}`),
    });
    await coord.publishShards();
    await coord.start();
    const addr = node.getMultiaddrs()[0]!.toString();
    for (let i = 0; i < 2 * R; i++) vols.push(startProc(NODE, [import.meta.filename, '--volunteer', addr, path.join(tmp, `v${i}`)]));
    await coord.finished;
    const codes = await Promise.all(vols.map((v) => v.exit));
    await coord.stop();
    if (errors.length > 0 || codes.some((c) => c !== 0)) throw new Error(`swarm bytes run failed: volunteers exited ${codes}; ${errors.join('; ')}; ${vols.map((v) => v.stderr.join('').slice(-800)).join('\n')}`);
    const [v0, v1] = [await volAtTraining!, await volAtEnd!];
    const n = o.steps;
    let mbPhase: Counts = { bytesIn: 0, bytesOut: 0 }, tail: Counts = { bytesIn: 0, bytesOut: 0 };
    let prev = atTraining!;
    for (const p of phase) {
      mbPhase = { bytesIn: mbPhase.bytesIn + p.mbEnd!.bytesIn - prev.bytesIn, bytesOut: mbPhase.bytesOut + p.mbEnd!.bytesOut - prev.bytesOut };
      tail = { bytesIn: tail.bytesIn + p.end!.bytesIn - p.mbEnd!.bytesIn, bytesOut: tail.bytesOut + p.end!.bytesOut - p.mbEnd!.bytesOut };
      prev = p.end!;
    }
    const coordTotal = sub(prev, atTraining!);
    const volunteers = v1.map((c, i) => ({ process: i, ...perStep(sub(c, v0[i]!), n) }));
    const T = o.batch * o.seqLen, C = cfg.hiddenSize;
    const busiest = Math.max(...volunteers.map((v) => v.in_bytes + v.out_bytes));
    const coordSum = (coordTotal.bytesIn + coordTotal.bytesOut) / n;
    return {
      wire_dtype: o.codec,
      settings: { steps: n, micro_batches: o.microBatches, batch: o.batch, seq_len: o.seqLen, hidden: C, stages: 2, replicas: R, tokens_per_micro_batch: T },
      coordinator_per_step: perStep(coordTotal, n),
      coordinator_micro_batch_phase_per_step: perStep(mbPhase, n),
      coordinator_micro_batch_phase_per_micro_batch_bytes: Math.round((mbPhase.bytesIn + mbPhase.bytesOut) / (n * o.microBatches)),
      coordinator_step_tail_per_step: perStep(tail, n),
      volunteers_per_step: volunteers,
      ratio_coordinator_to_busiest_volunteer: Number((coordSum / busiest).toFixed(3)),
      // one activation and one activation gradient cross the stage boundary per micro-batch
      boundary_tensor_bytes_per_micro_batch_theory: 2 * expectedByteLength(o.codec, T * C),
    };
  } finally {
    StagePeerClient.prototype.reduce = origReduce;
    for (const v of vols) kill(v);
    try { await node.stop(); } catch { /* stopped */ }
    try { await store.close(); } catch { /* closed */ }
    await rm(tmp, { recursive: true, force: true });
  }
}

/** A volunteer that reports its socket byte counters on SIGUSR2. */
async function volunteer(addr: string, dataDir: string): Promise<number> {
  const counts = countSockets();
  process.on('SIGUSR2', () => process.stdout.write(JSON.stringify({ event: 'bytes', ...counts() }) + '\n'));
  const backend = new NativeBackend({});
  try {
    return await runVolunteer({ coordinator: addr, token: null, device: 'cpu', maxMemoryBytes: 2 ** 32, dataDir, json: false, listen: '/ip4/127.0.0.1/tcp/0' }, { backend, onEvent: () => {} });
  } finally {
    backend.dispose();
  }
}

if (import.meta.main) {
  const i = process.argv.indexOf('--volunteer');
  if (i >= 0) {
    process.exit(await volunteer(process.argv[i + 1]!, process.argv[i + 2]!));
  } else {
    const codec = (process.argv.find((a) => a.startsWith('--codec='))?.slice(8) ?? 'f32') as FloatCodec;
    const quick = process.argv.includes('--quick');
    const replicas = Number(process.argv.find((a) => a.startsWith('--replicas='))?.slice(11) ?? 1);
    const r = await benchSwarmBytes({ codec, steps: quick ? 2 : 3, microBatches: quick ? 2 : 4, batch: 4, seqLen: 256, replicas });
    console.log(JSON.stringify(r));
  }
}
