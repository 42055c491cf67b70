// Packing (issue 18, TRL SFTConfig packing=True, bfd + padding-free): best-fit decreasing rows, one flattened
// row per micro-batch, positions restarting per example, attention kept inside each example, and a packed step
// equal to the same examples unpacked (loss and LoRA gradients), on the float64 reference and the native CPU
// backend, Llama and Phi-3. Small models: a few seconds.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createBackend } from '../engine/backends/index.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { Rng } from '../engine/model/rng.ts';
import { collate, DataLoader } from '../engine/train/data.ts';
import type { TokenizedExample } from '../engine/train/data.ts';
import { packExamples, paddingFraction } from '../engine/train/packing.ts';
import { accumulateStep } from '../engine/train/trainer.ts';
import { resolveTrainConfig } from '../engine/train/config.ts';
import type { Backend } from '../engine/backend.ts';
import type { LoraConfig } from '../engine/types.ts';

registerBuiltinBackends();
const native: Backend = await createBackend('cpu');
after(() => native.dispose());

function example(len: number, seed: number, V: number, promptLen = 0): TokenizedExample {
  const r = new Rng(seed, len);
  const ids = Int32Array.from({ length: len }, () => r.nextU32() % V);
  const labels = new Int32Array(len).fill(-100);
  let labelTokens = 0;
  for (let i = promptLen; i + 1 < len; i++) { labels[i] = ids[i + 1]; labelTokens++; }
  return { ids, labels, labelTokens, line: seed + 1 };
}

test('packExamples: best-fit decreasing as TRL\'s bfd, rows in the order opened, examples kept whole', () => {
  const ex = [5, 3, 8, 2, 6].map((n, i) => example(n, i, 50));
  const rows = packExamples(ex, 10);
  // 8 → row 0; 6 → row 1; 5 → row 2 (fits nowhere); 3 → row 1 (room 4 < row 2's 5); 2 → row 0 (room 2)
  assert.deepEqual(rows.map((r) => [...r.segments]), [[8, 2], [6, 3], [5]]);
  assert.deepEqual([...rows[0].ids], [...ex[2].ids, ...ex[3].ids]);
  assert.deepEqual([...rows[1].labels], [...ex[4].labels, ...ex[1].labels]);
  assert.equal(rows.reduce((n, r) => n + r.labelTokens, 0), ex.reduce((n, e) => n + e.labelTokens, 0));
  // a micro-batch of packed rows is one row without padding
  const mb = collate(rows.slice(0, 2), 0);
  assert.deepEqual([mb.batch, mb.seqLen, [...mb.segments!]], [1, 19, [8, 2, 6, 3]]);
  assert.equal(paddingFraction(mb), 0);
  assert.ok(paddingFraction(collate([ex[2], ex[3]], 0)) > 0.3);
  assert.throws(() => packExamples([example(12, 0, 50)], 10), /line 1 has 12 tokens, more than max_length 10/);
  assert.equal(resolveTrainConfig({ flags: { packing: true } }).packing, true);
});

const LORA: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useRslora: false, initLoraWeights: true };
const FAMILIES: [string, Record<string, unknown>][] = [
  ['llama', { model_type: 'llama', vocab_size: 53, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, max_position_embeddings: 128 }],
  ['phi3', { model_type: 'phi3', vocab_size: 53, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, rms_norm_eps: 1e-5, max_position_embeddings: 128 }],
];

for (const [family, json] of FAMILIES) {
  for (const beName of ['ref', 'cpu'] as const) {
    test(`${family} on ${beName}: a packed step gives the loss and LoRA gradients of the same examples unpacked`, async () => {
      const cfg = parseLlamaConfig(json);
      const be = beName === 'ref' ? new RefBackend() : native;
      // dropout off: its masks follow micro-batch positions, so only the deterministic math compares
      const stage = await loadStage(randomWeightSource(cfg, 4), be, { layerStart: 0, layerEnd: 2, lora: { ...LORA, loraDropout: 0 }, lossChunk: 16 });
      const rng = new Rng(2);
      for (const p of stage.params) rng.fillNormal(p.data, 0, 0.2);
      const examples = [9, 4, 13, 6, 2, 11, 7, 5].map((n, i) => example(n, 10 + i, cfg.vocabSize, i % 3));
      // unpacked: 2 micro-batches of 4 padded examples; packed: the same 8 examples in rows of 16, one micro-batch
      const plain = new DataLoader(examples, { batchSize: 4, accumulation: 2, seed: 0, shuffle: false, padId: 0 }).stepMicroBatches(0);
      const packed = [collate(packExamples(examples, 16), 0)];
      assert.equal(packed[0].seqLen, examples.reduce((n, e) => n + e.ids.length, 0));
      const a = await accumulateStep(stage, plain, { seed: 0, step: 0 });
      const b = await accumulateStep(stage, packed, { seed: 0, step: 0 });
      assert.equal(a.labelTokens, b.labelTokens);
      // float32 activations summed in another order (ref: float64 accumulation): ~1e-7 relative
      const tol = beName === 'ref' ? 1e-6 : 1e-5;
      assert.ok(Math.abs(a.loss - b.loss) <= tol * a.loss, `loss ${b.loss} packed vs ${a.loss} unpacked`);
      let num = 0, den = 0;
      for (let p = 0; p < a.grads.length; p++) for (let i = 0; i < a.grads[p].length; i++) { num += (a.grads[p][i] - b.grads[p][i]) ** 2; den += a.grads[p][i] ** 2; }
      assert.ok(den > 0 && Math.sqrt(num / den) <= tol, `relative gradient difference ${Math.sqrt(num / den)}`);
      stage.dispose();
    });
  }
}

