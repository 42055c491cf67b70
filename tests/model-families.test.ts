// The families beyond Llama (issue 18): Qwen3 (q_norm / k_norm per head before RoPE, explicit head_dim, tied
// or untied) against the independent float64 reference of tests/hf-reference.ts, written from transformers'
// modeling equations: logits on the float64 RefBackend and the native CPU backend, LoRA and input gradients
// against central finite differences of the reference's loss, and a format-faithful model dir (real
// config.json keys, safetensors with the family's key names, the real Qwen3 tokenizer) through openModelDir,
// plan and merge.
//
// Sizes: hidden 32 (head_dim 16 ≠ hidden/heads), 2 layers, vocab 61; the model dir uses the real vocabulary
// (151,936 rows, hidden 16) so the tokenizer's ids are in range. The file runs in a few seconds.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBackend } from '../engine/backends/index.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { writeAdapter } from '../engine/formats/peft.ts';
import { mergeAdapter } from '../engine/tasks/merge.ts';
import { loadStage } from '../engine/model/load.ts';
import { logits } from '../engine/model/decode.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { baseParamCount, stageMemoryBytes } from '../engine/train/plan.ts';
import type { Backend } from '../engine/backend.ts';
import type { LlamaConfig, LoraConfig } from '../engine/types.ts';
import { hfLogits, hfLossSum, nf4ToF64 } from './hf-reference.ts';
import { checkStageGradients, maxRel, randomIds, randomize, shifted } from './family-checks.ts';
import { qwen3Json, writeQwen3Dir } from './family-dirs.ts';

registerBuiltinBackends();
const ref = new RefBackend();
const native: Backend = await createBackend('cpu');
after(() => native.dispose());

const ALL: LoraConfig['targetModules'] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const lora = (over: Partial<LoraConfig> = {}): LoraConfig => ({ r: 2, loraAlpha: 4, loraDropout: 0, targetModules: ALL, useRslora: false, initLoraWeights: true, ...over });


for (const [name, json] of [
  ['Qwen3 (untied)', qwen3Json()],
  ['Qwen3 (tied, attention_bias)', qwen3Json({ tie_word_embeddings: true, attention_bias: true })],
] as const) {
  test(`${name}: logits and loss on the ref and native backends match the float64 HF reference`, async () => {
    const cfg = parseLlamaConfig(json);
    assert.equal(cfg.headDim, 16);
    const src = randomWeightSource(cfg, 11);
    assert.ok(src.has('model.layers.1.self_attn.q_norm.weight') && src.has('model.layers.1.self_attn.k_norm.weight'));
    const B = 2, S = 7;
    const ids = randomIds(B * S, cfg.vocabSize, 5);
    for (const be of [ref, native]) {
      const stage = await loadStage(src, be, { layerStart: 0, layerEnd: 2, lora: lora({ r: 4, loraAlpha: 8 }), lossChunk: 10 });
      randomize(stage, 3, 0.2);
      const want = await hfLogits(src, { ids, B, S }, { params: stage.params, scaling: 2 });
      const got = await logits(stage, ids, B, S);
      // float32 activations between the ops (float64 accumulation on ref, float32 on native): ~1e-6 per op, dozens deep
      const rel = maxRel(got, want);
      assert.ok(rel <= (be === ref ? 1e-5 : 1e-4), `${be.name}: max relative logit difference ${rel}`);
      const labels = shifted(ids, B, S);
      const fw = await stage.forward({ key: 'e', batch: B, seqLen: S, ids, labels }, { train: false });
      const lossRef = hfLossSum(want, labels, cfg.vocabSize);
      assert.ok(Math.abs(fw.lossSum! - lossRef) <= 1e-4 * lossRef, `${be.name}: lossSum ${fw.lossSum} vs ${lossRef}`);
      stage.dispose();
    }
    // the q/k norms matter: the same weights read as Llama give other logits
    const asLlama = await hfLogits({ ...src, config: { ...cfg, raw: { ...cfg.raw, model_type: 'llama' } } }, { ids, B, S });
    assert.ok(maxRel(asLlama, await hfLogits(src, { ids, B, S })) > 1e-2, 'q_norm / k_norm change the output');
  });
}

test('Qwen3: LoRA and input gradients match central finite differences of the float64 HF reference loss', async () => {
  const cfg = parseLlamaConfig(qwen3Json({ hidden_size: 16, head_dim: 8, intermediate_size: 24, vocab_size: 11 }));
  await checkStageGradients(cfg, lora(), hfLogits, { S: 3, probes: 4 });
});

