// Stage tests on the float64-internal RefBackend: logits vs the float64 reference, finite-difference gradients,
// stage splits, checkpointing on/off, interleaved micro-batches, KV-cache generation.
//
// Sizes: the FD model (hidden 16, 2 layers, T = 6) keeps ~900 forwards under a few seconds; the reference
// model (hidden 64, 4/2 heads, vocab 97) is the size the brief names and still runs in well under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RefBackend } from '../engine/backends/ref.ts';
import { createDecoder, logits } from '../engine/model/decode.ts';
import { loadStage } from '../engine/model/load.ts';
import { generate, argmax } from '../engine/model/generate.ts';
import { referenceLogits, referenceLoss } from '../engine/model/reference.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { loraScaling } from '../engine/model/lora.ts';
import { Rng } from '../engine/model/rng.ts';
import type { LlamaConfig, LoraConfig, Stage, WeightSource } from '../engine/types.ts';

const backend = new RefBackend();

const ALL: LoraConfig['targetModules'] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const loraCfg = (over: Partial<LoraConfig> = {}): LoraConfig => ({
  r: 2, loraAlpha: 4, loraDropout: 0, targetModules: ALL, useRslora: false, initLoraWeights: true, ...over,
});

/** give every LoRA tensor (B included) random values in place so all gradient paths are non-trivial */
function randomizeParams(stage: Stage, seed: number, scale = 0.3): void {
  const rng = new Rng(seed);
  for (const p of stage.params) rng.fillNormal(p.data, 0, scale);
}

function randomIds(n: number, V: number, seed: number): Int32Array {
  const rng = new Rng(seed);
  return Int32Array.from({ length: n }, () => rng.nextU32() % V);
}

function shiftedLabels(ids: Int32Array, B: number, S: number, ignoreEvery = 0): Int32Array {
  const labels = new Int32Array(B * S).fill(-100);
  for (let b = 0; b < B; b++) for (let s = 0; s + 1 < S; s++) labels[b * S + s] = ids[b * S + s + 1];
  if (ignoreEvery > 0) for (let t = 0; t < labels.length; t += ignoreEvery) labels[t] = -100;
  return labels;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): { diff: number; at: number; scale: number } {
  assert.equal(a.length, b.length);
  let diff = 0, at = -1, scale = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    scale = Math.max(scale, Math.abs(b[i]));
    if (d > diff) { diff = d; at = i; }
  }
  return { diff, at, scale };
}

/** the source with embeddings and lm_head rounded to bfloat16, as HF checkpoints store them */
function bf16Vocab(src: WeightSource): WeightSource {
  const cache = new Map<string, Float32Array>();
  return {
    config: src.config, has: (n) => src.has(n), getNF4: (n) => src.getNF4(n),
    async getFloat(n) {
      const t = await src.getFloat(n);
      if (n !== 'model.embed_tokens.weight' && n !== 'lm_head.weight') return t;
      if (!cache.has(n)) {
        const r = new Float32Array(t);
        const bits = new Uint32Array(r.buffer);
        for (let i = 0; i < bits.length; i++) bits[i] = (bits[i] + 0x7fff + ((bits[i] >>> 16) & 1)) & 0xffff0000;
        cache.set(n, r);
      }
      return cache.get(n)!;
    },
  };
}

