// In-process swarm tests (real libp2p nodes on 127.0.0.1, RefBackend, random 4-layer model):
// equivalence with a local loop over the same Stage API, exactly-once gradients on retries and peer
// loss, stale-message rejection, status and pull. A 4-layer hidden-64 model with 3 steps of 4
// micro-batches keeps each run to a few seconds on 2 cores.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { RefBackend } from '../engine/backends/ref.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { AdamW } from '../engine/train/optim.ts';
import { clipGradNorm } from '../engine/train/clip.ts';
import { learningRateAt, warmupStepsFor } from '../engine/train/schedule.ts';
import { createSwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { decodeFloat, encodeTensor } from '../protocol/tensor.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { fetchStatus, pullAdapter } from '../coordinator/client.ts';
import { runVolunteer } from '../node/volunteer.ts';
import { StageHost } from '../node/stage-host.ts';
import { createShardOptimizer } from '../node/optimizer.ts';
import { EXIT_REJECTED } from '../node/constants.ts';

const HF = {
  model_type: 'llama', vocab_size: 97, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4,
  num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 256, tie_word_embeddings: false,
};
const llama = parseLlamaConfig(HF);
const weights = randomWeightSource(llama, 1);
const STEPS = 3, MBS = 4;
const train = resolveTrainConfig({ flags: {
  max_steps: STEPS, learning_rate: 1e-2, lora_r: 4, lora_alpha: 8, target_modules: 'q_proj,v_proj,down_proj',
  per_device_train_batch_size: 2, gradient_accumulation_steps: MBS, device: 'ref', max_grad_norm: 0.3, warmup_steps: 1,
} });
const lora = loraConfigOf(train);

function microBatch(seed: number): MicroBatch {
  const B = 2, S = 8 + (seed % 3); // ragged lengths across micro-batches
  const ids = new Int32Array(B * S), labels = new Int32Array(B * S);
  for (let i = 0; i < B * S; i++) ids[i] = (seed * 31 + i * 7 + (i * i) % 13) % 97;
  for (let i = 0; i < B * S; i++) labels[i] = i % S === S - 1 || (i % S) < seed % 2 ? -100 : ids[i + 1]!;
  return { ids, labels, batch: B, seqLen: S };
}
const batchesFor = (s: number) => Array.from({ length: MBS }, (_, k) => microBatch(s * MBS + k));

const dirs: string[] = [];
after(async () => { for (const d of dirs) await rm(d, { recursive: true, force: true }); });

/** The same training with one whole-model Stage in this process: the reference. */
async function localRun(): Promise<{ init: Map<string, Float32Array>; final: Map<string, Float32Array> }> {
  const stage = await loadStage(weights, new RefBackend(), { layerStart: 0, layerEnd: 4, lora, seed: train.seed });
  const adam = new AdamW(stage.params.map((p) => ({ name: p.name, numel: p.data.length })),
    { optim: train.optim, beta1: train.adam_beta1, beta2: train.adam_beta2, eps: train.adam_epsilon, weightDecay: train.weight_decay });
  const init = new Map(stage.params.map((p) => [p.name, Float32Array.from(p.data)]));
  const warm = warmupStepsFor(STEPS, train.warmup_steps, train.warmup_ratio);
  for (let s = 0; s < STEPS; s++) {
    const mbs = batchesFor(s);
    let N = 0;
    for (const m of mbs) for (const l of m.labels) if (l !== -100) N++;
    const grads = stage.newGrads();
    for (const [k, m] of mbs.entries()) {
      await stage.forward({ key: `k${k}`, batch: m.batch, seqLen: m.seqLen, ids: m.ids, labels: m.labels, dropoutSeed: 0 }, { train: true });
      await stage.backward(`k${k}`, grads, { lossScale: 1 / N });
    }
    clipGradNorm(grads, train.max_grad_norm);
    adam.update(stage.params.map((p) => p.data), grads, learningRateAt(train.learning_rate, train.lr_scheduler_type, s, warm, STEPS));
  }
  return { init, final: new Map(stage.params.map((p) => [p.name, p.data])) };
}

interface Busy { host: number; stage: number; step: number; mb: number; t0: number; t1: number }
interface SwarmResult { busy: Busy[]; poisoner: () => number; coordinatorId: string; volunteerEvents: Array<Array<Record<string, unknown>>>; adapter: Map<string, Float32Array>; events: RunEvent[]; addr: string; stop(): Promise<void>; codes: Array<number | number[]>; retries: number }

/** A volunteer of `stage` killed in the middle of a hop of step 1: right after its forward of a
 *  micro-batch (stage 0: while it sends the activation) or right after its backward (stage 1: while it
 *  sends the gradient, with stage 0 waiting to receive it). */
interface MidHopKill { stage: number; after: 'forward' | 'backward' }

/** A volunteer of `stage` that answers a spot check's recall with its received tensor scaled by 1.02
 *  (its microbatch reports carry the true digests) — at verify_fraction 1. */
interface RecallLie { stage: number }

async function swarmRun(opts: { killAfterStep?: number; restartKilled?: boolean; lateJoiner?: boolean; poisonStage?: number; killMidHop?: MidHopKill; lieInRecall?: RecallLie } = {}): Promise<SwarmResult> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-inproc-'));
  dirs.push(tmp);
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'inproc', model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const events: RunEvent[] = [];
  const aborts = [0, 1, 2, 3].map(() => new AbortController());
  let stepOne!: () => void;
  const afterStepOne = new Promise<void>((r) => { stepOne = r; });
  let coord!: Coordinator;
  coord = new Coordinator({
    node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'inproc', modelName: 'random', llama,
    modelConfigJson: JSON.stringify(HF), weights, train: opts.lieInRecall !== undefined ? { ...train, verify_fraction: 1 } : train, lora,
    refereeBackend: async () => new RefBackend(),
    data: { totalSteps: STEPS, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s * MBS },
    memory: () => 1, minPeers: opts.lateJoiner === true ? 3 : 4, pipelineStages: 2, wireCodec: 'f32', token: null, initAdapter: null, resume: null,
    emit: (e) => {
      events.push(e);
      if (e.event === 'step' && e.step === 1) stepOne();
      if (e.event === 'step' && e.step === opts.killAfterStep) {
        // crash one replica of the last stage: the next step must route around it
        const victim = (events.find((x) => x.event === 'plan')!.stages as Array<{ replicas: string[] }>)[1]!.replicas[0]!;
        aborts[ids.indexOf(victim)]!.abort();
      }
    },
    log: () => {},
  });
  await coord.publishShards();
  await coord.start();
  const addr = node.getMultiaddrs()[0]!.toString();
  const ids: string[] = [];
  let poisoner = -1;
  // a faulty or malicious replica: its step gradient comes out 1e4 times too large
  const poison = (h: StageHost, i: number) => {
    if (opts.poisonStage === undefined || h.stageIndex !== opts.poisonStage || poisoner >= 0) return;
    poisoner = i;
    const orig = h.aggregate.bind(h);
    h.aggregate = async (req) => {
      const res = await orig(req);
      if (req.phase !== 'collect') return res;
      return { ...res, grads: res.grads!.map((t) => encodeTensor(decodeFloat(t, 'g').map((x) => x * 1e4), t.shape, 'f32')) };
    };
  };
  // when each host was inside forward/backward for which micro-batch (to see the pipeline fill)
  const busy: Busy[] = [];
  const traceHost = (h: StageHost, i: number) => {
    for (const m of ['forward', 'backward'] as const) {
      const orig = (h[m] as (r: { step: number; mb: number }) => Promise<unknown>).bind(h);
      (h as unknown as Record<string, unknown>)[m] = async (req: { step: number; mb: number }) => {
        const t0 = performance.now();
        try { return await orig(req); } finally { busy.push({ host: i, stage: h.stageIndex, step: req.step, mb: req.mb, t0, t1: performance.now() }); }
      };
    }
  };
  let liar = -1;
  const lie = (h: StageHost, i: number) => {
    if (opts.lieInRecall === undefined || h.stageIndex !== opts.lieInRecall.stage || liar >= 0) return;
    liar = i;
    const orig = h.received.bind(h);
    h.received = (req) => orig(req).map((x) => x * 1.02);
  };
  let midHopKilled = false;
  const killMidHop = (h: StageHost, i: number) => {
    const k = opts.killMidHop;
    if (k === undefined || h.stageIndex !== k.stage) return;
    const orig = (h[k.after] as (r: { step: number }, o?: unknown) => Promise<unknown>).bind(h);
    (h as unknown as Record<string, unknown>)[k.after] = async (req: { step: number }, o?: unknown) => {
      const res = await orig(req, o);
      // the hop starts as soon as this returns: abort the process while it is on the wire
      if (req.step === 1 && !midHopKilled) { midHopKilled = true; setImmediate(() => aborts[i]!.abort()); }
      return res;
    };
  };
  const volunteerEvents: Array<Array<Record<string, unknown>>> = [[], [], [], []];
  const vols = [0, 1, 2, 3].map(async (i) => {
    const dataDir = path.join(tmp, `v${i}`);
    const n = await createSwarmNode({ dataDir }); // learn the persisted peer id the volunteer will use
    ids[i] = n.peerId.toString();
    await n.stop();
    if (opts.lateJoiner === true && i === 3) await afterStepOne; // joins a run that is already training
    const volunteer = (signal: AbortSignal) => runVolunteer({ coordinator: addr, token: null, device: 'ref', maxMemoryBytes: 2 ** 30, dataDir, json: true, listen: '/ip4/127.0.0.1/tcp/0' },
      { backend: new RefBackend(), abort: signal, onEvent: (e) => volunteerEvents[i]!.push(e), onHost: (h) => { poison(h, i); traceHost(h, i); killMidHop(h, i); lie(h, i); } });
    const code = await volunteer(aborts[i]!.signal);
    // the crashed volunteer comes back on the same data dir (same peer id) while the run goes on
    if (opts.restartKilled === true && aborts[i]!.signal.aborted) return [code, await volunteer(new AbortController().signal)];
    return code;
  });
  await coord.finished;
  const codes = await Promise.all(vols);
  const status = (coord.dashboardState());
  return {
    busy, poisoner: () => poisoner, coordinatorId: node.peerId.toString(), volunteerEvents, adapter: new Map(coord.currentAdapter().map((t) => [t.name, t.data])), events, addr, codes, retries: status.totals.retries,
    stop: async () => { await coord.stop(); await node.stop(); await store.close(); },
  };
}

