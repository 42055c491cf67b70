// The families beyond Llama through a 2-stage swarm in-process (real libp2p nodes on 127.0.0.1, RefBackend):
// the shard blobs carry each family's own tensors (Qwen3's q_norm / k_norm, Phi-3's fused linears, Gemma's four norms), the volunteers rebuild the
// model from the config JSON on the wire, and the adapter after training equals a local loop over one
// whole-model stage. Small model, 2 steps of 2 micro-batches: a few seconds.
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
import { runVolunteer } from '../node/volunteer.ts';

const STEPS = 2, MBS = 2;
const dirs: string[] = [];
after(async () => { for (const d of dirs) await rm(d, { recursive: true, force: true }); });

/** packed: one row of two examples (6 and 5 + seed % 2 tokens) with their segment lengths, as collate makes it */
function microBatch(seed: number, V: number, packed = false): MicroBatch {
  if (packed) {
    const a = microBatch(seed, V);
    const S0 = a.seqLen, S1 = 5 + (seed % 2);
    const ids = new Int32Array([...a.ids.subarray(0, S0), ...a.ids.subarray(S0, S0 + S1)]);
    const labels = new Int32Array([...a.labels.subarray(0, S0), ...a.labels.subarray(S0, S0 + S1 - 1), -100]);
    return { ids, labels, batch: 1, seqLen: S0 + S1, segments: Int32Array.from([S0, S1]) };
  }
  const B = 2, S = 6 + (seed % 2);
  const ids = new Int32Array(B * S), labels = new Int32Array(B * S);
  for (let i = 0; i < B * S; i++) ids[i] = (seed * 31 + i * 7 + (i * i) % 13) % V;
  for (let i = 0; i < B * S; i++) labels[i] = i % S === S - 1 ? -100 : ids[i + 1]!;
  return { ids, labels, batch: B, seqLen: S };
}

const FAMILIES: Record<string, Record<string, unknown>> = {
  qwen3: {
    model_type: 'qwen3', vocab_size: 61, hidden_size: 32, head_dim: 16, intermediate_size: 48, num_hidden_layers: 4,
    num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_theta: 1000000, max_position_embeddings: 256,
    tie_word_embeddings: true, use_sliding_window: false,
  },
  // fused qkv_proj / gate_up_proj in the shard blobs, LoRA on the fused modules, longrope past the original context
  phi3: {
    model_type: 'phi3', vocab_size: 61, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4, num_attention_heads: 4,
    num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 10000, max_position_embeddings: 256, original_max_position_embeddings: 4,
    rope_scaling: { type: 'longrope', short_factor: [1, 1.5, 2, 3], long_factor: [1.2, 2.5, 6, 11] }, tie_word_embeddings: false,
  },
  // Gemma: sliding layers (window 3 < the 6-7 token rows) on both stages, soft-caps that bite, 4 norms per layer in the shards
  gemma2: {
    model_type: 'gemma2', vocab_size: 61, hidden_size: 32, head_dim: 16, intermediate_size: 48, num_hidden_layers: 4,
    num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_theta: 10000.0, max_position_embeddings: 256,
    hidden_activation: 'gelu_pytorch_tanh', query_pre_attn_scalar: 24, sliding_window: 3, attn_logit_softcapping: 2.0,
    final_logit_softcapping: 5.0,
  },
  gemma3_text: {
    model_type: 'gemma3_text', vocab_size: 61, hidden_size: 32, head_dim: 16, intermediate_size: 48, num_hidden_layers: 4,
    num_attention_heads: 4, num_key_value_heads: 1, rms_norm_eps: 1e-6, rope_theta: 1000000, rope_local_base_freq: 10000,
    max_position_embeddings: 256, hidden_activation: 'gelu_pytorch_tanh', query_pre_attn_scalar: 24, sliding_window: 3,
    sliding_window_pattern: 2, rope_scaling: { rope_type: 'linear', factor: 8.0 },
  },
};
FAMILIES['phi3 packed'] = FAMILIES.phi3!;
const TARGETS: Record<string, string> = { phi3: 'qkv_proj,o_proj,gate_up_proj', 'phi3 packed': 'qkv_proj,o_proj,gate_up_proj' };

