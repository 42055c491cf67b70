// Where the time of a swarm step goes, and the bytes on the wire per token at a stage boundary.
//
// The coordinator (coordinator/run.ts) and its volunteers (node/volunteer.ts) run in ONE process here,
// on real libp2p nodes over 127.0.0.1 (TCP + Noise + Yamux), the volunteers on the native backend:
// the same arrangement tests/swarm-inproc.test.ts uses. In-process lets every timestamp come from one
// clock. The volunteers' stage hosts are instrumented through runVolunteer's onHost hook (the hook the
// tests use), by wrapping methods of the host and of its Stage instance — no project code changes:
//   compute        = time inside Stage.forward / Stage.backward (native kernels)
//   tensor codec   = decoding and checking the token ids and labels a stage gets from the
//                    coordinator's control message (protocol/tensor.ts), re-timed on the captured calls
//   queue wait     = time inside the host's forward/backward handlers minus compute and tensor codec:
//                    a micro-batch waiting for the stage's previous job (pipelined micro-batches)
//   frame codec    = the hop frames of the captured activation and activation gradient (protocol/hop.ts:
//                    each chunk encoded by the sender — tensor codec + msgpack — and decoded, schema-checked
//                    and tensor-checked by the receiver), re-timed afterwards
//   transfer       = for each micro-batch, the gaps between consecutive stage calls of its route
//                    (forward s0 → forward s1 → backward s1 → backward s0), minus the frame codec of the
//                    hop in each gap: libp2p transfer stage to stage, credit round trips, stream setup and
//                    event-loop scheduling (the coordinator relays nothing)
//   step tail      = from the end of the step's last micro-batch to the step event: commits, gradient
//                    collect, clipping, apply + optimizer on every peer, adapter upload, LevelDB commit
//   step start     = from the previous step event to the step's first handler (coordinator set-up)
//   bubble         = per peer: step wall time minus the time its handlers were busy (pipeline waiting)
//   overlap        = the parts are summed over micro-batches; with several in flight per route
//                    (pipeline fill) they run partly at the same time: sum of parts − wall time
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NativeBackend } from '../engine/backends/native.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { createSwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { encodeFrame, decodeBody } from '../protocol/frame.ts';
import { hopChunk } from '../protocol/messages.ts';
import { HOP_CHUNK_ELEMENTS, HOP_FRAME_BYTES } from '../protocol/constants.ts';
import { decodeFloat, decodeTensor, encodeTensor, expectedByteLength } from '../protocol/tensor.ts';
import type { FloatCodec, WireTensor } from '../protocol/tensor.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { runVolunteer } from '../node/volunteer.ts';
import type { StageHost } from '../node/stage-host.ts';
import { benchModelConfig, hfConfigOf } from './model.ts';
import type { LlamaConfig } from '../engine/types.ts';

interface Interval { stage: number; kind: string; step: number; mb: number; t0: number; t1: number }
interface Captured { proto: 'forward' | 'backward'; stage: number; req: unknown; res: { hidden?: Float32Array; gradIn?: Float32Array } }

const r1 = (x: number) => Number(x.toFixed(1));
const r3 = (x: number) => Number(x.toFixed(3));
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

export interface TraceOptions { /** default: the bench model (bench/model.ts) */ llama?: LlamaConfig; codec: FloatCodec; steps: number; microBatches: number; batch: number; seqLen: number; threads?: number; log?: (s: string) => void }