function relDiff(init: Map<string, Float32Array>, a: Map<string, Float32Array>, ref: Map<string, Float32Array>): { rel: number; norm: number } {
  let num = 0, den = 0;
  for (const [name, x0] of init) {
    const xa = a.get(name)!, xr = ref.get(name)!;
    assert.ok(xa !== undefined, `swarm adapter lacks ${name}`);
    for (let i = 0; i < x0.length; i++) { num += (xa[i]! - xr[i]!) ** 2; den += (xr[i]! - x0[i]!) ** 2; }
  }
  return { rel: Math.sqrt(num / den), norm: Math.sqrt(den) };
}

const reference = localRun();

test('2 stages x 2 replicas equal the local loop; status and pull of a finished run', async () => {
  const ref = await reference;
  const r = await swarmRun();
  try {
    assert.equal(r.events.find((e) => e.event === 'error'), undefined);
    assert.deepEqual(r.events.filter((e) => e.event === 'step').map((e) => e.step), [1, 2, 3]);
    const { rel, norm } = relDiff(ref.init, r.adapter, ref.final);
    console.log(`# in-process swarm vs local loop: relative update difference ${rel.toExponential(2)}`);
    assert.ok(norm > 1e-3, `non-trivial update (${norm})`);
    assert.ok(rel <= 1e-5, `relative update difference ${rel}`); // summation order only; see docs/swarm.md
    assert.deepEqual(r.codes, [0, 0, 0, 0]);
    // pipelining: a route keeps more than one micro-batch in flight (the next one enters stage 0
    // before the previous one has left the pipeline), so no stage idles while the others compute
    const life = new Map<string, { hosts: Set<number>; t0: number; t1: number }>();
    for (const x of r.busy) {
      const k = `${x.step}/${x.mb}`;
      const l = life.get(k) ?? { hosts: new Set<number>(), t0: Infinity, t1: -Infinity };
      l.hosts.add(x.host); l.t0 = Math.min(l.t0, x.t0); l.t1 = Math.max(l.t1, x.t1);
      life.set(k, l);
    }
    const route = (l: { hosts: Set<number> }) => [...l.hosts].sort().join(',');
    const ls = [...life.entries()];
    const overlapped = ls.some(([ka, a]) => ls.some(([kb, b]) => ka !== kb && ka.split('/')[0] === kb.split('/')[0] &&
      route(a) === route(b) && a.t0 < b.t1 && b.t0 < a.t1));
    assert.ok(overlapped, 'no route ever had two micro-batches in flight');

    const st = await fetchStatus(r.addr);
    assert.equal(st.state, 'finished');
    assert.equal(st.step, 3);
    assert.equal(st.numStages, 2);
    assert.deepEqual(st.peers.map((p) => p.stageIndex).sort(), [0, 0, 1, 1]);
    const last = await pullAdapter(r.addr);
    assert.equal(last.step, 3);
    assert.equal(relDiff(ref.init, new Map(last.tensors.map((t) => [t.name, t.data])), r.adapter).rel, 0);
    const first = await pullAdapter(r.addr, { step: 0 });
    assert.equal(relDiff(ref.init, new Map(first.tensors.map((t) => [t.name, t.data])), ref.init).norm, 0, 'step 0 is the init');
    await assert.rejects(pullAdapter(r.addr, { step: 7 }), { name: 'StepNotFoundError', message: '--step 7: the run has committed steps: 0–3 (4 steps)' });
  } finally {
    await r.stop();
  }
});

