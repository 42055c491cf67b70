// Gemma-2 and Gemma-3 text (issue 18) against the independent float64 reference of tests/hf-reference-gemma.ts, written
// from transformers' modeling_gemma2.py / modeling_gemma3.py: logits on the float64 RefBackend and the native CPU
// backend (sliding windows shorter than the sequence, soft-caps that bite, query_pre_attn_scalar ≠ head_dim, Gemma-3's
// local rope base and linear rope scaling), LoRA and input gradients against central finite differences of the
// reference's loss, a format-faithful Gemma-3 model dir (real config keys, the real tokenizer) through openModelDir,
// merge and plan.
//
// Sizes: hidden 32, head_dim 16 (≠ hidden / heads), 2-3 layers, vocab 61; the model dir uses the real vocabulary
// (262,144 rows, hidden 16). The file runs in seconds.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, copyFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBackend } from '../engine/backends/index.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { parseLlamaConfig, configToJson } from '../engine/formats/config.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { encodeFromFloat32 } from '../engine/formats/safetensors/convert.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { writeAdapter } from '../engine/formats/peft.ts';
import { mergeAdapter } from '../engine/tasks/merge.ts';
import { loadStage } from '../engine/model/load.ts';
import { createDecoder, logits } from '../engine/model/decode.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { layerFloatName, layerFloatTensors } from '../engine/model/arch.ts';
import { baseParamCount, stageMemoryBytes } from '../engine/train/plan.ts';
import type { Backend } from '../engine/backend.ts';
import type { LoraConfig, WeightSource } from '../engine/types.ts';
import { hfLossSum, nf4ToF64 } from './hf-reference.ts';
import { checkStageGradients, maxRel, randomIds, randomize, shifted } from './family-checks.ts';
import { hfGemmaLogits, hfGemmaSliding } from './hf-reference-gemma.ts';

registerBuiltinBackends();
const ref = new RefBackend();
const native: Backend = await createBackend('cpu');
after(() => native.dispose());

const ALL: LoraConfig['targetModules'] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const lora = (over: Partial<LoraConfig> = {}): LoraConfig => ({ r: 2, loraAlpha: 4, loraDropout: 0, targetModules: ALL, useRslora: false, initLoraWeights: true, ...over });

/** gemma-2-2b's config.json, shrunk (head_dim 16 while hidden / heads = 8; a 3-token window) */
export function gemma2Json(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    architectures: ['Gemma2ForCausalLM'], attention_bias: false, attention_dropout: 0.0, attn_logit_softcapping: 50.0, bos_token_id: 2,
    cache_implementation: 'hybrid', eos_token_id: [1, 107], final_logit_softcapping: 30.0, head_dim: 16, hidden_act: 'gelu_pytorch_tanh',
    hidden_activation: 'gelu_pytorch_tanh', hidden_size: 32, initializer_range: 0.02, intermediate_size: 48, max_position_embeddings: 8192,
    model_type: 'gemma2', num_attention_heads: 4, num_hidden_layers: 2, num_key_value_heads: 2, pad_token_id: 0, query_pre_attn_scalar: 24,
    rms_norm_eps: 1e-6, rope_theta: 10000.0, sliding_window: 3, torch_dtype: 'bfloat16', transformers_version: '4.42.4', use_cache: true,
    vocab_size: 61, ...over,
  };
}

/** gemma-3-1b-pt's config.json, shrunk (layers 0, 1 sliding, 2 global) */
export function gemma3Json(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    architectures: ['Gemma3ForCausalLM'], attention_bias: false, attention_dropout: 0.0, attn_logit_softcapping: null, bos_token_id: 2,
    cache_implementation: 'hybrid', eos_token_id: [1, 106], final_logit_softcapping: null, head_dim: 16, hidden_activation: 'gelu_pytorch_tanh',
    hidden_size: 32, initializer_range: 0.02, intermediate_size: 48, max_position_embeddings: 32768, model_type: 'gemma3_text',
    num_attention_heads: 4, num_hidden_layers: 3, num_key_value_heads: 1, pad_token_id: 0, query_pre_attn_scalar: 24, rms_norm_eps: 1e-6,
    rope_local_base_freq: 10000, rope_scaling: null, rope_theta: 1000000, sliding_window: 3, sliding_window_pattern: 3,
    torch_dtype: 'bfloat16', transformers_version: '4.50.0.dev0', use_cache: true, vocab_size: 61, ...over,
  };
}