export async function traceSwarm(o: TraceOptions): Promise<Record<string, unknown>> {
  const cfg = o.llama ?? benchModelConfig();
  const weights = randomWeightSource(cfg, 1);
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-trace-'));
  const train = resolveTrainConfig({ flags: {
    max_steps: o.steps, per_device_train_batch_size: o.batch, gradient_accumulation_steps: o.microBatches, learning_rate: 1e-4,
    lora_r: 16, lora_alpha: 16, target_modules: 'all-linear', lora_dropout: 0, device: 'cpu', seed: 3,
    // the data plane alone: a spot check (bench/verify.ts measures them) brings the boundary tensors
    // through the coordinator, on micro-batches its random secret picks
    verify_fraction: 0,
  } });
  const lora = loraConfigOf(train);
  const mbFor = (seed: number): MicroBatch => {
    const T = o.batch * o.seqLen;
    const ids = new Int32Array(T), labels = new Int32Array(T);
    let s = seed * 7919 + 1;
    for (let i = 0; i < T; i++) { s = (s * 1103515245 + 12345) >>> 0; ids[i] = (s >>> 8) % cfg.vocabSize; }
    for (let i = 0; i < T; i++) labels[i] = i % o.seqLen === o.seqLen - 1 ? -100 : ids[i + 1]!;
    return { ids, labels, batch: o.batch, seqLen: o.seqLen };
  };
  const intervals: Interval[] = [];
  const captured: Captured[] = [];
  const stepTimes: number[] = [];
  const errors: string[] = [];
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'bench', model: 'bench', totalSteps: o.steps, createdMs: 0, config: {}, numStages: 0, stages: [] });
  // time the coordinator's atomic LevelDB commit of each step (adapter + cursor, + optimizer state at checkpoints)
  const origCommit = store.commitStep.bind(store);
  store.commitStep = async (...a: Parameters<typeof store.commitStep>) => {
    const t0 = performance.now();
    try { return await origCommit(...a); } finally { intervals.push({ stage: -1, kind: 'leveldb_commit', step: a[0].step - 1, mb: -1, t0, t1: performance.now() }); }
  };
  const backends = [0, 1].map(() => new NativeBackend({ threads: o.threads }));
  try {
    const coord = new Coordinator({
      node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'bench', modelName: 'bench', llama: cfg,
      modelConfigJson: JSON.stringify(hfConfigOf(cfg)), weights, train, lora,
      data: { totalSteps: o.steps, microBatchesForStep: async (s) => Array.from({ length: o.microBatches }, (_, k) => mbFor(s * o.microBatches + k)), cursorAfter: (s) => s * o.microBatches },
      memory: () => 1, minPeers: 2, pipelineStages: 2, wireCodec: o.codec, token: null, initAdapter: null, resume: null,
      emit: (e: RunEvent) => {
        if (e.event === 'training' || e.event === 'step') stepTimes.push(performance.now());
        if (e.event === 'error') errors.push(String(e.message));
      },
      log: (m: string) => process.stderr.write(`[bench coordinator] ${m}\n`),
    });
    await coord.publishShards();
    await coord.start();
    const addr = node.getMultiaddrs()[0]!.toString();
    const instrument = (h: StageHost) => {
      const s = h.stageIndex;
      const st = h.stage as unknown as { forward: (...a: unknown[]) => Promise<unknown>; backward: (...a: unknown[]) => Promise<unknown> };
      const cur = { step: 0, mb: 0 };
      const wrapStage = (name: 'forward' | 'backward', kind: string) => {
        const orig = st[name].bind(st);
        st[name] = async (...a: unknown[]) => {
          const t0 = performance.now();
          try { return await orig(...a); } finally { intervals.push({ stage: s, kind, step: cur.step, mb: cur.mb, t0, t1: performance.now() }); }
        };
      };
      wrapStage('forward', 'compute_forward');
      wrapStage('backward', 'compute_backward');
      const wrapHost = (name: 'forward' | 'backward' | 'commit' | 'aggregate' | 'adapter' | 'optimizerChunk', kind: (req: Record<string, unknown>) => string) => {
        const hh = h as unknown as Record<string, (req: Record<string, unknown>) => unknown>;
        const orig = hh[name]!.bind(h);
        // synchronous methods (commit, adapter) stay synchronous: their callers do not await them
        hh[name] = (req: Record<string, unknown>) => {
          const t0 = performance.now();
          const step = Number(req.step ?? -1), mb = Number(req.mb ?? -1);
          if (name === 'forward' || name === 'backward') { cur.step = step; cur.mb = mb; }
          const done = (res: unknown) => {
            intervals.push({ stage: s, kind: kind(req), step, mb, t0, t1: performance.now() });
            if ((name === 'forward' || name === 'backward') && step === o.steps - 1 && mb === 0) captured.push({ proto: name, stage: s, req, res: res as Captured['res'] });
            return res;
          };
          const res = orig(req);
          return res instanceof Promise ? res.then(done) : done(res);
        };
      };
      wrapHost('forward', () => 'handler_forward');
      wrapHost('backward', () => 'handler_backward');
      wrapHost('commit', () => 'handler_commit');
      wrapHost('aggregate', (req) => `handler_aggregate_${String(req.phase)}`);
      wrapHost('adapter', () => 'handler_adapter');
      wrapHost('optimizerChunk', () => 'handler_optimizer_state');
    };
    const vols = [0, 1].map((i) => runVolunteer({ coordinator: addr, token: null, device: 'cpu', maxMemoryBytes: 2 ** 32, dataDir: path.join(tmp, `v${i}`), json: false, listen: '/ip4/127.0.0.1/tcp/0' },
      { backend: backends[i], onHost: instrument, onEvent: () => {} }));
    // volunteers print human progress lines to stderr; that is the bench's progress channel
    await coord.finished;
    const codes = await Promise.all(vols);
    await coord.stop();
    if (errors.length > 0 || codes.some((c) => c !== 0)) throw new Error(`swarm trace run failed: volunteers exited ${codes}; coordinator errors: ${errors.join('; ') || 'none'}`);
    return analyse(o, cfg.hiddenSize, intervals, captured, stepTimes);
  } finally {
    try { await node.stop(); } catch { /* stopped */ }
    try { await store.close(); } catch { /* closed */ }
    for (const b of backends) { try { b.dispose(); } catch { /* disposed by the volunteer */ } }
    await rm(tmp, { recursive: true, force: true });
  }
}

