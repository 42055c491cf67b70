// The micro-batch window (coordinator/routes.ts PeerSlots, coordinator/step.ts): a peer never holds
// more micro-batches in flight than the planner budgets activations for (spec.ts: min(4, accumulation)),
// however many routes share it, and the deeper window with commit rounds behind it still trains exactly
// what the local loop does. A 3-stage swarm of 4 in-process volunteers (one stage gets two replicas, so
// the other two stages' only replicas each serve both routes) with 8 micro-batches per step: before the
// per-peer bound, 2 routes × 3 in flight put 6 through a shared peer. Random 3-layer hidden-32 model,
// RefBackend, 2 steps: a few seconds on 2 cores.
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
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { inFlightPerPeer, PeerSlots } from '../coordinator/routes.ts';
import { runVolunteer } from '../node/volunteer.ts';
import type { StageHost } from '../node/stage-host.ts';

test('PeerSlots: a route takes a slot on each of its peers or waits; a peer never holds more than the limit; an abort ends the wait', async () => {
  assert.equal(inFlightPerPeer(2), 2);
  assert.equal(inFlightPerPeer(8), 4);
  assert.equal(inFlightPerPeer(0), 1);
  const slots = new PeerSlots(2);
  // stage 1's only replica "b" serves both routes
  const r0 = ['a0', 'b'], r1 = ['a1', 'b'];
  assert.ok(slots.tryTake(r0) && slots.tryTake(r1));
  assert.equal(slots.heldBy('b'), 2);
  assert.equal(slots.tryTake(r0), false, 'b is full: route 0 must wait although a0 has room');
  assert.equal(slots.heldBy('a0'), 1, 'a refused take holds nothing');
  let got = false;
  const waiting = slots.take(r0, new AbortController().signal).then(() => { got = true; });
  await new Promise((r) => setImmediate(r));
  assert.equal(got, false);
  slots.release(r1);
  await waiting;
  assert.equal(slots.heldBy('b'), 2);
  assert.equal(slots.maxHeld, 2);
  const ac = new AbortController();
  const aborted = slots.take(r1, ac.signal);
  ac.abort(new Error('step over'));
  await assert.rejects(aborted, /step over/);
  assert.equal(slots.heldBy('a1'), 0);
  slots.release(r0); slots.release(r0);
  assert.throws(() => slots.release(r0), /released more slots than it took/);
  assert.throws(() => new PeerSlots(0), RangeError);
});

const HF = {
  model_type: 'llama', vocab_size: 61, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3,
  num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 128, tie_word_embeddings: false,
};
const llama = parseLlamaConfig(HF);
const weights = randomWeightSource(llama, 7);
const STEPS = 2, MBS = 8;
const train = resolveTrainConfig({ flags: {
  max_steps: STEPS, learning_rate: 1e-2, lora_r: 4, lora_alpha: 8, target_modules: 'q_proj,v_proj',
  per_device_train_batch_size: 1, gradient_accumulation_steps: MBS, device: 'ref', max_grad_norm: 1, warmup_steps: 0,
} });
const lora = loraConfigOf(train);

function microBatch(seed: number): MicroBatch {
  const S = 6 + (seed % 3);
  const ids = new Int32Array(S), labels = new Int32Array(S);
  for (let i = 0; i < S; i++) ids[i] = (seed * 17 + i * 5 + (i * i) % 7) % 61;
  for (let i = 0; i < S; i++) labels[i] = i === S - 1 ? -100 : ids[i + 1]!;
  return { ids, labels, batch: 1, seqLen: S };
}
const batchesFor = (s: number) => Array.from({ length: MBS }, (_, k) => microBatch(s * MBS + k));

const dirs: string[] = [];
after(async () => { for (const d of dirs) await rm(d, { recursive: true, force: true }); });