for (const [family, HF] of Object.entries(FAMILIES)) {
  test(`${family}: a 2-stage swarm equals the local loop`, async () => {
    const cfg = parseLlamaConfig(HF);
    const weights = randomWeightSource(cfg, 1);
    const train = resolveTrainConfig({ flags: {
      max_steps: STEPS, learning_rate: 1e-2, lora_r: 4, lora_alpha: 8, target_modules: TARGETS[family] ?? 'q_proj,k_proj,o_proj,down_proj',
      per_device_train_batch_size: 2, gradient_accumulation_steps: MBS, device: 'ref', max_grad_norm: 0.3, warmup_steps: 0,
    } });
    const lora = loraConfigOf(train);
    // packing: the segment lengths go to every stage (attention per example, positions restarting)
    const batchesFor = (s: number) => Array.from({ length: MBS }, (_, k) => microBatch(s * MBS + k, cfg.vocabSize, family.endsWith('packed')));

    // the local loop: one whole-model stage
    const stage = await loadStage(weights, new RefBackend(), { layerStart: 0, layerEnd: 4, lora, seed: train.seed });
    const adam = new AdamW(stage.params.map((p) => ({ name: p.name, numel: p.data.length })),
      { optim: train.optim, beta1: train.adam_beta1, beta2: train.adam_beta2, eps: train.adam_epsilon, weightDecay: train.weight_decay });
    const init = new Map(stage.params.map((p) => [p.name, Float32Array.from(p.data)]));
    const warm = warmupStepsFor(STEPS, train.warmup_steps, train.warmup_ratio);
    for (let s = 0; s < STEPS; s++) {
      const mbs = batchesFor(s);
      const N = mbs.reduce((n, m) => n + m.labels.filter((l) => l !== -100).length, 0);
      const grads = stage.newGrads();
      for (const [k, m] of mbs.entries()) {
        await stage.forward({ key: `k${k}`, batch: m.batch, seqLen: m.seqLen, ids: m.ids, labels: m.labels, dropoutSeed: 0, ...(m.segments ? { segments: m.segments } : {}) });
        await stage.backward(`k${k}`, grads, { lossScale: 1 / N });
      }
      clipGradNorm(grads, train.max_grad_norm);
      adam.update(stage.params.map((p) => p.data), grads, learningRateAt(train.learning_rate, train.lr_scheduler_type, s, warm, STEPS));
    }

    const tmp = await mkdtemp(path.join(os.tmpdir(), `swarmtune-${family.replace(' ', '-')}-`));
    dirs.push(tmp);
    const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
    const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
    await store.putMeta({ runId: family.replace(' ', '-'), model: 'random', totalSteps: STEPS, createdMs: 0, config: {}, numStages: 0, stages: [] });
    const events: RunEvent[] = [];
    const coord = new Coordinator({
      node, store, blobs: new BlobStore(path.join(tmp, 'coord')), runId: family.replace(' ', '-'), modelName: 'random', llama: cfg,
      modelConfigJson: JSON.stringify(HF), weights, train, lora,
      data: { totalSteps: STEPS, microBatchesForStep: async (s) => batchesFor(s), cursorAfter: (s) => s * MBS },
      memory: () => 1, minPeers: 2, pipelineStages: 2, wireCodec: 'f32', token: null, initAdapter: null, resume: null,
      emit: (e) => { events.push(e); }, log: () => {},
    });
    try {
      await coord.publishShards();
      await coord.start();
      const addr = node.getMultiaddrs()[0]!.toString();
      const codes = await Promise.all([0, 1].map((i) => runVolunteer(
        { coordinator: addr, token: null, device: 'ref', maxMemoryBytes: 2 ** 30, dataDir: path.join(tmp, `v${i}`), json: true, listen: '/ip4/127.0.0.1/tcp/0' },
        { backend: new RefBackend(), abort: new AbortController().signal, onEvent: () => {} })));
      await coord.finished;
      assert.equal(events.find((e) => e.event === 'error'), undefined, JSON.stringify(events.filter((e) => e.event === 'error')));
      assert.deepEqual(events.filter((e) => e.event === 'step').map((e) => e.step), [1, 2]);
      assert.deepEqual(codes, [0, 0]);
      const plan = events.find((e) => e.event === 'plan')!.stages as unknown[];
      assert.equal(plan.length, 2);
      let num = 0, den = 0;
      const swarm = new Map(coord.currentAdapter().map((t) => [t.name, t.data]));
      for (const p of stage.params) {
        const a = swarm.get(p.name), x0 = init.get(p.name)!;
        assert.ok(a, `swarm adapter lacks ${p.name}`);
        for (let i = 0; i < x0.length; i++) { num += (a[i]! - p.data[i]!) ** 2; den += (p.data[i]! - x0[i]!) ** 2; }
      }
      assert.ok(Math.sqrt(den) > 1e-3, `non-trivial update (${Math.sqrt(den)})`);
      // summation order only (docs/swarm.md), as tests/swarm-inproc.test.ts
      assert.ok(Math.sqrt(num / den) <= 1e-5, `relative update difference ${Math.sqrt(num / den)}`);
    } finally {
      await coord.stop();
      await node.stop();
      await store.close();
      stage.dispose();
    }
  });
}