async function wholeModelCase(name: string, cfg: LlamaConfig, bf16 = false) {
  test(`logits and loss of a random ${name} model match the float64 reference`, async () => {
    const src = bf16 ? bf16Vocab(randomWeightSource(cfg, 11)) : randomWeightSource(cfg, 11);
    // lossChunk 10 < V = 97: ten vocabulary chunks, the last one partial
    const stage = await loadStage(src, backend, { layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: loraCfg({ r: 4, loraAlpha: 8 }), lossChunk: 10 });
    randomizeParams(stage, 3, 0.2);
    const B = 2, S = 7;
    const ids = randomIds(B * S, cfg.vocabSize, 5);
    const got = await logits(stage, ids, B, S);
    const want = await referenceLogits(src, ids, B, S, { params: stage.params, scaling: loraScaling(loraCfg({ r: 4, loraAlpha: 8 })) });
    const { diff, at, scale } = maxAbsDiff(got, want);
    // float32 activations between float64-accumulated ops: ~1e-6 relative per op, a few dozen ops deep
    assert.ok(diff <= 1e-4 * Math.max(1, scale), `max |logit diff| ${diff} at ${at} (scale ${scale})`);
    const labels = shiftedLabels(ids, B, S, 5);
    const fw = await stage.forward({ key: 'eval', batch: B, seqLen: S, ids, labels }, { train: false });
    const ref = referenceLoss(want, labels, cfg.vocabSize);
    assert.equal(fw.tokens, ref.tokens);
    assert.ok(Math.abs(fw.lossSum! - ref.lossSum) <= 1e-5 * ref.lossSum, `lossSum ${fw.lossSum} vs ${ref.lossSum}`);
    stage.dispose();
  });
}

wholeModelCase('GQA llama (untied)', tinyLlamaConfig());
wholeModelCase('GQA llama (tied embeddings)', tinyLlamaConfig({ tieWordEmbeddings: true }));
wholeModelCase('qwen2 (q/k/v bias, tied)', tinyLlamaConfig({ modelType: 'qwen2', attentionBias: true, tieWordEmbeddings: true }));
// bf16-exact embeddings / lm_head are held as bf16 (half the memory) and decoded per vocabulary chunk
wholeModelCase('GQA llama with bf16 embeddings and lm_head (untied)', tinyLlamaConfig(), true);
wholeModelCase('GQA llama with bf16 tied embeddings', tinyLlamaConfig({ tieWordEmbeddings: true }), true);
wholeModelCase('llama3-rope MHA', tinyLlamaConfig({
  numKeyValueHeads: 4,
  ropeScaling: { ropeType: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 32 },
}));

const fdCfg = tinyLlamaConfig({ hiddenSize: 16, intermediateSize: 24, numAttentionHeads: 4, numKeyValueHeads: 2, vocabSize: 11 });

async function lossOf(stages: Stage[], ids: Int32Array, labels: Int32Array, B: number, S: number, seed: number, hidden?: Float32Array) {
  let h = hidden;
  let out = 0;
  for (const st of stages) {
    const r = await st.forward({ key: 'fd', batch: B, seqLen: S, ids: st.isFirst ? ids : undefined, hidden: st.isFirst ? undefined : h, labels, dropoutSeed: seed });
    st.release('fd');
    h = r.hidden;
    if (st.isLast) out = r.lossSum!;
  }
  return out;
}