/** best-of-n milliseconds of fn */
function timeMs(fn: () => void, n = 5): number {
  fn();
  let best = Infinity;
  for (let i = 0; i < n; i++) { const t0 = performance.now(); fn(); best = Math.min(best, performance.now() - t0); }
  return best;
}

/** What one hop of `data` costs in frames: bytes on the stream, the sender's chunk encoding (tensor
 *  codec + msgpack) and the receiver's decoding (msgpack + schema + tensor checks). */
function hopCost(data: Float32Array, codec: FloatCodec): { bytes: number; encode_ms: number; decode_ms: number } {
  const frames: Uint8Array[] = [];
  const encode = () => {
    frames.length = 0;
    for (let off = 0; off < data.length; off += HOP_CHUNK_ELEMENTS) {
      const len = Math.min(HOP_CHUNK_ELEMENTS, data.length - off);
      frames.push(encodeFrame({ offset: off, tensor: encodeTensor(data.subarray(off, off + len), [len], codec, 'x') }, HOP_FRAME_BYTES));
    }
  };
  const encode_ms = timeMs(encode);
  return {
    bytes: frames.reduce((a, f) => a + f.length, 0),
    encode_ms: r3(encode_ms),
    decode_ms: r3(timeMs(() => { for (const f of frames) { const c = hopChunk(decodeBody(f.subarray(4)), 'x'); decodeFloat(c.tensor, 'x'); } })),
  };
}

/** Re-timed tensor work of one captured call: the stage decodes (and checks) the control message's
 *  tensors (token ids, labels); activations are decoded on the hop (hopCost). */
function tensorCodecMs(c: Captured): number {
  const tensors = (m: unknown) => Object.values(m as Record<string, unknown>).filter((v): v is WireTensor =>
    typeof v === 'object' && v !== null && 'codec' in v && 'bytes' in v);
  let ms = 0;
  for (const t of tensors(c.req)) ms += timeMs(() => { decodeTensor(t, 'x'); });
  return ms;
}