const CASES = [
  ['Gemma-2 (default caps 50 / 30)', gemma2Json()],
  ['Gemma-2 (caps that bite: attention 1.5, final 4)', gemma2Json({ attn_logit_softcapping: 1.5, final_logit_softcapping: 4.0 })],
  ['Gemma-3', gemma3Json()],
  ['Gemma-3 (linear rope scaling 8, attention cap 2, untied)', gemma3Json({ rope_scaling: { factor: 8.0, rope_type: 'linear' }, attn_logit_softcapping: 2.0, tie_word_embeddings: false })],
  ['Gemma-3 (layer_types, rope_parameters per layer type)', gemma3Json({
    layer_types: ['full_attention', 'sliding_attention', 'sliding_attention'], sliding_window_pattern: undefined, rope_theta: undefined, rope_local_base_freq: undefined,
    rope_parameters: { full_attention: { rope_type: 'default', rope_theta: 1000000.0 }, sliding_attention: { rope_type: 'default', rope_theta: 10000.0 } },
  })],
] as const;

for (const [name, json] of CASES) {
  test(`${name}: logits and loss on the ref and native backends match the float64 HF reference`, async () => {
    const cfg = parseLlamaConfig(JSON.parse(JSON.stringify(json)));
    const src = randomWeightSource(cfg, 11);
    for (const n of ['pre_feedforward_layernorm', 'post_feedforward_layernorm', 'post_attention_layernorm']) assert.ok(src.has(`model.layers.1.${n}.weight`), n);
    const B = 2, S = 7;
    const ids = randomIds(B * S, cfg.vocabSize, 5);
    let last: Float32Array | null = null;
    for (const be of [ref, native]) {
      const stage = await loadStage(src, be, { layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: lora({ r: 4, loraAlpha: 8 }), lossChunk: 10 });
      randomize(stage, 3, 0.2);
      const want = await hfGemmaLogits(src, { ids, B, S }, { params: stage.params, scaling: 2 });
      const got = await logits(stage, ids, B, S);
      // float32 activations between the ops (float64 accumulation on ref, float32 on native): ~1e-6 per op, dozens deep
      const rel = maxRel(got, want);
      assert.ok(rel <= (be === ref ? 1e-5 : 1e-4), `${be.name}: max relative logit difference ${rel}`);
      const labels = shifted(ids, B, S);
      const fw = await stage.forward({ key: 'e', batch: B, seqLen: S, ids, labels }, { train: false });
      const lossRef = hfLossSum(want, labels, cfg.vocabSize);
      assert.ok(Math.abs(fw.lossSum! - lossRef) <= 1e-4 * lossRef, `${be.name}: lossSum ${fw.lossSum} vs ${lossRef}`);
      // KV-cache decoding (sliding windows and caps in the cached attention) gives the full pass's last logits
      const dec = createDecoder(stage, S);
      let step: Float32Array = new Float32Array(0);
      step = await dec.append(ids.subarray(0, 3));
      for (let s = 3; s < S; s++) step = await dec.append(ids.subarray(s, s + 1));
      const V = cfg.vocabSize;
      assert.ok(maxRel(step, want.subarray((S - 1) * V, S * V)) <= 1e-4, `${be.name}: decoded logits differ from the full pass`);
      last = got;
      stage.dispose();
    }
    assert.ok(last);
  });
}