for (const dropout of [0, 0.25]) {
  test(`LoRA and input gradients match central finite differences (dropout ${dropout})`, async () => {
    const src = randomWeightSource(fdCfg, 21);
    const lc = loraCfg({ loraDropout: dropout });
    // stage [1,2) fed with a hidden state exercises gradIn; stage [0,2) exercises the first layer's LoRA grads
    // lossChunk 4 with V = 11: chunks of 4, 4, 3 so the chunked cross-entropy backward is checked too
    const whole = await loadStage(src, backend, { layerStart: 0, layerEnd: 2, lora: lc, lossChunk: 4 });
    const tail = await loadStage(src, backend, { layerStart: 1, layerEnd: 2, lora: lc, lossChunk: 4 });
    randomizeParams(whole, 8);
    randomizeParams(tail, 9);
    const B = 2, S = 3, seed = 77;
    const ids = randomIds(B * S, fdCfg.vocabSize, 1);
    const labels = shiftedLabels(ids, B, S);
    const lossScale = 0.5; // backward returns d(lossSum)·lossScale; a non-unit scale checks it is applied
    const grads = whole.newGrads();
    await whole.forward({ key: 'k', batch: B, seqLen: S, ids, labels, dropoutSeed: seed });
    await whole.backward('k', grads, { lossScale });
    const hidden = new Rng(4).fillNormal(new Float32Array(B * S * fdCfg.hiddenSize), 0, 1);
    const tgrads = tail.newGrads();
    await tail.forward({ key: 'k', batch: B, seqLen: S, hidden, labels, dropoutSeed: seed });
    const { gradIn } = await tail.backward('k', tgrads, { lossScale });
    assert.ok(gradIn && gradIn.length === hidden.length);

    // eps 1e-2 in float32 parameters: truncation error O(eps²·f''') ~1e-4; rounding noise of a float32 loss of
    // magnitude ~10 is ~1e-6/eps = 1e-4. Tolerance 3e-3 + 2% leaves a wide margin yet catches a missing
    // scaling factor, a wrong dropout mask or a dropped path (errors of 10–100%).
    const eps = 1e-2;
    const check = async (what: string, buf: Float32Array, analytic: Float32Array, stages: Stage[], hid?: Float32Array) => {
      const rng = new Rng(what.length, buf.length);
      const picks = new Set<number>();
      for (let i = 0; i < Math.min(6, buf.length); i++) picks.add(rng.nextU32() % buf.length);
      let nonzero = 0;
      for (const i of picks) {
        const old = buf[i];
        buf[i] = old + eps;
        const lp = await lossOf(stages, ids, labels, B, S, seed, hid);
        buf[i] = old - eps;
        const lm = await lossOf(stages, ids, labels, B, S, seed, hid);
        buf[i] = old;
        const fd = ((lp - lm) / (2 * eps)) * lossScale;
        const an = analytic[i];
        if (Math.abs(an) > 1e-3) nonzero++;
        assert.ok(Math.abs(fd - an) <= 3e-3 + 0.02 * Math.abs(fd), `${what}[${i}]: finite difference ${fd} vs analytic ${an}`);
      }
      return nonzero;
    };
    let nonzero = 0;
    for (let p = 0; p < whole.params.length; p++) nonzero += await check(whole.params[p].name, whole.params[p].data, grads[p], [whole]);
    for (let p = 0; p < tail.params.length; p++) nonzero += await check(`tail ${tail.params[p].name}`, tail.params[p].data, tgrads[p], [tail], hidden);
    nonzero += await check('gradIn', hidden, gradIn, [tail], hidden);
    // guards against a vacuous pass where everything is ~0
    assert.ok(nonzero > 100, `only ${nonzero} checked gradients were non-negligible`);
  });
}

async function trainStep(stages: Stage[], key: string, ids: Int32Array, labels: Int32Array, B: number, S: number,
  grads: Float32Array[][], lossScale: number, dropoutSeed = 0) {
  let h: Float32Array | undefined;
  let loss = 0;
  for (const st of stages) {
    const r = await st.forward({ key, batch: B, seqLen: S, ids: st.isFirst ? ids : undefined, hidden: h, labels, dropoutSeed });
    h = r.hidden;
    if (st.isLast) loss = r.lossSum!;
  }
  let g: Float32Array | undefined;
  for (let i = stages.length - 1; i >= 0; i--) {
    const r = await stages[i].backward(key, grads[i], stages[i].isLast ? { lossScale } : { gradOut: g });
    g = r.gradIn;
  }
  return loss;
}

