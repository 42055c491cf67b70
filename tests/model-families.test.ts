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
import { Rng } from '../engine/model/rng.ts';
import { baseParamCount, stageMemoryBytes } from '../engine/train/plan.ts';
import type { Backend } from '../engine/backend.ts';
import type { LlamaConfig, LoraConfig, Stage } from '../engine/types.ts';
import { hfLogits, hfLossSum, nf4ToF64 } from './hf-reference.ts';
import { qwen3Json, writeQwen3Dir } from './family-dirs.ts';

registerBuiltinBackends();
const ref = new RefBackend();
const native: Backend = await createBackend('cpu');
after(() => native.dispose());

const ALL: LoraConfig['targetModules'] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const lora = (over: Partial<LoraConfig> = {}): LoraConfig => ({ r: 2, loraAlpha: 4, loraDropout: 0, targetModules: ALL, useRslora: false, initLoraWeights: true, ...over });

function randomize(stage: Stage, seed: number, scale = 0.3): void {
  const rng = new Rng(seed);
  for (const p of stage.params) rng.fillNormal(p.data, 0, scale);
}
const randomIds = (n: number, V: number, seed: number) => { const r = new Rng(seed); return Int32Array.from({ length: n }, () => r.nextU32() % V); };
function shifted(ids: Int32Array, B: number, S: number): Int32Array {
  const labels = new Int32Array(B * S).fill(-100);
  for (let b = 0; b < B; b++) for (let s = 0; s + 1 < S; s++) labels[b * S + s] = ids[b * S + s + 1];
  return labels;
}
function maxRel(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let d = 0, scale = 0;
  for (let i = 0; i < want.length; i++) { d = Math.max(d, Math.abs(got[i] - want[i])); scale = Math.max(scale, Math.abs(want[i])); }
  return d / Math.max(1, scale);
}

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
  const src = randomWeightSource(cfg, 21);
  const whole = await loadStage(src, ref, { layerStart: 0, layerEnd: 2, lora: lora(), lossChunk: 4 });
  const tail = await loadStage(src, ref, { layerStart: 1, layerEnd: 2, lora: lora(), lossChunk: 4 });
  randomize(whole, 8);
  randomize(tail, 9);
  const B = 2, S = 3, lossScale = 0.5;
  const ids = randomIds(B * S, cfg.vocabSize, 1);
  const labels = shifted(ids, B, S);
  const grads = whole.newGrads();
  await whole.forward({ key: 'k', batch: B, seqLen: S, ids, labels });
  await whole.backward('k', grads, { lossScale });
  const hidden = new Rng(4).fillNormal(new Float32Array(B * S * cfg.hiddenSize), 0, 1);
  const tgrads = tail.newGrads();
  await tail.forward({ key: 'k', batch: B, seqLen: S, hidden, labels });
  const { gradIn } = await tail.backward('k', tgrads, { lossScale });
  // the reference loss is float64 throughout, so a small step is accurate: truncation O(eps²) ~1e-8, rounding
  // ~1e-16/eps; what remains is the engine's float32 activations (~1e-6 relative), hence 1e-4 + 0.5%
  const eps = 1e-4;
  const loss = async (params: Stage['params'], input: { ids?: Int32Array; hidden?: Float64Array; fromLayer?: number }) =>
    hfLossSum(await hfLogits(src, { ...input, B, S }, { params, scaling: 2 }), labels, cfg.vocabSize) * lossScale;
  let checked = 0, nonzero = 0;
  const fd = async (what: string, buf: Float64Array | Float32Array, analytic: ArrayLike<number>, f: () => Promise<number>) => {
    const rng = new Rng(what.length, buf.length);
    for (let n = 0; n < 4; n++) {
      const i = rng.nextU32() % buf.length;
      const old = buf[i];
      buf[i] = old + eps; const lp = await f();
      buf[i] = old - eps; const lm = await f();
      buf[i] = old;
      const g = (lp - lm) / (2 * eps);
      checked++;
      if (Math.abs(g) > 1e-3) nonzero++;
      assert.ok(Math.abs(g - analytic[i]) <= 1e-4 + 5e-3 * Math.abs(g), `${what}[${i}]: finite difference ${g} vs analytic ${analytic[i]}`);
    }
  };
  // float64 copies of the LoRA tensors, so the perturbation is exact
  const f64 = (st: Stage) => st.params.map((p) => ({ ...p, data: Float64Array.from(p.data) as unknown as Float32Array }));
  const wp = f64(whole), tp = f64(tail);
  for (let p = 0; p < wp.length; p++) await fd(wp[p].name, wp[p].data, grads[p], () => loss(wp, { ids }));
  const h64 = Float64Array.from(hidden);
  for (let p = 0; p < tp.length; p++) await fd(`tail ${tp[p].name}`, tp[p].data, tgrads[p], () => loss(tp, { hidden: h64, fromLayer: 1 }));
  await fd('gradIn', h64, gradIn!, () => loss(tp, { hidden: h64, fromLayer: 1 }));
  assert.ok(nonzero > checked / 2, `only ${nonzero} of ${checked} checked gradients were non-negligible`);
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
  for (const [t, what] of [['gemma3', 'Gemma-3 \\(multimodal\\)'], ['phi3', 'Phi-3']]) {
    assert.throws(() => parseLlamaConfig(qwen3Json({ model_type: t }), 'x/config.json'), (e: Error) => e.name === 'ConfigError' && new RegExp(`x/config.json: "model_type" "${t}" \\(${what}\\) is not supported yet`).test(e.message));
  }
});