test('a replica crashing after step 1: its micro-batches are retried elsewhere and still count exactly once', async () => {
  const ref = await reference;
  const r = await swarmRun({ killAfterStep: 1 });
  try {
    assert.equal(r.events.find((e) => e.event === 'error'), undefined, JSON.stringify(r.events.filter((e) => e.event === 'error')));
    assert.ok(r.events.some((e) => e.event === 'peer_dropped'), 'the crashed peer is dropped from routes');
    assert.deepEqual(r.events.filter((e) => e.event === 'step').map((e) => e.step), [1, 2, 3]);
    const { rel } = relDiff(ref.init, r.adapter, ref.final);
    assert.ok(rel <= 1e-5, `relative update difference ${rel} after a peer loss`);
    assert.deepEqual([...r.codes].sort(), [0, 0, 0, 1], 'the crashed volunteer exits 1, the others 0');
  } finally {
    await r.stop();
  }
});

for (const k of [{ stage: 0, after: 'forward' }, { stage: 1, after: 'backward' }] as const) {
  test(`a stage ${k.stage} peer killed while it sends a hop (stage ${1 - k.stage} receiving): retried elsewhere, counted once`, async () => {
    const ref = await reference;
    const r = await swarmRun({ killMidHop: k });
    try {
      assert.equal(r.events.find((e) => e.event === 'error'), undefined, JSON.stringify(r.events.filter((e) => e.event === 'error')));
      assert.ok(r.events.some((e) => e.event === 'peer_dropped'), 'the killed peer is dropped from routes');
      assert.equal(r.events.find((e) => e.event === 'peer_banned'), undefined, 'a broken hop bans nobody');
      assert.deepEqual(r.events.filter((e) => e.event === 'step').map((e) => e.step), [1, 2, 3]);
      const { rel } = relDiff(ref.init, r.adapter, ref.final);
      assert.ok(rel <= 1e-5, `relative update difference ${rel} after a peer killed mid-hop`);
      assert.deepEqual([...r.codes].sort(), [0, 0, 0, 1], 'the killed volunteer exits 1, the others 0');
    } finally {
      await r.stop();
    }
  });
}