function analyse(o: TraceOptions, C: number, iv: Interval[], cap: Captured[], stepTimes: number[]): Record<string, unknown> {
  const T = o.batch * o.seqLen;
  const tokensPerStep = T * o.microBatches;
  // steps after the first are measured (the first warms the native thread pools and allocators)
  const measured = Array.from({ length: o.steps - 1 }, (_, k) => k + 1);
  const walls = measured.map((s) => stepTimes[s + 1]! - stepTimes[s]!);
  const wall = sum(walls) / measured.length;
  const per = (pred: (i: Interval) => boolean) => sum(iv.filter((i) => measured.includes(i.step) && pred(i)).map((i) => i.t1 - i.t0)) / measured.length;
  const compute = [0, 1].map((s) => ({ forward_ms: r1(per((i) => i.stage === s && i.kind === 'compute_forward')), backward_ms: r1(per((i) => i.stage === s && i.kind === 'compute_backward')) }));
  const handler = [0, 1].map((s) => ({ forward_ms: per((i) => i.stage === s && i.kind === 'handler_forward'), backward_ms: per((i) => i.stage === s && i.kind === 'handler_backward') }));
  const computeTotal = sum(compute.map((c) => c.forward_ms + c.backward_ms));
  const handlerTotal = sum(handler.map((h) => h.forward_ms + h.backward_ms));
  // the handlers' own tensor work, re-timed on the captured messages; the rest of the handler time
  // (beyond compute) is waiting in the stage's job queue behind another micro-batch (pipelining)
  const tensorCodec = sum(cap.map(tensorCodecMs)) * o.microBatches;
  const queueWait = Math.max(0, handlerTotal - computeTotal - tensorCodec);
  // frames: each micro-batch crosses the stage boundary twice (activation, gradient), as hop chunks
  const frames: Record<string, { bytes: number; encode_ms: number; decode_ms: number }> = {};
  for (const c of cap) {
    if (c.proto === 'forward' && c.res.hidden !== undefined) frames.hop_activation = hopCost(c.res.hidden, o.codec);
    if (c.proto === 'backward' && c.res.gradIn !== undefined) frames.hop_gradient = hopCost(c.res.gradIn, o.codec);
  }
  const frameMsPerMb = sum(Object.values(frames).map((f) => f.encode_ms + f.decode_ms));
  const frameCodec = frameMsPerMb * o.microBatches;
  // gaps along each micro-batch's route, and the tail of the step
  let gaps = 0, tail = 0, start = 0;
  for (const s of measured) {
    let lastEnd = 0;
    // from the previous step's event to the first handler of this step: the coordinator's step set-up
    // (late joiners, the step's micro-batches, routes) and the first request's way to stage 0
    const first = iv.find((i) => i.step === s && i.mb === 0 && i.stage === 0 && i.kind === 'handler_forward')!;
    start += first.t0 - stepTimes[s]!;
    for (let mb = 0; mb < o.microBatches; mb++) {
      const h = (stage: number, kind: string) => iv.find((i) => i.step === s && i.mb === mb && i.stage === stage && i.kind === kind)!;
      const seq = [h(0, 'handler_forward'), h(1, 'handler_forward'), h(1, 'handler_backward'), h(0, 'handler_backward')];
      for (let k = 1; k < seq.length; k++) gaps += seq[k]!.t0 - seq[k - 1]!.t1;
      lastEnd = Math.max(lastEnd, seq[3]!.t1);
      // from the coordinator starting the micro-batch (its previous one ended) to the first handler
      if (mb > 0) {
        const prev = iv.find((i) => i.step === s && i.mb === mb - 1 && i.stage === 0 && i.kind === 'handler_backward')!;
        // (pipelined: the next micro-batch may already be in flight — no gap then)
        gaps += Math.max(0, seq[0]!.t0 - prev.t1);
      }
    }
    tail += stepTimes[s + 1]! - lastEnd;
  }
  gaps /= measured.length; tail /= measured.length; start /= measured.length;
  // the gap before the first forward of a step belongs to the previous step's tail/the step start
  const tailParts: Record<string, number> = {};
  for (const k of ['handler_commit', 'handler_aggregate_collect', 'handler_aggregate_apply', 'handler_adapter', 'handler_optimizer_state']) tailParts[`${k.replace('handler_', '')}_ms_summed_over_peers`] = r1(per((i) => i.kind === k));
  tailParts.leveldb_commit_ms = r1(per((i) => i.kind === 'leveldb_commit'));
  const busy = [0, 1].map((s) => per((i) => i.stage === s && i.kind.startsWith('handler_')));
  // the two hops of a micro-batch lie inside its route gaps (s0 forward → s1 forward, s1 backward → s0 backward)
  const transfer = Math.max(0, gaps - frameCodec);
  // the parts are summed over micro-batches; with several micro-batches in flight (pipeline fill)
  // some of them ran at the same time, so their sum exceeds the wall time by the overlap
  const parts = computeTotal + tensorCodec + queueWait + transfer + frameCodec + tail + start;
  const overlap = Math.max(0, parts - wall);
  const other = Math.max(0, wall - parts);
  const pct = (x: number) => r1(100 * x / wall);
  const hidden = (what: string) => Object.entries(frames).filter(([k]) => k.startsWith(what)).map(([, f]) => f.bytes)[0] ?? 0;
  const theory = expectedByteLength(o.codec, [T, C]) / T;
  const fwdBytes = hidden('hop_activation'), bwdBytes = hidden('hop_gradient');
  return {
    wire_dtype: o.codec,
    settings: { steps: o.steps, measured_steps: measured.length, micro_batches: o.microBatches, batch: o.batch, seq_len: o.seqLen, stages: 2, replicas: 1, tokens_per_step: tokensPerStep },
    tokens_per_s: r1(tokensPerStep / (wall / 1000)),
    step_ms: r1(wall),
    breakdown_ms: {
      compute: r1(computeTotal), compute_per_stage: compute,
      serialization_tensor_codec: r1(tensorCodec), serialization_frames: r1(frameCodec),
      stage_queue_wait: r1(queueWait),
      transfer: r1(transfer),
      step_start: r1(start), step_tail: r1(tail), step_tail_parts: tailParts,
      unaccounted: r1(other),
      pipeline_overlap: r1(overlap),
    },
    breakdown_pct: {
      compute: pct(computeTotal), serialization: pct(tensorCodec + frameCodec), transfer: pct(transfer),
      step_start: pct(start), step_tail: pct(tail), unaccounted: pct(other), pipeline_overlap: pct(overlap),
    },
    bubble_pct_per_stage: busy.map((b) => r1(100 * (1 - b / wall))),
    frames,
    wire_bytes_per_token: {
      forward_activation_hop: r1(fwdBytes / T), backward_gradient_hop: r1(bwdBytes / T),
      theory_tensor_only: r1(theory),
      per_boundary_crossing: r1((fwdBytes + bwdBytes) / T),
    },
  };
}

if (import.meta.main) {
  const codec = (process.argv.find((a) => a.startsWith('--codec='))?.slice(8) ?? 'f32') as FloatCodec;
  const quick = process.argv.includes('--quick');
  const r = await traceSwarm({ codec, steps: quick ? 2 : 3, microBatches: 2, batch: 4, seqLen: 256 });
  console.log(JSON.stringify(r));
}
