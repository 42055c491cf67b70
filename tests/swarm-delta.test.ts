// A 2-stage in-process swarm (real libp2p nodes on 127.0.0.1, RefBackend, a random 4-layer model)
// trained with the delta wire codec aq2 over several epochs of a tiny data set: it still trains (the
// loss goes down), the hops run warm (both ends hold the same references for every sample), and spot
// checks of every micro-batch (the coordinator recomputes cold what the receivers got warm) accuse nobody.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { RefBackend } from '../engine/backends/ref.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { createSwarmNode } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { Coordinator } from '../coordinator/run.ts';
import type { MicroBatch, RunEvent } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { runVolunteer } from '../node/volunteer.ts';
import type { StageHost } from '../node/stage-host.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { DataLoader } from '../engine/train/data.ts';
import { withSamples } from '../coordinator/spec.ts';

const HF = {
  model_type: 'llama', vocab_size: 61, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 4,
  num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 128, tie_word_embeddings: false,
};
const llama = parseLlamaConfig(HF);
const weights = randomWeightSource(llama, 3);
// 4 samples, 2 micro-batches of 2 rows per step: every step is one epoch, so steps 2.. run warm
const STEPS = 6, MBS = 2, B = 2, S = 12;
const train = resolveTrainConfig({ flags: {
  max_steps: STEPS, learning_rate: 2e-2, lora_r: 4, lora_alpha: 8, target_modules: 'q_proj,v_proj,down_proj',
  per_device_train_batch_size: B, gradient_accumulation_steps: MBS, device: 'ref', warmup_steps: 0,
  // every micro-batch spot-checked: the coordinator recomputes it cold, the answer it checks is warm
  verify_fraction: 1,
} });
const lora = loraConfigOf(train);

function sample(i: number): { ids: Int32Array; labels: Int32Array } {
  // a fixed cycle per sample: learnable next-token structure
  const ids = Int32Array.from({ length: S }, (_, t) => (i * 7 + t * 5) % 61);
  const labels = Int32Array.from({ length: S }, (_, t) => (t === S - 1 ? -100 : ids[t + 1]!));
  return { ids, labels };
}
function batchesFor(step: number): MicroBatch[] {
  // the epoch's order changes every step; the samples keep their index
  return Array.from({ length: MBS }, (_, k) => {
    const samples = [0, 1].map((r) => (k * 2 + r + step) % 4);
    const rows = samples.map(sample);
    const ids = new Int32Array(B * S), labels = new Int32Array(B * S);
    rows.forEach((x, r) => { ids.set(x.ids, r * S); labels.set(x.labels, r * S); });
    return { batch: B, seqLen: S, ids, labels, samples };
  });
}

const dirs: string[] = [];
after(async () => { for (const d of dirs) await rm(d, { recursive: true, force: true }); });

async function run(codec: FloatCodec): Promise<{ losses: number[]; hosts: StageHost[]; ids: string[]; retries: number }> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-delta-'));
  dirs.push(tmp);
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'delta', model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const events: RunEvent[] = [];
  const logs: string[] = [];
  const coord = new Coordinator({
    node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'delta', modelName: 'random', llama,
    modelConfigJson: JSON.stringify(HF), weights, train, lora, refereeBackend: async () => new RefBackend(),
    data: { totalSteps: STEPS, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s * MBS },
    memory: () => 1, minPeers: 2, pipelineStages: 2, wireCodec: codec, token: null, initAdapter: null, resume: null,
    emit: (e) => { events.push(e); }, log: (m) => { logs.push(m); },
  });
  await coord.publishShards();
  await coord.start();
  const addr = node.getMultiaddrs()[0]!.toString();
  const hosts: StageHost[] = [], ids: string[] = [];
  try {
    const codes = await Promise.all([0, 1].map(async (i) => {
      const dataDir = path.join(tmp, `v${i}`);
      return runVolunteer({ coordinator: addr, token: null, device: 'ref', maxMemoryBytes: 2 ** 30, dataDir, json: true, listen: '/ip4/127.0.0.1/tcp/0' },
        { backend: new RefBackend(), abort: AbortSignal.timeout(120_000), onEvent: () => {}, onHost: (h) => { hosts[h.stageIndex] = h; } });
    }));
    await coord.finished;
    assert.deepEqual(codes, [0, 0]);
    assert.equal(events.find((e) => e.event === 'error'), undefined);
    assert.deepEqual(events.filter((e) => e.event === 'peer_banned'), [], 'no honest peer is accused');
    const plan = events.find((e) => e.event === 'plan')!.stages as Array<{ replicas: string[] }>;
    ids.push(plan[0]!.replicas[0]!, plan[1]!.replicas[0]!);
    return { losses: events.filter((e) => e.event === 'step').map((e) => e.loss as number), hosts, ids, retries: logs.filter((m) => /retry|re-running|checks it|disagree/.test(m)).length };
  } finally {
    await coord.stop(); await node.stop(); await store.close();
  }
}

