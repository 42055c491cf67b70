// Weights from peers in a real swarm (real libp2p nodes on 127.0.0.1, RefBackend, random 4-layer model): a
// volunteer joining a run that is already training fetches its shard blobs in chunks from the peer already
// serving its stage as well as from the coordinator, the serving peer's own request log shows it served them,
// and the adapter still equals the same training in one local loop (relative difference ≤ 1e-5, f32 wire).
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
import { createLogger } from '../protocol/log.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { runVolunteer } from '../node/volunteer.ts';

const HF = {
  model_type: 'llama', vocab_size: 97, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4,
  num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 256, tie_word_embeddings: false,
};
const llama = parseLlamaConfig(HF);
const weights = randomWeightSource(llama, 1);
const STEPS = 3, MBS = 4;
/** the coordinator publishes in 4 KiB chunks, so each ~25-70 KB shard blob of this model is 7-17 chunks to share out */
const CHUNK = 4096;
const train = resolveTrainConfig({ flags: {
  max_steps: STEPS, learning_rate: 1e-2, lora_r: 4, lora_alpha: 8, target_modules: 'q_proj,v_proj,down_proj',
  per_device_train_batch_size: 2, gradient_accumulation_steps: MBS, device: 'ref', max_grad_norm: 0.3, warmup_steps: 1,
} });
const lora = loraConfigOf(train);

function microBatch(seed: number): MicroBatch {
  const B = 2, S = 8 + (seed % 3);
  const ids = new Int32Array(B * S), labels = new Int32Array(B * S);
  for (let i = 0; i < B * S; i++) ids[i] = (seed * 31 + i * 7 + (i * i) % 13) % 97;
  for (let i = 0; i < B * S; i++) labels[i] = i % S === S - 1 || (i % S) < seed % 2 ? -100 : ids[i + 1]!;
  return { ids, labels, batch: B, seqLen: S };
}
const batchesFor = (s: number) => Array.from({ length: MBS }, (_, k) => microBatch(s * MBS + k));

const dirs: string[] = [];
after(async () => { for (const d of dirs) await rm(d, { recursive: true, force: true }); });

/** The same training with one whole-model Stage in this process (what `swarmtune train` runs): the reference. */
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

test('a late joiner fetches its shard blobs in chunks from the peer serving its stage and the coordinator; the run equals the local loop', { timeout: 240_000 }, async () => {
  const ref = await localRun();
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-blobs-swarm-'));
  dirs.push(tmp);
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'blobs', model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const events: RunEvent[] = [];
  let stepOne!: () => void;
  const afterStepOne = new Promise<void>((r) => { stepOne = r; });
  const coord = new Coordinator({
    node, store, blobs: new BlobStore(path.join(tmp, 'coord'), { chunkBytes: CHUNK }), runId: 'blobs', modelName: 'random', llama,
    modelConfigJson: JSON.stringify(HF), weights, train, lora,
    data: { totalSteps: STEPS, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s * MBS },
    memory: () => 1, minPeers: 2, pipelineStages: 2, wireCodec: 'f32', token: null, initAdapter: null, resume: null,
    emit: (e) => { events.push(e); if (e.event === 'step' && e.step === 1) stepOne(); },
    log: () => {},
  });
  try {
    await coord.publishShards();
    await coord.start();
    const addr = node.getMultiaddrs()[0]!.toString();
    const ids: string[] = [];
    const volunteerEvents: Array<Array<Record<string, unknown>>> = [[], [], []];
    // each volunteer's rpc log: a served chunk is one "weights <- <peer> offset=N: ok" line
    const rpcLines: string[][] = [[], [], []];
    const vols = [0, 1, 2].map(async (i) => {
      const dataDir = path.join(tmp, `v${i}`);
      const n = await createSwarmNode({ dataDir }); // the persisted peer id the volunteer will use
      ids[i] = n.peerId.toString();
      await n.stop();
      if (i === 2) await afterStepOne; // joins a run that is already training
      const log = createLogger({ debug: 'swarmtune:node:rpc', sink: (line) => rpcLines[i]!.push(line) }).child('node');
      return runVolunteer({ coordinator: addr, token: null, device: 'ref', maxMemoryBytes: 2 ** 30, dataDir, json: true, listen: '/ip4/127.0.0.1/tcp/0', log },
        { backend: new RefBackend(), onEvent: (e) => volunteerEvents[i]!.push(e) });
    });
    await coord.finished;
    assert.deepEqual(await Promise.all(vols), [0, 0, 0]);
    assert.equal(events.find((e) => e.event === 'error'), undefined);
    const added = events.find((e) => e.event === 'peer_added');
    assert.ok(added !== undefined && added.peer_id === ids[2], 'the late peer was added to a stage');
    // the volunteer serving that stage when the joiner came: the one of the first two assigned to it
    const servers = [0, 1].filter((i) => volunteerEvents[i]!.some((e) => e.event === 'assigned' && e.stage === added.stage));
    assert.equal(servers.length, 1, `one of the first two volunteers served stage ${added.stage}: ${JSON.stringify(events.filter((e) => e.event !== 'step' && e.event !== 'mb'))}`);
    const h = servers[0]!, holder = ids[h]!;

    // the joiner's account: every frozen shard blob came in chunks, some from the holder, some from the coordinator
    const fetched = volunteerEvents[2]!.filter((e) => e.event === 'blob' && e.kind === 'fetched' && /^(embed|head|layer\.\d+)$/.test(String(e.name)));
    assert.ok(fetched.length >= 3, `the stage's shard blobs were fetched: ${JSON.stringify(fetched)}`);
    let fromHolder = 0, fromCoordinator = 0;
    for (const e of fetched) {
      const by = e.chunksFrom as Record<string, number>;
      fromHolder += by[holder] ?? 0;
      fromCoordinator += by[node.peerId.toString()] ?? 0;
      assert.equal(Object.values(by).reduce((a, b) => a + b, 0), Math.ceil(Number(e.sizeBytes) / CHUNK), `blob ${e.name}: each chunk fetched once`);
    }
    assert.ok(fromHolder > 0, 'the volunteer already serving the stage served chunks');
    assert.ok(fromCoordinator > 0, 'the coordinator served chunks too (both at once)');
    // the holder's own account: its rpc log has one served "weights" line per chunk it sent the joiner
    const served = rpcLines[h]!.filter((l) => l.includes(`weights <- ${ids[2]}`) && /: ok \(/.test(l));
    assert.equal(served.length, fromHolder, `holder log:\n${rpcLines[h]!.filter((l) => l.includes('weights')).join('\n')}`);

    // and the training is unchanged
    const adapter = new Map(coord.currentAdapter().map((t) => [t.name, t.data]));
    let num = 0, den = 0;
    for (const [name, x0] of ref.init) {
      const xa = adapter.get(name), xr = ref.final.get(name)!;
      assert.ok(xa !== undefined, `swarm adapter lacks ${name}`);
      for (let i = 0; i < x0.length; i++) { num += (xa[i]! - xr[i]!) ** 2; den += (xr[i]! - x0[i]!) ** 2; }
    }
    const rel = Math.sqrt(num / den);
    assert.ok(rel <= 1e-5, `relative update difference ${rel} with a late joiner fed by a peer`);
  } finally {
    await coord.stop();
    await node.stop();
    await store.close();
  }
});