/** The same training with one whole-model Stage: the reference. */
async function localRun(): Promise<{ init: Map<string, Float32Array>; final: Map<string, Float32Array> }> {
  const stage = await loadStage(weights, new RefBackend(), { layerStart: 0, layerEnd: 3, lora, seed: train.seed });
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

test('a stage\'s only replica shared by two routes keeps at most min(4, accumulation) micro-batches\' activations; the swarm still equals the local loop', { timeout: 300_000 }, async () => {
  const ref = await localRun();
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-window-'));
  dirs.push(tmp);
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'window', model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const events: RunEvent[] = [];
  const coord = new Coordinator({
    node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'window', modelName: 'random', llama,
    modelConfigJson: JSON.stringify(HF), weights, train: { ...train, verify_fraction: 0 }, lora, refereeBackend: async () => new RefBackend(),
    data: { totalSteps: STEPS, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s * MBS },
    memory: () => 1, minPeers: 4, pipelineStages: 3, wireCodec: 'f32', token: null, initAdapter: null, resume: null,
    emit: (e) => { events.push(e); }, log: () => {},
  });
  // on every volunteer: micro-batches whose activations it keeps (its forward began, its backward has
  // not ended), counted by the stage host's own calls, and the most at any moment
  const kept = [0, 1, 2, 3].map(() => ({ now: 0, max: 0, stage: -1, forwards: 0 }));
  const trace = (h: StageHost, i: number) => {
    const k = kept[i]!;
    k.stage = h.stageIndex;
    const fwd = h.forward.bind(h), bwd = h.backward.bind(h);
    h.forward = async (req, o) => {
      if (!req.train) return fwd(req, o);
      k.now++; k.forwards++; k.max = Math.max(k.max, k.now);
      try { return await fwd(req, o); } catch (e) { k.now--; throw e; }
    };
    h.backward = async (req, o) => { try { return await bwd(req, o); } finally { k.now--; } };
  };
  try {
    await coord.publishShards();
    await coord.start();
    const addr = node.getMultiaddrs()[0]!.toString();
    const vols = [0, 1, 2, 3].map((i) => runVolunteer({ coordinator: addr, token: null, device: 'ref', maxMemoryBytes: 2 ** 30, dataDir: path.join(tmp, `v${i}`), json: true, listen: '/ip4/127.0.0.1/tcp/0' },
      { backend: new RefBackend(), abort: new AbortController().signal, onEvent: () => {}, onHost: (h) => trace(h, i) }));
    await coord.finished;
    assert.deepEqual(await Promise.all(vols), [0, 0, 0, 0]);
    assert.equal(events.find((e) => e.event === 'error'), undefined);
    assert.deepEqual(events.filter((e) => e.event === 'step').map((e) => e.step), [1, 2]);
    const replicas = (events.find((e) => e.event === 'plan')!.stages as Array<{ replicas: string[] }>).map((s) => s.replicas.length);
    assert.deepEqual([...replicas].sort(), [1, 1, 2], `plan ${JSON.stringify(replicas)}`);
    const budget = inFlightPerPeer(MBS);
    console.log(`# kept activations per volunteer (stage: most at once / forwards): ${kept.map((k) => `${k.stage}: ${k.max}/${k.forwards}`).join(', ')}; budget ${budget}`);
    for (const k of kept) assert.ok(k.max <= budget, `a stage-${k.stage} peer kept ${k.max} micro-batches' activations at once; the planner budgets ${budget}`);
    // the shared peers of the first two stages (every micro-batch passes them) did pipeline
    const sharedFirst = kept.filter((k) => k.stage < 2 && replicas[k.stage] === 1);
    assert.ok(sharedFirst.length >= 1 && sharedFirst.every((k) => k.forwards === STEPS * MBS && k.max >= 2), JSON.stringify(kept));
    // the update equals the local loop's (summation order only)
    let num = 0, den = 0;
    const got = new Map(coord.currentAdapter().map((t) => [t.name, t.data]));
    for (const [name, x0] of ref.init) {
      const xa = got.get(name)!, xr = ref.final.get(name)!;
      for (let i = 0; i < x0.length; i++) { num += (xa[i]! - xr[i]!) ** 2; den += (xr[i]! - x0[i]!) ** 2; }
    }
    assert.ok(Math.sqrt(den) > 1e-3, `non-trivial update (${Math.sqrt(den)})`);
    assert.ok(Math.sqrt(num / den) <= 1e-5, `relative update difference ${Math.sqrt(num / den)}`);
  } finally {
    await coord.stop();
    await node.stop();
    await store.close();
  }
});