test('a peer joining mid-run is placed at a step boundary with the stage state; results unchanged', async () => {
  const ref = await reference;
  const r = await swarmRun({ lateJoiner: true });
  try {
    assert.equal(r.events.find((e) => e.event === 'error'), undefined);
    const added = r.events.find((e) => e.event === 'peer_added');
    assert.ok(added !== undefined, 'the late peer was added to a stage');
    assert.ok(Number(added.step) >= 1);
    const { rel } = relDiff(ref.init, r.adapter, ref.final);
    assert.ok(rel <= 1e-5, `relative update difference ${rel} with a late joiner`);
    assert.deepEqual(r.codes, [0, 0, 0, 0]);
    const st = await fetchStatus(r.addr);
    assert.equal(st.peers.filter((p) => p.stageIndex !== null).length, 4);
    assert.equal(st.reassignments, 1);
    const lateStatus = st.peers.find((p) => p.peerId === added.peer_id)!;
    assert.equal(lateStatus.stageIndex, added.stage);
    // its frozen shard came from a peer already serving that stage, not from the coordinator
    const fetched = r.volunteerEvents[3]!.filter((e) => e.event === 'blob' && e.kind === 'fetched' && /^(embed|head|layer\.\d+)$/.test(String(e.name)));
    assert.ok(fetched.length > 0);
    for (const e of fetched) assert.ok(!String(e.from).endsWith(r.coordinatorId), `blob ${e.name} came from ${e.from}`);
    assert.ok(lateStatus.microBatches > 0, 'the late peer computed micro-batches');
  } finally {
    await r.stop();
  }
});