test('split stages [0,1)+[1,2) give the same loss and gradients as the whole [0,2) stage, bit for bit', async () => {
  const cfg = tinyLlamaConfig({ hiddenSize: 32, intermediateSize: 48, vocabSize: 53 });
  const src = randomWeightSource(cfg, 2);
  const lc = loraCfg({ loraDropout: 0.1 });
  const whole = await loadStage(src, backend, { layerStart: 0, layerEnd: 2, lora: lc, seed: 5 });
  const s0 = await loadStage(src, backend, { layerStart: 0, layerEnd: 1, lora: lc, seed: 5 });
  const s1 = await loadStage(src, backend, { layerStart: 1, layerEnd: 2, lora: lc, seed: 5 });
  // same seed ⇒ the split stages' init is the whole stage's init, tensor by tensor
  assert.deepEqual([...s0.params, ...s1.params].map((p) => p.name), whole.params.map((p) => p.name));
  [...s0.params, ...s1.params].forEach((p, i) => assert.deepEqual(p.data, whole.params[i].data, p.name));
  randomizeParams(whole, 1);
  [...s0.params, ...s1.params].forEach((p, i) => p.data.set(whole.params[i].data));
  const B = 2, S = 5;
  const ids = randomIds(B * S, cfg.vocabSize, 3);
  const labels = shiftedLabels(ids, B, S);
  const gw = [whole.newGrads()];
  const gs = [s0.newGrads(), s1.newGrads()];
  const lw = await trainStep([whole], 'a', ids, labels, B, S, gw, 1 / 8, 9);
  const ls = await trainStep([s0, s1], 'a', ids, labels, B, S, gs, 1 / 8, 9);
  assert.equal(ls, lw);
  const flat = [...gs[0], ...gs[1]];
  flat.forEach((g, i) => assert.deepEqual(g, gw[0][i], whole.params[i].name));
  assert.ok(gw[0].some((g) => g.some((v) => v !== 0)));
});

test('gradient checkpointing on and off give identical gradients; grads accumulate across micro-batches', async () => {
  const cfg = tinyLlamaConfig({ hiddenSize: 32, intermediateSize: 48, vocabSize: 53, numHiddenLayers: 3 });
  const src = randomWeightSource(cfg, 4);
  const lc = loraCfg({ loraDropout: 0.1 });
  const on = await loadStage(src, backend, { layerStart: 0, layerEnd: 3, lora: lc, gradientCheckpointing: true });
  const off = await loadStage(src, backend, { layerStart: 0, layerEnd: 3, lora: lc, gradientCheckpointing: false });
  randomizeParams(on, 6);
  on.params.forEach((p, i) => off.params[i].data.set(p.data));
  const B = 1, S = 6;
  const ids1 = randomIds(B * S, cfg.vocabSize, 1), ids2 = randomIds(B * S, cfg.vocabSize, 2);
  const gOn = on.newGrads(), gOff = off.newGrads();
  for (const [k, ids] of [['m1', ids1], ['m2', ids2]] as const) {
    await trainStep([on], k, ids, shiftedLabels(ids, B, S), B, S, [gOn], 0.1, 3);
    await trainStep([off], k, ids, shiftedLabels(ids, B, S), B, S, [gOff], 0.1, 3);
  }
  gOn.forEach((g, i) => assert.deepEqual(g, gOff[i], on.params[i].name));
  // accumulation: the two-micro-batch sum differs from the second micro-batch alone
  const gSecond = on.newGrads();
  await trainStep([on], 'm3', ids2, shiftedLabels(ids2, B, S), B, S, [gSecond], 0.1, 3);
  assert.notDeepEqual(gSecond[0], gOn[0]);
});