test('a 2-stage swarm trains with the delta codec aq2, warm on both ends', { timeout: 180_000 }, async () => {
  const aq = await run('aq2');
  // (f32 on this run: 4.538 -> 2.861; aq2 skips what moved < 60% since the last epoch, and here every
  // step is an epoch at a high learning rate: it learns slower. Its quality is the bench's to measure.)
  console.log(`# losses aq2 ${aq.losses.map((x) => x.toFixed(3))}`);
  assert.equal(aq.losses.length, STEPS);
  assert.ok(aq.losses.at(-1)! < 0.9 * aq.losses[0]!, `aq2 loss ${aq.losses[0]} -> ${aq.losses.at(-1)}`);
  // both ends of each hop direction hold the same references for all 4 samples
  const [h0, h1] = aq.hosts;
  const keys = ['0', '1', '2', '3'];
  for (const kind of ['act', 'grad'] as const) {
    const [snd, rcv, sp, rp] = kind === 'act' ? [h0!, h1!, aq.ids[1]!, aq.ids[0]!] : [h1!, h0!, aq.ids[0]!, aq.ids[1]!];
    const a = snd.codecState.digest('send', kind, sp, keys, S, 64), b = rcv.codecState.digest('recv', kind, rp, keys, S, 64);
    assert.ok(a !== undefined && b !== undefined, `${kind}: references on both ends`);
    // a retried attempt (a commit that reached one end only, e.g. a timeout on a loaded machine)
    // leaves the ends apart until that sample's next visit, which the digest sends cold
    if (aq.retries === 0) assert.equal(a, b, `${kind}: the same references on both ends`);
    else console.log(`# ${aq.retries} retries: ${kind} references ${a === b ? 'equal' : 'apart until the next visit'}`);
  }
  // stage 0 holds act (send) and grad (recv) references for 4 samples, stage 1 the same the other way
  for (const h of [h0!, h1!]) assert.equal(h.codecState.bytes, 2 * 4 * S * 64 * 4);
});

test('the coordinator keys every row by its example index, the same on every epoch (withSamples)', () => {
  const examples = Array.from({ length: 7 }, (_, i) => {
    const n = 3 + (i % 3);
    return { ids: Int32Array.from({ length: n }, (_, t) => 100 * i + t), labels: new Int32Array(n).fill(-100), labelTokens: 0, line: i + 1 };
  });
  const loader = new DataLoader(examples, { batchSize: 2, accumulation: 2, seed: 5, shuffle: true, padId: 0 });
  const seen = new Map<number, number>();
  for (let step = 0; step < 3 * loader.stepsPerEpoch; step++) {
    for (const m of withSamples(loader, step, false)) {
      assert.equal(m.samples!.length, m.batch);
      m.samples!.forEach((i, b) => {
        // the row holds example i's tokens, whatever the epoch's order
        assert.deepEqual(m.ids.subarray(b * m.seqLen, b * m.seqLen + examples[i]!.ids.length), examples[i]!.ids);
        seen.set(i, (seen.get(i) ?? 0) + 1);
      });
    }
  }
  assert.deepEqual([...seen.keys()].sort(), [0, 1, 2, 3, 4, 5, 6]);
  assert.ok([...seen.values()].every((n) => n === 3), 'each example once per epoch');
  assert.equal(withSamples(loader, 0, true)[0]!.samples, undefined, 'packed rows carry no keys');
});