test('a replica sending an outsized gradient is banned and its micro-batches re-run; results unchanged', async () => {
  const ref = await reference;
  const r = await swarmRun({ poisonStage: 1 });
  try {
    assert.equal(r.events.find((e) => e.event === 'error'), undefined);
    const banned = r.events.filter((e) => e.event === 'peer_banned');
    assert.equal(banned.length, 1);
    assert.match(String(banned[0]!.reason), /over 50x the median/);
    const { rel } = relDiff(ref.init, r.adapter, ref.final);
    assert.ok(rel <= 1e-5, `relative update difference ${rel} after banning a poisoner`);
    const st = await fetchStatus(r.addr);
    assert.equal(st.peers.find((p) => p.peerId === banned[0]!.peer_id)!.health, 'banned');
  } finally {
    await r.stop();
  }
});

test('verify_fraction 1: a volunteer whose recalled tensor contradicts the digest it reported is banned on that evidence; nobody else; results unchanged', async () => {
  const ref = await reference;
  const r = await swarmRun({ lieInRecall: { stage: 0 } });
  try {
    assert.equal(r.events.find((e) => e.event === 'error'), undefined);
    const banned = r.events.filter((e) => e.event === 'peer_banned');
    assert.equal(banned.length, 1, JSON.stringify(banned));
    assert.equal(banned[0]!.evidence, 'bad-upload');
    assert.match(String(banned[0]!.reason), /its recalled copy of the activation gradient of stage 1 in step \d+ micro-batch \d+ attempt \d+ does not hash to the digest it reported/);
    const st = await fetchStatus(r.addr);
    assert.equal(st.peers.find((p) => p.peerId === banned[0]!.peer_id)!.health, 'banned');
    assert.equal(st.peers.filter((p) => p.health === 'banned').length, 1);
    const { rel } = relDiff(ref.init, r.adapter, ref.final);
    assert.ok(rel <= 1e-5, `relative update difference ${rel} after banning a liar`);
  } finally {
    await r.stop();
  }
});

test('a volunteer restarted mid-run on its data dir is dropped, rejoins, and is placed again; results unchanged', async () => {
  const ref = await reference;
  const r = await swarmRun({ killAfterStep: 1, restartKilled: true });
  try {
    assert.equal(r.events.find((e) => e.event === 'error'), undefined);
    const dropped = r.events.find((e) => e.event === 'peer_dropped')!;
    const added = r.events.find((e) => e.event === 'peer_added');
    assert.ok(added !== undefined && added.peer_id === dropped.peer_id, 'the same peer id is placed again');
    const { rel } = relDiff(ref.init, r.adapter, ref.final);
    assert.ok(rel <= 1e-5, `relative update difference ${rel}`);
    assert.ok(r.codes.some((c) => Array.isArray(c) && c[0] === 1 && c[1] === 0), 'first life ends with 1, second with 0');
  } finally {
    await r.stop();
  }
});

test('a private run admits only peers with its join token', async () => {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-private-'));
  dirs.push(tmp);
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  const coord = new Coordinator({
    node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'priv', modelName: 'random', llama,
    modelConfigJson: JSON.stringify(HF), weights, train, lora,
    data: { totalSteps: 1, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s },
    memory: () => 1, minPeers: 5, wireCodec: 'f32', token: 'sesame', initAdapter: null, resume: null, emit: () => {}, log: () => {},
  });
  try {
    await coord.start();
    const addr = node.getMultiaddrs()[0]!.toString();
    const out: string[] = [];
    const write = process.stdout.write.bind(process.stdout);
    process.stdout.write = ((chunk: string) => { out.push(String(chunk)); return true; }) as typeof process.stdout.write;
    let code: number;
    try {
      code = await runVolunteer({ coordinator: addr, token: 'wrong', device: 'ref', maxMemoryBytes: 2 ** 30, dataDir: path.join(tmp, 'v'), json: true, listen: '/ip4/127.0.0.1/tcp/0' },
        { backend: new RefBackend() });
    } finally {
      process.stdout.write = write;
    }
    assert.equal(code, EXIT_REJECTED, 'a refused join exits with the refused code of the exit-code table');
    const err = out.map((l) => JSON.parse(l)).find((e) => e.event === 'error');
    assert.equal(err?.name, 'AuthError');
    assert.match(err?.message, /private: a valid --token is required/);
    assert.equal((await fetchStatus(addr)).peers.length, 0, 'the refused peer is not admitted');
  } finally {
    await coord.stop(); await node.stop(); await store.close();
  }
});