test('two micro-batch keys in flight interleaved give the same as sequential; keys are released', async () => {
  const cfg = tinyLlamaConfig({ hiddenSize: 32, intermediateSize: 48, vocabSize: 53 });
  const src = randomWeightSource(cfg, 7);
  const s0 = await loadStage(src, backend, { layerStart: 0, layerEnd: 1, lora: loraCfg() });
  const s1 = await loadStage(src, backend, { layerStart: 1, layerEnd: 2, lora: loraCfg() });
  randomizeParams(s0, 1);
  randomizeParams(s1, 2);
  const B = 1, S = 4;
  const idsA = randomIds(S, cfg.vocabSize, 10), idsB = randomIds(S, cfg.vocabSize, 11);
  const labA = shiftedLabels(idsA, B, S), labB = shiftedLabels(idsB, B, S);
  const seqA = [s0.newGrads(), s1.newGrads()], seqB = [s0.newGrads(), s1.newGrads()];
  await trainStep([s0, s1], 'A', idsA, labA, B, S, seqA, 1);
  await trainStep([s0, s1], 'B', idsB, labB, B, S, seqB, 1);
  // interleaved: both forwards concurrently, then backwards in the opposite order
  const intA = [s0.newGrads(), s1.newGrads()], intB = [s0.newGrads(), s1.newGrads()];
  const [hA, hB] = await Promise.all([
    s0.forward({ key: 'A', batch: B, seqLen: S, ids: idsA }),
    s0.forward({ key: 'B', batch: B, seqLen: S, ids: idsB }),
  ]);
  await Promise.all([
    s1.forward({ key: 'A', batch: B, seqLen: S, hidden: hA.hidden, labels: labA }),
    s1.forward({ key: 'B', batch: B, seqLen: S, hidden: hB.hidden, labels: labB }),
  ]);
  const gB = await s1.backward('B', intB[1], { lossScale: 1 });
  const gA = await s1.backward('A', intA[1], { lossScale: 1 });
  await Promise.all([s0.backward('A', intA[0], { gradOut: gA.gradIn }), s0.backward('B', intB[0], { gradOut: gB.gradIn })]);
  for (let s = 0; s < 2; s++) {
    intA[s].forEach((g, i) => assert.deepEqual(g, seqA[s][i]));
    intB[s].forEach((g, i) => assert.deepEqual(g, seqB[s][i]));
  }
  await assert.rejects(s0.backward('A', s0.newGrads(), { gradOut: gA.gradIn }), /no forward kept for micro-batch key "A"/);
  await s0.forward({ key: 'C', batch: B, seqLen: S, ids: idsA });
  await assert.rejects(s0.forward({ key: 'C', batch: B, seqLen: S, ids: idsA }), /already in flight/);
  s0.release('C');
  await assert.rejects(s0.backward('C', s0.newGrads(), { gradOut: gA.gradIn }), /no forward kept/);
  // a key released while its forward is still computing is not kept when the forward finishes
  const running = s0.forward({ key: 'D', batch: B, seqLen: S, ids: idsA });
  await assert.rejects(s0.forward({ key: 'D', batch: B, seqLen: S, ids: idsA }), /already in flight/);
  s0.release('D');
  await running;
  await assert.rejects(s0.backward('D', s0.newGrads(), { gradOut: gA.gradIn }), /no forward kept/);
});

test('params are read at call time: overwriting .data in place changes the next forward', async () => {
  const cfg = tinyLlamaConfig({ hiddenSize: 32, intermediateSize: 48, vocabSize: 53 });
  const stage = await loadStage(randomWeightSource(cfg, 1), backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() });
  const ids = randomIds(4, cfg.vocabSize, 1);
  const before = await logits(stage, ids, 1, 4);
  // B = 0 at init ⇒ LoRA is a no-op; setting one B non-zero must move the logits
  const bIdx = stage.params.findIndex((p) => p.name.endsWith('layers.1.mlp.down_proj.lora_B.weight'));
  stage.params[bIdx].data.fill(0.5);
  const after = await logits(stage, ids, 1, 4);
  assert.notDeepEqual(after, before);
});