test('packed attention does not leak: an example\'s loss ignores the example before it in the row, and would not without segments', async () => {
  const cfg = parseLlamaConfig(FAMILIES[0][1]);
  const stage = await loadStage(randomWeightSource(cfg, 5), new RefBackend(), { layerStart: 0, layerEnd: 2, lora: LORA });
  const first = [example(7, 1, cfg.vocabSize), example(7, 2, cfg.vocabSize)];
  const second = example(9, 3, cfg.vocabSize);
  const loss = async (e0: TokenizedExample, segments: boolean) => {
    // the untrained example first, so that attention leaking forward would reach the trained one
    const ids = new Int32Array([...e0.ids, ...second.ids]);
    const labels = new Int32Array([...new Int32Array(7).fill(-100), ...second.labels]);
    const r = await stage.forward({ key: 'x', batch: 1, seqLen: 16, ids, labels, ...(segments ? { segments: Int32Array.from([7, 9]) } : {}) }, { train: false });
    return r.lossSum!;
  };
  assert.equal(await loss(first[0], true), await loss(first[1], true), 'the first example changed the second one\'s loss');
  const alone = await stage.forward({ key: 'y', batch: 1, seqLen: 9, ids: second.ids, labels: second.labels }, { train: false });
  assert.ok(Math.abs(await loss(first[0], true) - alone.lossSum!) <= 1e-6 * alone.lossSum!);
  // without segments (one causal sequence) the first example does change it: the check above can fail
  assert.notEqual(await loss(first[0], false), await loss(first[1], false));
  await assert.rejects(stage.forward({ key: 'z', batch: 1, seqLen: 16, ids: new Int32Array(16), segments: Int32Array.from([7, 8]) }, { train: false }), /sum to 15, seqLen is 16/);
  stage.dispose();
});

test('packed Phi-3 on the checking stand-in device: bit-identical to the host, slices only, nothing leaked', async () => {
  const { simDeviceBackend } = await import('./sim-device.ts');
  const cfg = parseLlamaConfig(FAMILIES[1][1]);
  const { backend, sim } = simDeviceBackend(native);
  const src = randomWeightSource(cfg, 6);
  const lora = { ...LORA, loraDropout: 0.1, targetModules: ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'] as LoraConfig['targetModules'] };
  const run = async (be: Backend) => {
    const st = await loadStage(src, be, { layerStart: 0, layerEnd: 2, lora, lossChunk: 20 });
    const rng = new Rng(3);
    for (const p of st.params) rng.fillNormal(p.data, 0, 0.2);
    const mb = collate(packExamples([5, 9, 3, 7].map((n, i) => example(n, i, cfg.vocabSize)), 12), 0);
    const grads = st.newGrads();
    const f = await st.forward({ key: 'p', batch: 1, seqLen: mb.seqLen, ids: mb.ids, labels: mb.labels, segments: mb.segments, dropoutSeed: 4 });
    await st.backward('p', grads, { lossScale: 1 / f.tokens! });
    st.dispose();
    return { loss: f.lossSum!, grads };
  };
  const h = await run(native), d = await run(backend);
  assert.equal(d.loss, h.loss);
  for (let i = 0; i < h.grads.length; i++) assert.deepEqual(d.grads[i], h.grads[i], `grad ${i}`);
  assert.ok(h.grads.some((g) => g.some((v) => v !== 0)));
  assert.equal(sim.live(), 0, `buffers still held: ${sim.live()}`);
});