test('Gemma: each of its differences from Llama changes the reference output (the tests above would see it missing)', async () => {
  const base = gemma2Json({ attn_logit_softcapping: 1.5, final_logit_softcapping: 4.0 });
  const cfg = parseLlamaConfig(base);
  const src = randomWeightSource(cfg, 11);
  const B = 1, S = 7;
  const ids = randomIds(S, cfg.vocabSize, 5);
  const want = await hfGemmaLogits(src, { ids, B, S });
  for (const over of [{ attn_logit_softcapping: null }, { final_logit_softcapping: null }, { sliding_window: 100 }, { query_pre_attn_scalar: 16 }]) {
    const other = await hfGemmaLogits({ ...src, config: { ...cfg, raw: { ...cfg.raw, ...over } } }, { ids, B, S });
    assert.ok(maxRel(other, want) > 1e-3, `${JSON.stringify(over)} changes the logits`);
  }
  const g3 = parseLlamaConfig(gemma3Json());
  const src3 = randomWeightSource(g3, 11);
  const want3 = await hfGemmaLogits(src3, { ids, B, S });
  for (const over of [{ rope_local_base_freq: 1000000 }, { sliding_window_pattern: 1000 }]) {
    const other = await hfGemmaLogits({ ...src3, config: { ...g3, raw: { ...g3.raw, ...over } } }, { ids, B, S });
    assert.ok(maxRel(other, want3) > 1e-3, `${JSON.stringify(over)} changes the logits`);
  }
});

for (const [name, json] of [
  ['Gemma-2', gemma2Json({ hidden_size: 16, head_dim: 8, intermediate_size: 24, vocab_size: 11, attn_logit_softcapping: 1.5, final_logit_softcapping: 4.0, sliding_window: 2 })],
  ['Gemma-3', gemma3Json({ hidden_size: 16, head_dim: 8, intermediate_size: 24, vocab_size: 11, sliding_window: 2, sliding_window_pattern: 2, num_hidden_layers: 2, attn_logit_softcapping: 2.0, rope_scaling: { factor: 4.0, rope_type: 'linear' } })],
] as const) {
  test(`${name}: LoRA and input gradients match central finite differences of the float64 HF reference loss`, async () => {
    const cfg = parseLlamaConfig(json);
    const { whole, tail } = await checkStageGradients(cfg, lora(), hfGemmaLogits, { S: 4, probes: 3 });
    whole.dispose();
    tail.dispose();
  });
}

test('Gemma: the native backend\'s gradients equal the float64 reference backend\'s', async () => {
  for (const json of [gemma2Json({ attn_logit_softcapping: 1.5, final_logit_softcapping: 4.0 }), gemma3Json({ attn_logit_softcapping: 2.0 })]) {
    const cfg = parseLlamaConfig(json);
    const src = randomWeightSource(cfg, 31);
    const B = 2, S = 9;
    const ids = randomIds(B * S, cfg.vocabSize, 2);
    const labels = shifted(ids, B, S);
    const out: Float32Array[][] = [];
    for (const be of [ref, native]) {
      const st = await loadStage(src, be, { layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: lora(), lossChunk: 16 });
      randomize(st, 4);
      const g = st.newGrads();
      await st.forward({ key: 'k', batch: B, seqLen: S, ids, labels });
      await st.backward('k', g, { lossScale: 1 });
      out.push(g);
      st.dispose();
    }
    for (let p = 0; p < out[0].length; p++) {
      const rel = maxRel(out[1][p], out[0][p]);
      // float32 accumulation on native vs float64 on ref through ~30 ops
      assert.ok(rel <= 1e-3, `${cfg.modelType} grad ${p}: native vs ref max relative difference ${rel}`);
    }
  }
});

const GEMMA3_TOK = join(import.meta.dirname, '..', 'node_modules', '@lenml', 'tokenizer-gemma3', 'models');

/** A Gemma-3 model dir as save_pretrained writes it: config.json, bf16 model.safetensors with the real key names, the
 *  real tokenizer files; weights from a seeded random source (linears stored as their NF4 values). */