test('clear errors for bad inputs', async () => {
  const cfg = tinyLlamaConfig({ hiddenSize: 32, intermediateSize: 48, vocabSize: 53 });
  const src = randomWeightSource(cfg, 1);
  await assert.rejects(loadStage(src, backend, { layerStart: 1, layerEnd: 3, lora: loraCfg() }), /layer range \[1, 3\)/);
  const broken: WeightSource = { ...src, config: src.config, has: (n) => n !== 'model.layers.1.mlp.up_proj.weight' && src.has(n), getFloat: src.getFloat, getNF4: src.getNF4 };
  await assert.rejects(loadStage(broken, backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() }), /model\.layers\.1\.mlp\.up_proj\.weight/);
  const wrongShape: WeightSource = {
    config: src.config, has: src.has, getFloat: src.getFloat,
    getNF4: async (n) => (n === 'model.layers.0.self_attn.k_proj.weight' ? src.getNF4('model.layers.0.self_attn.q_proj.weight') : src.getNF4(n)),
  };
  await assert.rejects(loadStage(wrongShape, backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() }), /k_proj\.weight: expected NF4 weight \[16, 32\], got \[32, 32\]/);
  const qk: WeightSource = { ...src, config: src.config, has: (n) => n === 'model.layers.0.self_attn.q_norm.weight' || src.has(n), getFloat: src.getFloat, getNF4: src.getNF4 };
  await assert.rejects(loadStage(qk, backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() }), /q_norm\.weight: per-head q\/k RMSNorm/);
  const gemma: WeightSource = { ...src, config: { ...cfg, modelType: 'gemma' }, has: src.has, getFloat: src.getFloat, getNF4: src.getNF4 };
  await assert.rejects(loadStage(gemma, backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() }), /model_type "gemma"/);
  const st = await loadStage(src, backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() });
  await assert.rejects(st.forward({ key: 'x', batch: 1, seqLen: 3, ids: new Int32Array(3) }), /needs labels/);
  // Mistral-style sliding window: fully causal attention is exact only within the window
  const mistral = { ...cfg, modelType: 'mistral', raw: { sliding_window: 4 } };
  const sw = await loadStage({ ...src, config: mistral, has: src.has, getFloat: src.getFloat, getNF4: src.getNF4 }, backend, { layerStart: 0, layerEnd: 2, lora: loraCfg() });
  await sw.forward({ key: 'ok', batch: 1, seqLen: 4, ids: new Int32Array(4), labels: new Int32Array(4) }, { train: false });
  await assert.rejects(sw.forward({ key: 'long', batch: 1, seqLen: 5, ids: new Int32Array(5), labels: new Int32Array(5) }), /sliding_window 4/);
  await assert.rejects(st.forward({ key: 'x', batch: 1, seqLen: 3, ids: new Int32Array(3), labels: Int32Array.from([1, 53, -100]) }), /labels\[1\] = 53/);
  await assert.rejects(st.forward({ key: 'x', batch: 1, seqLen: 3, ids: new Int32Array(2), labels: new Int32Array(3) }), /ids Int32Array\(3\)/);
});

test('greedy generate with the KV cache equals argmax of full recomputed logits', async () => {
  const cfg = tinyLlamaConfig();
  const stage = await loadStage(randomWeightSource(cfg, 13), backend, { layerStart: 0, layerEnd: 2, lora: loraCfg({ r: 4 }) });
  randomizeParams(stage, 4, 0.2);
  const prompt = Array.from(randomIds(5, cfg.vocabSize, 2));
  const n = 8;
  const got = await generate(stage, prompt, { maxNewTokens: n, temperature: 0 });
  assert.equal(got.length, n);
  const seq = [...prompt];
  const dec = createDecoder(stage, prompt.length + n);
  let kvLogits = await dec.append(prompt);
  for (let i = 0; i < n; i++) {
    const full = await logits(stage, Int32Array.from(seq), 1, seq.length);
    const last = full.subarray((seq.length - 1) * cfg.vocabSize);
    const { diff } = maxAbsDiff(kvLogits, last);
    // the decode attention accumulates in float64 in JS, the full pass in the backend: float32-level agreement
    assert.ok(diff < 1e-4, `step ${i}: KV-cache logits differ from recompute by ${diff}`);
    assert.equal(got[i], argmax(last), `step ${i}`);
    seq.push(got[i]);
    kvLogits = await dec.append([got[i]]);
  }
  // eos stops generation and is included
  const stop = await generate(stage, prompt, { maxNewTokens: n, temperature: 0, eosTokenIds: [got[2]] });
  assert.deepEqual(stop, got.slice(0, got.indexOf(got[2]) + 1));
  // sampling is reproducible from its seed
  const s1 = await generate(stage, prompt, { maxNewTokens: 6, temperature: 1, topP: 0.9, seed: 3 });
  const s2 = await generate(stage, prompt, { maxNewTokens: 6, temperature: 1, topP: 0.9, seed: 3 });
  assert.deepEqual(s1, s2);
});