test('Qwen3 model dir (real keys, real tokenizer): opens without unused tensors, matches the reference, merges to the same keys', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'qwen3-dir-'));
  try {
    const json = qwen3Json({ hidden_size: 16, head_dim: 8, intermediate_size: 32, vocab_size: 151936, tie_word_embeddings: true });
    await writeQwen3Dir(join(dir, 'm'), json);
    const warnings: string[] = [];
    const warn = (l: string) => { warnings.push(l); };
    const md = await openModelDir(join(dir, 'm'), { warn });
    assert.equal(warnings.length, 0, warnings.join('\n'));
    assert.deepEqual(md.unusedTensors, []);
    const ids = Int32Array.from(md.tokenizer!.encode('Qwen3 normalizes each head before rotating it.', { addSpecialTokens: true }));
    const S = ids.length;
    const stage = await loadStage(md.weights, native, { layerStart: 0, layerEnd: 2, lora: lora({ r: 2, targetModules: ['q_proj', 'k_proj'] }) });
    randomize(stage, 5, 0.2);
    const want = await hfLogits(md.weights, { ids, B: 1, S }, { params: stage.params, scaling: 2 });
    const rel = maxRel(await logits(stage, ids, 1, S), want);
    assert.ok(rel <= 1e-4, `max relative logit difference ${rel}`);
    // merge writes the checkpoint transformers loads: the same keys (q_norm / k_norm included), no lm_head when tied
    await writeAdapter(join(dir, 'a'), { lora: lora({ r: 2, targetModules: ['q_proj', 'k_proj'] }), tensors: stage.params, baseModel: 'qwen3' });
    await md.close();
    await mergeAdapter({ model: join(dir, 'm'), adapter: join(dir, 'a'), out: join(dir, 'merged'), dtype: 'f32', backend: native });
    const inKeys = [...(await SafetensorsFile.open(join(dir, 'm', 'model.safetensors'))).names()].sort();
    const merged = await SafetensorsFile.open(join(dir, 'merged', 'model.safetensors'));
    assert.deepEqual([...merged.names()].sort(), inKeys);
    assert.equal(JSON.parse(await readFile(join(dir, 'merged', 'config.json'), 'utf8')).model_type, 'qwen3');
    // merged linear = dequant(NF4 base) + scaling · B · A, computed here in float64; the norms copied as they were
    const md2 = await openModelDir(join(dir, 'merged'), { warn });
    const base = await openModelDir(join(dir, 'm'), { warn });
    for (const [l, m] of [[0, 'q_proj'], [1, 'k_proj']] as const) {
      const key = `model.layers.${l}.self_attn.${m}.weight`;
      const W = nf4ToF64(await base.weights.getNF4(key));
      const A = stage.params.find((p) => p.name === `base_model.model.model.layers.${l}.self_attn.${m}.lora_A.weight`)!;
      const Bt = stage.params.find((p) => p.name === `base_model.model.model.layers.${l}.self_attn.${m}.lora_B.weight`)!;
      const [out, inF] = [Bt.shape[0], A.shape[1]];
      const got = await md2.weights.getFloat(key);
      for (let o = 0; o < out; o++) {
        for (let i = 0; i < inF; i++) {
          let ba = 0;
          for (let r = 0; r < 2; r++) ba += Bt.data[o * 2 + r] * A.data[r * inF + i];
          const w = W[o * inF + i] + 2 * ba;
          assert.ok(Math.abs(got[o * inF + i] - w) <= 1e-6 * Math.max(1, Math.abs(w)), `${key}[${o}, ${i}] = ${got[o * inF + i]}, want ${w}`);
        }
      }
    }
    for (const n of ['model.layers.1.self_attn.q_norm.weight', 'model.layers.0.self_attn.k_norm.weight']) {
      assert.deepEqual(await md2.weights.getFloat(n), await base.weights.getFloat(n), n);
    }
    await md2.close();
    await base.close();
    stage.dispose();
    assert.equal(warnings.length, 0, warnings.join('\n'));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('plan: Qwen3-0.6B has 596,049,920 parameters (q/k norms counted) and its norms in the stage memory', () => {
  const cfg: LlamaConfig = parseLlamaConfig({
    ...qwen3Json(), hidden_size: 1024, intermediate_size: 3072, num_hidden_layers: 28, num_attention_heads: 16, num_key_value_heads: 8,
    head_dim: 128, vocab_size: 151936, tie_word_embeddings: true,
  });
  // 28 layers × (15,728,640 linear + 2·1024 + 2·128 norm) + 151,936·1024 embedding + 1024 final norm
  assert.equal(baseParamCount(cfg), 596_049_920);
  const m = stageMemoryBytes(cfg, { layerStart: 0, layerEnd: 28, lora: { r: 16, targetModules: ALL }, microBatch: 1, seqLen: 512, optim: 'adamw_torch' });
  assert.equal(m.normsBytes, 4 * (28 * (2 * 1024 + 2 * 128) + 1024));
});

test('config: Qwen3 defaults and the families still refused name themselves', () => {
  const { head_dim: _h, ...noHead } = qwen3Json();
  assert.equal(parseLlamaConfig(noHead).headDim, 128, 'Qwen3Config defaults head_dim to 128');
  assert.throws(() => parseLlamaConfig(qwen3Json({ use_sliding_window: true }), 'q/config.json'), /q\/config.json: "use_sliding_window": true is not supported/);
  assert.throws(() => parseLlamaConfig(qwen3Json({ layer_types: ['full_attention', 'sliding_attention'] })), /"layer_types" has \["sliding_attention"\]/);
  for (const [t, what] of [['gemma3', 'Gemma-3 \\(multimodal\\)']]) {
    assert.throws(() => parseLlamaConfig(qwen3Json({ model_type: t }), 'x/config.json'), (e: Error) => e.name === 'ConfigError' && new RegExp(`x/config.json: "model_type" "${t}" \\(${what}\\) is not supported yet`).test(e.message));
  }
});