async function writeGemmaDir(dir: string, json: Record<string, unknown>): Promise<WeightSource> {
  const cfg = parseLlamaConfig(json);
  const src = randomWeightSource(cfg, 3);
  const names: string[] = ['model.embed_tokens.weight', 'model.norm.weight'];
  if (!cfg.tieWordEmbeddings) names.push('lm_head.weight');
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const n of ['input_layernorm', 'post_attention_layernorm', 'pre_feedforward_layernorm', 'post_feedforward_layernorm', 'self_attn.q_norm', 'self_attn.k_norm']) names.push(`model.layers.${l}.${n}.weight`);
    for (const m of ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']) names.push(`model.layers.${l}.${m}.weight`);
  }
  // the engine's list of layer norms is the checkpoint's
  assert.deepEqual(layerFloatTensors(cfg).map((t) => layerFloatName(0, t)).sort(), names.filter((n) => n.startsWith('model.layers.0.') && n.includes('norm')).sort());
  const tensors = [];
  for (const name of names) {
    let data: Float32Array, shape: number[];
    if (name.endsWith('_proj.weight')) {
      const w = await src.getNF4(name);
      data = Float32Array.from(nf4ToF64(w));
      shape = [w.rows, w.cols];
    } else {
      data = await src.getFloat(name);
      shape = name.endsWith('norm.weight') ? [data.length] : [cfg.vocabSize, cfg.hiddenSize];
    }
    tensors.push({ name, dtype: 'BF16' as const, shape, data: encodeFromFloat32('BF16', data) });
  }
  await writeSafetensors(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  await writeFile(join(dir, 'config.json'), configToJson(json));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) await copyFile(join(GEMMA3_TOK, f), join(dir, f));
  return src;
}

