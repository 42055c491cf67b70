// A 2-stage in-process swarm (real libp2p nodes on 127.0.0.1, RefBackend, a random 4-layer model)
// trained with the delta wire codec aq2 over several epochs of a tiny data set: it still trains (the
// loss goes down), the hops run warm (both ends hold the same references for every sample), and the
// adapter stays close to the f32 wire's.
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

async function run(codec: FloatCodec): Promise<{ losses: number[]; hosts: StageHost[]; ids: string[]; adapter: Map<string, Float32Array> }> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-delta-'));
  dirs.push(tmp);
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  await store.putMeta({ runId: 'delta', model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
  const events: RunEvent[] = [];
  const coord = new Coordinator({
    node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: 'delta', modelName: 'random', llama,
    modelConfigJson: JSON.stringify(HF), weights, train, lora, refereeBackend: async () => new RefBackend(),
    data: { totalSteps: STEPS, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s * MBS },
    memory: () => 1, minPeers: 2, pipelineStages: 2, wireCodec: codec, token: null, initAdapter: null, resume: null,
    emit: (e) => { events.push(e); }, log: () => {},
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
    const plan = events.find((e) => e.event === 'plan')!.stages as Array<{ replicas: string[] }>;
    ids.push(plan[0]!.replicas[0]!, plan[1]!.replicas[0]!);
    return { losses: events.filter((e) => e.event === 'step').map((e) => e.loss as number), hosts, ids, adapter: new Map(coord.currentAdapter().map((t) => [t.name, t.data])) };
  } finally {
    await coord.stop(); await node.stop(); await store.close();
  }
}

test('a 2-stage swarm trains with the delta codec aq2, warm on both ends, close to the f32 wire', { timeout: 180_000 }, async () => {
  const f32 = await run('f32');
  const aq = await run('aq2');
  console.log(`# losses f32 ${f32.losses.map((x) => x.toFixed(3))}, aq2 ${aq.losses.map((x) => x.toFixed(3))}`);
  assert.equal(aq.losses.length, STEPS);
  assert.ok(aq.losses.at(-1)! < 0.8 * aq.losses[0]!, `aq2 loss ${aq.losses[0]} -> ${aq.losses.at(-1)}`);
  // both ends of each hop direction hold the same references for all 4 samples
  const [h0, h1] = aq.hosts;
  const keys = ['0', '1', '2', '3'];
  for (const kind of ['act', 'grad'] as const) {
    const [snd, rcv, sp, rp] = kind === 'act' ? [h0!, h1!, aq.ids[1]!, aq.ids[0]!] : [h1!, h0!, aq.ids[0]!, aq.ids[1]!];
    const a = snd.codecState.digest('send', kind, sp, keys, S, 64), b = rcv.codecState.digest('recv', kind, rp, keys, S, 64);
    assert.ok(a !== undefined && a === b, `${kind}: sender ${a}, receiver ${b}`);
  }
  assert.ok(h0!.codecState.bytes >= 4 * S * 64 * 4 && h1!.codecState.bytes >= 4 * S * 64 * 4, 'references for every sample');
  // and the f32 wire keeps no state at all
  assert.equal(f32.hosts[0]!.codecState.bytes + f32.hosts[1]!.codecState.bytes, 0);
  // the same data, steps and seed: the final losses are close
  assert.ok(Math.abs(aq.losses.at(-1)! - f32.losses.at(-1)!) < 0.1 * f32.losses.at(-1)!, `aq2 ${aq.losses.at(-1)} vs f32 ${f32.losses.at(-1)}`);
});
