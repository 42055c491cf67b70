// The coordinator dies at any point of a step and resumes at the last committed step (issue 6.4):
// placement of rejoining volunteers, a stage host's snapshot and rollback, the one-batch LevelDB
// commit, and real processes on 127.0.0.1 where the coordinator SIGKILLs itself (SWARMTUNE_TEST_CRASH)
// mid-apply, right after a commit and between apply and commit, and still ends equal to `swarmtune train`.
//
// Sizes: the embedded tiny model, 4 optimizer steps of 4 micro-batches of 2 sequences of ≤ 64 tokens,
// 3 volunteers in 2 stages. Each restart costs the volunteers' 8 s heartbeat silence plus a launch, so
// the process test takes about a minute on 2 cores; the others take a second.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { adapterMap, relUpdateDiff, spawnCli, type CliProc } from './swarm-procs.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import type { Stage } from '../engine/types.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import { encodeTensor } from '../protocol/tensor.ts';
import type { OptimSpec } from '../protocol/messages.ts';
import { placeResumed } from '../coordinator/resume.ts';
import type { KeptOffer, ResumeInput } from '../coordinator/resume.ts';
import { RunStore } from '../coordinator/store.ts';
import type { StepRecord } from '../coordinator/store.ts';
import { StageHost } from '../node/stage-host.ts';
import { createShardOptimizer } from '../node/optimizer.ts';
import { runVolunteer } from '../node/volunteer.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { AdamW } from '../engine/train/optim.ts';
import { clipGradNorm } from '../engine/train/clip.ts';
import { learningRateAt, warmupStepsFor } from '../engine/train/schedule.ts';
import { createSwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { loadResume } from '../coordinator/launch.ts';


let tmp = '';
before(async () => { tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-restart-')); });

// ---- placement of rejoining volunteers (pure)

const STAGES = [{ layerStart: 0, layerEnd: 2 }, { layerStart: 2, layerEnd: 4 }];
const DIGESTS = ['a'.repeat(64), 'b'.repeat(64)];
function offer(stageIndex: number, steps: Array<[number, string]>, runId = 'run1'): KeptOffer {
  return { runId, stageIndex, ...STAGES[stageIndex]!, states: steps.map(([step, adapterSha256]) => ({ step, adapterSha256 })) };
}
function input(planned: string[][], offers: Record<string, KeptOffer>, memory: Record<string, number> = {}): ResumeInput {
  return {
    runId: 'run1', step: 3, stages: STAGES, planned, stageDigests: DIGESTS,
    offers: new Map(Object.entries(offers)), memoryOf: (id) => memory[id] ?? 100, need: [10, 10],
  };
}

test('placeResumed: keepers stay on their stage even when the planner put them elsewhere; the others of a kept stage wait for the first step boundary', () => {
  // the planner swapped p1 and p2; p3 kept nothing
  const r = placeResumed(input([['p2', 'p3'], ['p1']], {
    p1: offer(0, [[4, 'f'.repeat(64)], [3, DIGESTS[0]!]]), // applied step 4, can roll back to 3
    p2: offer(1, [[3, DIGESTS[1]!]]),
  }));
  assert.deepEqual(r.replicas, [['p1'], ['p2']]);
  assert.deepEqual([...r.keep].sort(), [['p1', 0], ['p2', 1]]);
  assert.deepEqual(r.deferred, ['p3']);
  assert.deepEqual(r.stagesWithoutState, []);
});

test('placeResumed: offers of another step, run, layer range or adapter are refused with a reason; such stages fall back to the checkpoint', () => {
  const r = placeResumed(input([['p1', 'p4'], ['p2', 'p3']], {
    p1: offer(0, [[3, 'c'.repeat(64)]]), // adapter differs from the committed one
    p2: offer(1, [[5, DIGESTS[1]!], [4, DIGESTS[1]!]]), // ahead of the committed step
    p3: offer(1, [[3, DIGESTS[1]!]], 'other'),
    p4: { ...offer(0, [[3, DIGESTS[0]!]]), layerEnd: 3 },
  }));
  assert.deepEqual(r.keep.size, 0);
  assert.deepEqual(r.replicas, [['p1', 'p4'], ['p2', 'p3']]);
  assert.deepEqual(r.deferred, []);
  assert.deepEqual(r.stagesWithoutState, [0, 1]);
  assert.equal(r.notes.length, 4);
  assert.match(r.notes.join('\n'), /differs from the committed one/);
  assert.match(r.notes.join('\n'), /at step\(s\) 5, 4, not the committed step 3/);
  assert.match(r.notes.join('\n'), /another run/);
  assert.match(r.notes.join('\n'), /not a stage of this run/);
});

test('placeResumed: a stage emptied by keepers moving away takes a waiting peer; one stage kept, the other from the checkpoint', () => {
  // planner: p1 (kept stage 1) on stage 0, p2 (kept stage 1) on stage 1, p3 (nothing) on stage 1
  const r = placeResumed(input([['p1'], ['p2', 'p3']], {
    p1: offer(1, [[3, DIGESTS[1]!]]), p2: offer(1, [[3, DIGESTS[1]!]]),
  }));
  assert.deepEqual(r.replicas, [['p3'], ['p1', 'p2']]);
  assert.deepEqual(r.deferred, []);
  assert.deepEqual(r.stagesWithoutState, [0]);
  // when nobody can fill the emptied stage, the planner's placement stands and keepers keep only there
  const r2 = placeResumed(input([['p1'], ['p2', 'p3']], {
    p1: offer(1, [[3, DIGESTS[1]!]]), p2: offer(1, [[3, DIGESTS[1]!]]),
  }, { p3: 5 }));
  assert.deepEqual(r2.replicas, [['p1'], ['p2']]);
  assert.deepEqual([...r2.keep], [['p2', 1]]);
  assert.deepEqual(r2.deferred, ['p3']);
  assert.deepEqual(r2.stagesWithoutState, [0]);
  assert.match(r2.notes.join('\n'), /peer p1 kept stage 1, but the plan needs it on another stage/);
});

// ---- a stage host keeps the state from before its last update and rolls back to it
// (r = 64 so the down_proj LoRA tensors reach the 4096 elements above which 8-bit state is used)

const HF = {
  model_type: 'llama', vocab_size: 97, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
  num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 256, tie_word_embeddings: false,
};
const LORA = { r: 64, loraAlpha: 16, loraDropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'] as Array<'q_proj' | 'v_proj' | 'down_proj'>, useRslora: false, initLoraWeights: true as const };

async function makeHost(spec: OptimSpec, snapshotDir: string, residentBytes: number): Promise<{ host: StageHost; stage: Stage }> {
  const llama = parseLlamaConfig(HF);
  const stage = await loadStage(randomWeightSource(llama, 3), new RefBackend(), { layerStart: 0, layerEnd: 2, lora: LORA, seed: 1 });
  const host = new StageHost(stage, {
    runId: 'r', peerId: '12D3KooW', stageIndex: 0, numStages: 1, layerStart: 0, layerEnd: 2, modelConfigJson: '{}',
    lora: { ...LORA, initLoraWeights: 'kaiming' }, optim: spec, seed: 1, gradientCheckpointing: true, wireCodec: 'f32',
    blobs: [], adapterBlob: null, optimizerBlob: null, step: 0, totalSteps: 9,
  }, await createShardOptimizer(spec, stage.params, { spillDir: path.join(snapshotDir, 'optim'), state: null }), { dir: snapshotDir, residentBytes });
  return { host, stage };
}

/** one optimizer update through the aggregate stream with deterministic gradients */
async function apply(host: StageHost, stage: Stage, seed: number): Promise<void> {
  const grads = stage.params.map((p, i) => encodeTensor(Float32Array.from(p.data, (_, j) => Math.sin(seed * 7.1 + i * 1.3 + j * 0.37) * 1e-2), p.shape, 'f32'));
  await host.aggregate({ runId: 'r', step: host.step, phase: 'apply', from: 0, count: grads.length, grads, lr: 1e-2, last: true });
}

const snapshotOf = (stage: Stage) => stage.params.map((p) => Float32Array.from(p.data));
const sameBits = (a: Float32Array[], b: Float32Array[]) => a.length === b.length && a.every((x, i) => Buffer.compare(Buffer.from(x.buffer), Buffer.from(b[i]!.buffer)) === 0);

for (const [optim, residentBytes] of [['paged_adamw_8bit', 0], ['adamw_torch', 1 << 30]] as const) {
  test(`stage host (${optim}, snapshot ${residentBytes === 0 ? 'spilled to disk' : 'in memory'}): rolls the uncommitted update back bit for bit, redoing it gives the same state`, async () => {
    const dir = path.join(tmp, `host-${optim}`);
    const spec: OptimSpec = { optim, adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0.01, residentBytes: 0 };
    const { host, stage } = await makeHost(spec, dir, residentBytes);
    const optimizerBytes = async () => Buffer.from((await host.optimizerChunk({ runId: 'r', step: host.step, offset: 0, length: 8 << 20 })).bytes);
    try {
      await apply(host, stage, 1);
      const at1 = snapshotOf(stage);
      const opt1 = await optimizerBytes();
      await apply(host, stage, 2); // the update a dead coordinator never committed
      const at2 = snapshotOf(stage);
      const opt2 = await optimizerBytes();
      assert.ok(!sameBits(at1, at2), 'the second update changed the adapter');
      const files = await readdir(dir).catch(() => [] as string[]);
      assert.equal(files.filter((f) => f.endsWith('.snapshot')).length, residentBytes === 0 ? 1 : 0, `snapshot files in ${dir}: ${files}`);

      const offer = await host.detach();
      assert.deepEqual(offer.states.map((s) => s.step), [2, 1]);
      assert.equal(offer.states[0]!.adapterSha256, adapterDigest(stage.params));
      assert.equal(offer.states[1]!.adapterSha256, adapterDigest(stage.params.map((p, i) => ({ ...p, data: at1[i]! }))));

      await assert.rejects(host.resumeAt(0, offer.states[1]!.adapterSha256), (e: Error) => e.name === 'StaleError' && /holds step 2 and the state of step 1/.test(e.message));
      await assert.rejects(host.resumeAt(1, 'e'.repeat(64)), (e: Error) => e.name === 'IntegrityError' && /hashes to/.test(e.message));
      // a failed digest check leaves the rolled-back state; a resume at the right digest still works
      const { rolledBack } = await host.resumeAt(1, offer.states[1]!.adapterSha256);
      assert.equal(rolledBack, false, 'the failed attempt already restored step 1');
      assert.equal(host.step, 1);
      assert.ok(sameBits(snapshotOf(stage), at1), 'adapter rolled back bit for bit');
      assert.equal(Buffer.compare(await optimizerBytes(), opt1), 0, 'optimizer state rolled back bit for bit');
      assert.equal((await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith('.snapshot')).length, 0, 'the spilled snapshot is removed once resumed');
      await apply(host, stage, 2);
      assert.ok(sameBits(snapshotOf(stage), at2), 'redoing the update gives the same adapter');
      assert.equal(Buffer.compare(await optimizerBytes(), opt2), 0, 'and the same optimizer state');
    } finally {
      await host.dispose();
      stage.dispose();
    }
  });
}

test('stage host: a resume at the current step keeps the state; a forward started before the coordinator was lost leaves nothing behind', async () => {
  const spec: OptimSpec = { optim: 'adamw_torch', adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0, residentBytes: 0 };
  const { host, stage } = await makeHost(spec, path.join(tmp, 'host-keep'), 1 << 30);
  try {
    await apply(host, stage, 1);
    const at1 = snapshotOf(stage);
    const S = 8, ids = Int32Array.from({ length: 2 * S }, (_, i) => (i * 5) % 97);
    const fwd = (mb: number) => host.forward({ runId: 'r', step: 1, mb, attempt: 0, stageIndex: 0, batch: 2, seqLen: S, ids: encodeTensor(ids, [2 * S], 'i32'), labels: encodeTensor(ids, [2 * S], 'i32'), dropoutSeed: 0, train: true });
    const running = fwd(0), queued = fwd(1);
    const offer = await host.detach();
    await running; // was computing when the coordinator was lost: finishes, its input is released by detach
    await assert.rejects(queued, (e: Error) => e.name === 'StaleError' && /abandoned/.test(e.message));
    assert.equal(host.inflight, 0);
    assert.deepEqual(offer.states.map((s) => s.step), [1, 0]);
    assert.deepEqual(await host.resumeAt(1, offer.states[0]!.adapterSha256), { rolledBack: false });
    assert.ok(sameBits(snapshotOf(stage), at1));
    assert.equal(host.previousStep, null, 'the older state is dropped once resumed');
  } finally {
    await host.dispose();
    stage.dispose();
  }
});

test('a step commit is one LevelDB batch: record, adapter, cursor and optimizer checkpoint together', async () => {
  const store = await RunStore.open(path.join(tmp, 'db-batch'));
  const db = (store as unknown as { db: { batch: (ops: Array<{ key: string }>) => Promise<void>; put: () => Promise<void> } }).db;
  const batches: string[][] = [];
  const realBatch = db.batch.bind(db);
  db.batch = async (ops) => { batches.push(ops.map((o) => o.key)); await realBatch(ops); };
  db.put = async () => { throw new Error('commitStep must not write outside its batch'); };
  try {
    const rec: StepRecord = { step: 2, loss: 1, lr: 1e-3, gradNorm: 0.5, tokens: 64, tokensPerSecond: 10, timeMs: Date.now(), cursor: 8 };
    await store.commitStep(rec, new Uint8Array([1, 2, 3]), [new Uint8Array([4]), new Uint8Array([5])]);
    assert.equal(batches.length, 1);
    assert.deepEqual(batches[0]!.sort(), ['adapter:0000000002', 'ckpt:0000000002', 'history:0000000002', 'latest', 'optim:0000000002:0000000000', 'optim:0000000002:0000000001']);
    assert.deepEqual((await store.latest())?.step, 2);
    assert.deepEqual(await store.latestCheckpoint(), { step: 2, stages: 2 });
  } finally {
    await store.close();
  }
});

// ---- in process: volunteers replaced while the coordinator was down

const HF4 = { ...HF, num_hidden_layers: 4 };
const llama4 = parseLlamaConfig(HF4);
const weights4 = randomWeightSource(llama4, 1);
const STEPS = 4, MBS = 4;
const train4 = resolveTrainConfig({ flags: {
  max_steps: STEPS, learning_rate: 1e-2, lora_r: 4, lora_alpha: 8, target_modules: 'q_proj,v_proj,down_proj',
  per_device_train_batch_size: 2, gradient_accumulation_steps: MBS, device: 'ref', max_grad_norm: 0.3, warmup_steps: 1,
  save_strategy: 'steps', save_steps: 1,
} });
const lora4 = loraConfigOf(train4);
function microBatch(seed: number): MicroBatch {
  const B = 2, S = 8 + (seed % 3);
  const ids = new Int32Array(B * S), labels = new Int32Array(B * S);
  for (let i = 0; i < B * S; i++) ids[i] = (seed * 31 + i * 7 + (i * i) % 13) % 97;
  for (let i = 0; i < B * S; i++) labels[i] = i % S === S - 1 || (i % S) < seed % 2 ? -100 : ids[i + 1]!;
  return { ids, labels, batch: B, seqLen: S };
}
const batchesFor = (s: number) => Array.from({ length: MBS }, (_, k) => microBatch(s * MBS + k));

/** the same training with one whole-model Stage in this process: the reference */
async function localRun(): Promise<{ init: Map<string, Float32Array>; final: Map<string, Float32Array> }> {
  const stage = await loadStage(weights4, new RefBackend(), { layerStart: 0, layerEnd: 4, lora: lora4, seed: train4.seed });
  const adam = new AdamW(stage.params.map((p) => ({ name: p.name, numel: p.data.length })),
    { optim: train4.optim, beta1: train4.adam_beta1, beta2: train4.adam_beta2, eps: train4.adam_epsilon, weightDecay: train4.weight_decay });
  const init = new Map(stage.params.map((p) => [p.name, Float32Array.from(p.data)]));
  const warm = warmupStepsFor(STEPS, train4.warmup_steps, train4.warmup_ratio);
  for (let s = 0; s < STEPS; s++) {
    const mbs = batchesFor(s);
    let N = 0;
    for (const m of mbs) for (const l of m.labels) if (l !== -100) N++;
    const grads = stage.newGrads();
    for (const [k, m] of mbs.entries()) {
      await stage.forward({ key: `k${k}`, batch: m.batch, seqLen: m.seqLen, ids: m.ids, labels: m.labels, dropoutSeed: 0 }, { train: true });
      await stage.backward(`k${k}`, grads, { lossScale: 1 / N });
    }
    clipGradNorm(grads, train4.max_grad_norm);
    adam.update(stage.params.map((p) => p.data), grads, learningRateAt(train4.learning_rate, train4.lr_scheduler_type, s, warm, STEPS));
  }
  return { init, final: new Map(stage.params.map((p) => [p.name, p.data])) };
}

test('volunteers replaced while the coordinator was down: the kept replica resumes and hands its state to a newcomer, the stage nobody kept loads the checkpoint; the result equals the local loop', async () => {
  const reference = localRun();
  const dir = path.join(tmp, 'inproc');
  const coordDir = path.join(dir, 'coord');
  const peerIdOf = async (dataDir: string) => { const n = await createSwarmNode({ dataDir }); const id = n.peerId.toString(); await n.stop(); return id; };
  const events: RunEvent[][] = [[], []];
  const logs: string[] = [];
  const volunteerEvents = new Map<string, Array<Record<string, unknown>>>();
  const volunteer = (addr: string, name: string, signal?: AbortSignal) => {
    const ev: Array<Record<string, unknown>> = [];
    volunteerEvents.set(name, ev);
    return runVolunteer({ coordinator: addr, token: null, device: 'ref', maxMemoryBytes: 2 ** 30, dataDir: path.join(dir, name), json: false, listen: '/ip4/127.0.0.1/tcp/0' },
      { backend: new RefBackend(), abort: signal, onEvent: (e) => ev.push(e) });
  };
  const coordinator = async (k: number, listen: string, resume: Awaited<ReturnType<typeof loadResume>>, batches: (s: number) => Promise<MicroBatch[]>) => {
    const node = await createSwarmNode({ dataDir: coordDir, listen: [listen] });
    const store = await RunStore.open(path.join(coordDir, 'db'));
    if (k === 0) await store.putMeta({ runId: 'restart', model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
    const coord = new Coordinator({
      node, store, blobs: new BlobStore(coordDir), runId: 'restart', modelName: 'random', llama: llama4,
      modelConfigJson: JSON.stringify(HF4), weights: weights4, train: train4, lora: lora4,
      data: { totalSteps: STEPS, microBatchesForStep: batches, cursorAfter: (s) => s * MBS },
      memory: () => 1, minPeers: 3, pipelineStages: 2, wireCodec: 'f32', token: null, initAdapter: null, resume,
      emit: (e) => { events[k]!.push(e); },
      log: (m) => logs.push(`[${k}] ${m}`),
    });
    await coord.publishShards();
    await coord.start();
    return { node, store, coord, addr: node.getMultiaddrs()[0]!.toString() };
  };

  const names = ['v0', 'v1', 'v2'];
  const ids = new Map<string, string>();
  for (const n of [...names, 'n0', 'n1']) ids.set(await peerIdOf(path.join(dir, n)), n);
  const aborts = new Map(names.map((n) => [n, new AbortController()]));
  // the first coordinator "dies" after committing step 3, as it is about to start step 4: it stops
  // there for good, its node goes away without a goodbye, and two volunteers crash with it
  let crashed!: () => void;
  const crash = new Promise<void>((r) => { crashed = r; });
  const a = await coordinator(0, '/ip4/127.0.0.1/tcp/0', null, async (s) => {
    if (s < 3) return batchesFor(s);
    crashed();
    return new Promise<never>(() => {});
  });
  const listen = a.addr.replace(/\/p2p\/.*$/, '');
  const first = names.map((n) => volunteer(a.addr, n, aborts.get(n)!.signal));
  await crash;
  await a.coord.stop();
  await a.node.stop();
  const plan = events[0]!.find((e) => e.event === 'plan')!.stages as Array<{ replicas: string[] }>;
  const Y = plan.findIndex((st) => st.replicas.length === 2), X = 1 - Y;
  const keeper = ids.get(plan[Y]!.replicas[1]!)!;
  for (const id of [plan[X]!.replicas[0]!, plan[Y]!.replicas[0]!]) aborts.get(ids.get(id)!)!.abort();
  await a.store.close();

  const store = await RunStore.open(path.join(coordDir, 'db'));
  const resume = await loadResume(store);
  await store.close();
  assert.equal(resume?.step, 3);
  assert.equal(resume?.checkpointStep, 3);
  const b = await coordinator(1, listen, resume, async (s) => batchesFor(s));
  assert.equal(b.addr, a.addr, 'same identity and address');
  const fresh = ['n0', 'n1'].map((n) => volunteer(b.addr, n));
  try {
    await b.coord.finished;
    assert.equal(b.coord.runState, 'finished', logs.join('\n'));
    const placed = events[1]!.find((e) => e.event === 'resume_plan')!;
    assert.deepEqual(Object.entries(placed.kept as object).map(([id, s]) => [ids.get(id), s]), [[keeper, Y]]);
    assert.deepEqual(placed.stages_from_checkpoint, [X]);
    assert.match(logs.join('\n'), new RegExp(`no peer kept stage ${X} at step 3; it loads the committed adapter of step 3 and the optimizer checkpoint of step 3 \\(exact\\)`));
    const deferred = (placed.deferred as string[]).map((id) => ids.get(id));
    for (const n of deferred) {
      // placed at the first step boundary (on the slowest stage) with the state of a live replica
      const ev = volunteerEvents.get(n!)!;
      assert.equal(ev.find((e) => e.event === 'assigned')?.step, 3);
      assert.ok(ev.some((e) => e.event === 'blob' && /^optimizer\.stage\d\.step3$/.test(String(e.name))), `${n} loaded a replica's optimizer state`);
    }
    assert.deepEqual(events[1]!.filter((e) => e.event === 'step').map((e) => e.step), [4]);
    const kev = volunteerEvents.get(keeper)!;
    assert.deepEqual(kev.filter((e) => e.event === 'resumed').map((e) => [e.step, e.rolled_back]), [[3, false]]);
    const codes = await Promise.all([...first, ...fresh]);
    assert.deepEqual(names.map((n, i) => [n, codes[i]]).filter(([n]) => n === keeper).map(([, c]) => c), [0]);
    assert.deepEqual(codes.slice(3), [0, 0]);
    const ref = await reference;
    const adapter = new Map(b.coord.currentAdapter().map((t) => [t.name, t.data]));
    let num = 0, den = 0;
    for (const [name, x0] of ref.init) {
      const xa = adapter.get(name)!, xr = ref.final.get(name)!;
      for (let i = 0; i < x0.length; i++) { num += (xa[i]! - xr[i]!) ** 2; den += (xr[i]! - x0[i]!) ** 2; }
    }
    const rel = Math.sqrt(num / den);
    console.log(`# restart with replaced volunteers vs local loop: relative update difference ${rel.toExponential(2)}`);
    assert.ok(Math.sqrt(den) > 1e-3);
    assert.ok(rel <= 1e-5, `relative update difference ${rel}`);
  } finally {
    await b.coord.stop();
    await b.node.stop();
    await b.store.close();
  }
});

// ---- real processes: the coordinator SIGKILLs itself at three points of three steps

type Proc = CliProc;
const procs: Proc[] = [];

function start(args: string[], env: Record<string, string> = {}): Proc {
  const p = spawnCli(args, env);
  procs.push(p);
  return p;
}

async function waitEvent(p: Proc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.find(pred);
    if (e !== undefined) return e;
    if (p.child.exitCode !== null || p.child.signalCode !== null) throw new Error(`process exited (${p.child.exitCode ?? p.child.signalCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

after(async () => {
  for (const p of procs) {
    if (p.child.exitCode === null && p.child.signalCode === null) {
      try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ }
    }
  }
  if (tmp !== '') await rm(tmp, { recursive: true, force: true });
});

const TRAIN_FLAGS = [
  '--max-steps', '4', '--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '4',
  '--learning-rate', '1e-3', '--no-shuffle', '--lora-dropout', '0', '--max-seq-length', '64',
  '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj,down_proj', '--seed', '7',
];

test('the coordinator SIGKILLed mid-apply, right after a commit and between apply and commit resumes each time at the last committed step; no step is lost or applied twice; the adapter equals `swarmtune train`', async () => {
  const t0 = Date.now();
  const modelDir = await ensureTinyModel(path.join(tmp, 'model'));
  // an init adapter with non-zero B (one trainer step), so every tensor's update is measurable
  const initDir = path.join(tmp, 'init');
  const init = start(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...TRAIN_FLAGS, '--max-steps', '1', '--learning-rate', '1e-2', '--output-dir', initDir, '--device', 'cpu']);
  assert.equal(await init.exit, 0, init.stderr.join(''));
  const flags = ['--model', modelDir, '--data', TINY_DATASET_PATH, ...TRAIN_FLAGS, '--init-adapter', initDir];
  const localDir = path.join(tmp, 'local');
  const local = start(['train', ...flags, '--output-dir', localDir, '--device', 'cpu']);

  const port = await new Promise<number>((resolve) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => { const p = (srv.address() as net.AddressInfo).port; srv.close(() => resolve(p)); });
  });
  const coordDir = path.join(tmp, 'coord');
  const outDir = path.join(tmp, 'swarm');
  const launchArgs = ['launch', ...flags, '--listen', `/ip4/127.0.0.1/tcp/${port}`, '--min-peers', '3', '--pipeline-stages', '2',
    '--wire-dtype', 'f32', '--json', '--exit-on-finish', '--output-dir', outDir, '--data-dir', coordDir];
  // [crash point, the last committed step once it fired, stages whose volunteers applied an uncommitted update]
  const crashes: Array<[string, number, number[]]> = [['mid-apply@2', 1, [0]], ['after-commit@3', 3, []], ['before-commit@4', 3, [0, 1]]];

  const launches: Proc[] = [];
  const launchStartMs: number[] = [];
  let vols: Proc[] = [];
  const stageOf = new Map<Proc, number>();
  for (let i = 0; i <= crashes.length; i++) {
    launchStartMs.push(Date.now());
    const c = start(launchArgs, i < crashes.length ? { SWARMTUNE_TEST_CRASH: crashes[i]![0] } : {});
    launches.push(c);
    const addr = String((await waitEvent(c, (e) => e.event === 'listening', `launch ${i} listening`)).multiaddr);
    if (i === 0) {
      vols = [0, 1, 2].map((k) => start(['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, `v${k}`)]));
      await waitEvent(c, (e) => e.event === 'plan', 'plan');
      for (const v of vols) stageOf.set(v, Number((await waitEvent(v, (e) => e.event === 'assigned', 'assigned')).stage));
    } else {
      const [, committed] = crashes[i - 1]!;
      const resumed = await waitEvent(c, (e) => e.event === 'resumed', `launch ${i} resumed`);
      assert.equal(resumed.step, committed, `launch ${i} resumes at the last committed step`);
      const placed = await waitEvent(c, (e) => e.event === 'resume_plan', `launch ${i} resume plan`, 60_000);
      assert.equal(Object.keys(placed.kept as object).length, 3, `every volunteer keeps its stage: ${JSON.stringify(placed)}\n${c.stderr.join('')}`);
      assert.deepEqual(placed.stages_from_checkpoint, [], 'no stage falls back to a checkpoint');
    }
    if (i < crashes.length) {
      const code = await c.exit;
      assert.equal(code, 137, `launch ${i} killed itself (${crashes[i]![0]}); stderr:\n${c.stderr.join('').slice(-3000)}`);
      assert.match(c.stderr.join(''), new RegExp(`SWARMTUNE_TEST_CRASH: killing the coordinator at ${crashes[i]![0].replace('@', ' of step ')}`));
      // what the dead coordinator left on disk is the step the next launch must resume at
      const store = await RunStore.open(path.join(coordDir, 'db'));
      try {
        assert.equal((await store.latest())?.step, crashes[i]![1], `LevelDB after ${crashes[i]![0]}`);
      } finally {
        await store.close();
      }
    }
  }
  const last = launches.at(-1)!;
  await waitEvent(last, (e) => e.event === 'finished', 'finished', 180_000);
  assert.equal(await last.exit, 0);
  assert.deepEqual(await Promise.all(vols.map((v) => v.exit)), [0, 0, 0], 'volunteers exit 0 when the run ends');

  // announced steps: none twice, in order; step 3 was committed by the launch that died right after
  // committing it (never announced) and resumed, not redone, by the next
  const announced = launches.map((l) => l.events.filter((e) => e.event === 'step').map((e) => Number(e.step)));
  assert.deepEqual(announced, [[1], [2], [], [4]]);
  const store = await RunStore.open(path.join(coordDir, 'db'));
  try {
    const history = await store.history();
    assert.deepEqual(history.map((h) => h.step), [1, 2, 3, 4]);
    assert.ok(history[2]!.timeMs < launchStartMs[2]!, 'step 3 was committed once, before the launch that resumed at it');
    assert.ok(history[3]!.timeMs > launchStartMs[3]!, 'step 4 was committed by the last launch (its first try died before the commit)');
  } finally {
    await store.close();
  }

  // every volunteer kept its stage through the three restarts and rolled back exactly the updates the
  // dead coordinator had applied on its stage but not committed
  for (const v of vols) {
    const s = stageOf.get(v)!;
    const resumed = v.events.filter((e) => e.event === 'resumed');
    assert.equal(resumed.length, 3, `volunteer on stage ${s}: ${JSON.stringify(v.events.filter((e) => e.event !== 'blob'))}`);
    resumed.forEach((e, k) => {
      const [point, committed, ahead] = crashes[k]!;
      assert.equal(e.step, committed, `after ${point}`);
      assert.equal(e.rolled_back, ahead.includes(s), `stage ${s} after ${point} rolled back: ${JSON.stringify(e)}`);
      assert.equal(e.from_step, ahead.includes(s) ? committed + 1 : committed);
    });
    assert.equal(v.events.filter((e) => e.event === 'blob' && e.kind === 'fetched').length > 0, true);
    assert.equal(v.events.filter((e) => e.event === 'ready').length, 4, 'ready once per launch, without reloading');
  }

  assert.equal(await local.exit, 0, local.stderr.join(''));
  const { rel, norm } = relUpdateDiff(await adapterMap(initDir), await adapterMap(outDir), await adapterMap(localDir));
  console.log(`# coordinator killed 3 times: relative update difference to swarmtune train ${rel.toExponential(2)} (update norm ${norm.toExponential(2)}), ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  assert.ok(norm > 1e-4, `the update must be non-trivial (norm ${norm})`);
  assert.ok(rel <= 1e-5, `restarted swarm vs uninterrupted train: relative update difference ${rel} > 1e-5`);
});