test('Gemma-3 model dir (real keys, real tokenizer and chat template): opens without unused tensors, matches the reference, merges to the same keys', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'gemma3-dir-'));
  try {
    const json = gemma3Json({ hidden_size: 16, head_dim: 8, intermediate_size: 32, vocab_size: 262144, num_hidden_layers: 2, sliding_window: 4, sliding_window_pattern: 2 });
    await writeGemmaDir(join(dir, 'm'), json);
    const warnings: string[] = [];
    const warn = (l: string) => { warnings.push(l); };
    const md = await openModelDir(join(dir, 'm'), { warn });
    assert.equal(warnings.length, 0, warnings.join('\n'));
    assert.deepEqual(md.unusedTensors, []);
    const tok = md.tokenizer!;
    const ids = Int32Array.from(tok.encode('Gemma scales its embeddings and caps its logits.', { addSpecialTokens: true }));
    assert.equal(ids[0], 2, 'the Gemma tokenizer adds <bos> (id 2)');
    const S = ids.length;
    const stage = await loadStage(md.weights, native, { layerStart: 0, layerEnd: 2, lora: lora({ r: 2, targetModules: ['q_proj', 'down_proj'] }) });
    randomize(stage, 5, 0.2);
    const want = await hfGemmaLogits(md.weights, { ids, B: 1, S }, { params: stage.params, scaling: 2 });
    const rel = maxRel(await logits(stage, ids, 1, S), want);
    assert.ok(rel <= 1e-4, `max relative logit difference ${rel}`);
    await writeAdapter(join(dir, 'a'), { lora: lora({ r: 2, targetModules: ['q_proj', 'down_proj'] }), tensors: stage.params, baseModel: 'gemma3' });
    await md.close();
    await mergeAdapter({ model: join(dir, 'm'), adapter: join(dir, 'a'), out: join(dir, 'merged'), dtype: 'f32', backend: native });
    const inFile = await SafetensorsFile.open(join(dir, 'm', 'model.safetensors'));
    const merged = await SafetensorsFile.open(join(dir, 'merged', 'model.safetensors'));
    assert.deepEqual([...merged.names()].sort(), [...inFile.names()].sort());
    await inFile.close();
    await merged.close();
    assert.equal(JSON.parse(await readFile(join(dir, 'merged', 'config.json'), 'utf8')).model_type, 'gemma3_text');
    // the merged checkpoint stores the norms as Gemma does (w, not 1 + w) and the merged linears
    const md2 = await openModelDir(join(dir, 'merged'), { warn });
    const base = await openModelDir(join(dir, 'm'), { warn });
    for (const n of ['model.layers.1.pre_feedforward_layernorm.weight', 'model.layers.0.self_attn.k_norm.weight', 'model.norm.weight']) {
      assert.deepEqual(await md2.weights.getFloat(n), await base.weights.getFloat(n), n);
    }
    const key = 'model.layers.1.mlp.down_proj.weight';
    const W = nf4ToF64(await base.weights.getNF4(key));
    const A = stage.params.find((p) => p.name === `base_model.model.${key.replace('.weight', '')}.lora_A.weight`)!;
    const Bt = stage.params.find((p) => p.name === `base_model.model.${key.replace('.weight', '')}.lora_B.weight`)!;
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
    await md2.close();
    await base.close();
    stage.dispose();
    assert.equal(warnings.length, 0, warnings.join('\n'));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('plan: Gemma-2-2B has 2,614,341,888 parameters and Gemma-3-1B 999,885,952 (4 norms per layer, q/k norms, tied)', () => {
  const g2 = parseLlamaConfig(gemma2Json({ hidden_size: 2304, intermediate_size: 9216, num_hidden_layers: 26, num_attention_heads: 8, num_key_value_heads: 4, head_dim: 256, vocab_size: 256000, sliding_window: 4096, query_pre_attn_scalar: 256 }));
  // 26 × (77,856,768 linear + 4·2304 norm) + 256,000·2304 embedding + 2304 final norm
  assert.equal(baseParamCount(g2), 2_614_341_888);
  // activations: a layer being recomputed in backward keeps o_proj's and down_proj's outputs before their norms (bf16,
  // twice for the working set), and the soft-capped loss chunk sits beside the raw one (float32)
  const opts = { layerStart: 0, layerEnd: 26, lora: { r: 16, targetModules: ALL }, microBatch: 1, seqLen: 512, optim: 'adamw_torch' } as const;
  const asLlama = stageMemoryBytes({ ...g2, modelType: 'llama' }, opts).activationsBytes;
  assert.equal(stageMemoryBytes(g2, opts).activationsBytes - asLlama, 2 * 512 * 2 * (2 * 2304) + 512 * 4096 * 4);
  const g3 = parseLlamaConfig(gemma3Json({ hidden_size: 1152, intermediate_size: 6912, num_hidden_layers: 26, num_attention_heads: 4, num_key_value_heads: 1, head_dim: 256, vocab_size: 262144, sliding_window: 512, sliding_window_pattern: 6, query_pre_attn_scalar: 256 }));
  assert.equal(baseParamCount(g3), 999_885_952);
  const m = stageMemoryBytes(g3, { layerStart: 0, layerEnd: 26, lora: { r: 16, targetModules: ALL }, microBatch: 1, seqLen: 512, optim: 'adamw_torch' });
  assert.equal(m.normsBytes, 4 * (26 * (4 * 1152 + 2 * 256) + 1152));
});

test('config: Gemma defaults, sliding patterns and clear refusals', () => {
  const { head_dim: _h, ...noHead } = gemma2Json();
  const c2 = parseLlamaConfig(noHead);
  assert.equal(c2.headDim, 256, 'Gemma2Config defaults head_dim to 256');
  assert.equal(c2.tieWordEmbeddings, true);
  assert.deepEqual(Array.from({ length: 4 }, (_, l) => hfGemmaSliding({ model_type: 'gemma2' }, l)), [true, false, true, false]);
  assert.deepEqual(Array.from({ length: 7 }, (_, l) => hfGemmaSliding({ model_type: 'gemma3_text' }, l)), [true, true, true, true, true, false, true]);
  assert.equal(parseLlamaConfig(gemma3Json({ rope_theta: undefined })).ropeTheta, 1_000_000);
  assert.throws(() => parseLlamaConfig(gemma2Json({ hidden_activation: 'gelu' }), 'g/config.json'), /g\/config.json: "hidden_activation" must be "gelu_pytorch_tanh"/);
  assert.throws(() => parseLlamaConfig(gemma3Json({ layer_types: ['full_attention'] }), 'g/config.json'), /g\/config.json: "layer_types" must be a list of 3/);
  assert.throws(() => parseLlamaConfig(gemma3Json({ query_pre_attn_scalar: -1 }), 'g/config.json'), (e: Error) => e.name === 'ConfigError' && /"query_pre_attn_scalar" must be a positive number/.test(e.message));
  assert.throws(() => parseLlamaConfig(gemma3Json({ model_type: 'gemma3' }), 'x/config.json'), /"gemma3" \(Gemma-3 \(multimodal\)\) is not supported yet/);
});