test('stage host: stale steps, superseded attempts, double commits; uncommitted attempts never count', async () => {
  const stage = await loadStage(weights, new RefBackend(), { layerStart: 0, layerEnd: 4, lora, seed: 1 });
  const spec = { optim: 'adamw_torch' as const, adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0, residentBytes: 0 };
  const host = new StageHost(stage, {
    runId: 'r', peerId: '12D3KooW', stageIndex: 0, numStages: 1, layerStart: 0, layerEnd: 4, modelConfigJson: '{}',
    lora: { ...lora, initLoraWeights: 'kaiming' }, optim: spec, seed: 1, gradientCheckpointing: true, wireCodec: 'f32',
    blobs: [], adapterBlob: null, optimizerBlob: null, step: 0, totalSteps: 1,
  }, await createShardOptimizer(spec, stage.params, { spillDir: os.tmpdir(), state: null }));
  const m = microBatch(5);
  const T = m.batch * m.seqLen;
  const fwd = (mb: number, attempt: number, step = 0) => host.forward({
    runId: 'r', step, mb, attempt, stageIndex: 0, batch: m.batch, seqLen: m.seqLen,
    ids: encodeTensor(m.ids, [T], 'i32'), labels: encodeTensor(m.labels, [T], 'i32'), dropoutSeed: 0, train: true,
  });
  const bwd = (mb: number, attempt: number) => host.backward({ runId: 'r', step: 0, mb, attempt, stageIndex: 0, lossScale: 1 });
  const commit = (mb: number, attempt: number, c = true) => host.commit({ runId: 'r', step: 0, mb, attempt, commit: c });
  const collect = async () => (await host.aggregate({ runId: 'r', step: 0, phase: 'collect', from: 0, count: 1000 })).grads!;

  await assert.rejects(fwd(0, 0, 1), { name: 'StaleError', message: /step 1 is not the current step 0/ });
  await assert.rejects(host.forward({ runId: 'other', step: 0, mb: 0, attempt: 0, stageIndex: 0, batch: 1, seqLen: 1, dropoutSeed: 0, train: true }), { name: 'StaleError' });
  // attempt 0 of mb 0 runs fully but its route fails before commit; attempt 1 commits
  await fwd(0, 0); await bwd(0, 0);
  await fwd(0, 1); await bwd(0, 1);
  await assert.rejects(fwd(0, 0), { name: 'StaleError', message: /superseded by attempt 1/ });
  commit(0, 1);
  assert.throws(() => commit(0, 1), { name: 'StaleError', message: /already committed/ });
  // mb 1 runs and is then abandoned
  await fwd(1, 0); await bwd(1, 0); commit(1, 0, false);
  const once = await collect();
  // the same micro-batch alone on a fresh stage gives exactly this gradient
  const stage2 = await loadStage(weights, new RefBackend(), { layerStart: 0, layerEnd: 4, lora, seed: 1 });
  const g = stage2.newGrads();
  await stage2.forward({ key: 'a', batch: m.batch, seqLen: m.seqLen, ids: m.ids, labels: m.labels, dropoutSeed: 0 }, { train: true });
  await stage2.backward('a', g, { lossScale: 1 });
  let nonzero = 0;
  for (let i = 0; i < g.length; i++) {
    const got = new Float32Array(once[i]!.bytes.slice().buffer);
    assert.deepEqual(got, g[i], `param ${i}: the step sum is exactly one micro-batch's gradient`);
    for (const x of got) if (x !== 0) nonzero++;
  }
  assert.ok(nonzero > 0);
});
