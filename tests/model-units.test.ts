// Unit tests of the model's backend-free parts: seeded PRNG, rope inverse frequencies/tables, LoRA naming, scaling, init, dropout masks, sampling.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Rng, hashSeed } from '../engine/model/rng.ts';
import { RopeCache, ropeInvFreq, ropeTables } from '../engine/model/rope.ts';
import { dropoutMask, initLoraA, loraParamName, loraScaling, orderedTargets, validateLoraConfig } from '../engine/model/lora.ts';
import { argmax, sampleToken } from '../engine/model/generate.ts';
import type { LoraConfig } from '../engine/types.ts';

test('rng: same seed and streams give the same sequence; any key change gives another', () => {
  const a = new Rng(42, 1, 2), b = new Rng(42, 1, 2), c = new Rng(42, 2, 1), d = new Rng(43, 1, 2);
  const sa = Array.from({ length: 16 }, () => a.nextU32());
  const sb = Array.from({ length: 16 }, () => b.nextU32());
  const sc = Array.from({ length: 16 }, () => c.nextU32());
  const sd = Array.from({ length: 16 }, () => d.nextU32());
  assert.deepEqual(sa, sb);
  assert.notDeepEqual(sa, sc);
  assert.notDeepEqual(sa, sd);
  for (const v of sa) assert.ok(Number.isInteger(v) && v >= 0 && v < 2 ** 32);
  // the bulk path is the same stream, and continues it
  const bulk = new Rng(42, 1, 2).fillU32(new Uint32Array(10));
  const e = new Rng(42, 1, 2);
  e.fillU32(new Uint32Array(4));
  assert.deepEqual(Array.from(bulk), sa.slice(0, 10));
  assert.equal(e.nextU32(), sa[4]);
  // seeds above 2^32 must not alias their low 32 bits
  assert.notEqual(hashSeed(2 ** 32 + 5), hashSeed(5));
  assert.notEqual(hashSeed(-1), hashSeed(2 ** 32 - 1));
  assert.throws(() => hashSeed(0.5), /not a safe integer/);
});

test('rng: uniform and normal moments (n = 200k: standard error ~1e-3)', () => {
  const r = new Rng(7);
  const n = 200_000;
  let s = 0, s2 = 0, mn = 1, mx = 0;
  for (let i = 0; i < n; i++) { const u = r.nextFloat(); s += u; s2 += u * u; mn = Math.min(mn, u); mx = Math.max(mx, u); }
  assert.ok(Math.abs(s / n - 0.5) < 5e-3, `uniform mean ${s / n}`);
  assert.ok(Math.abs(s2 / n - 1 / 3) < 5e-3, `uniform E[u^2] ${s2 / n}`);
  assert.ok(mn >= 0 && mx < 1);
  let z = 0, z2 = 0;
  for (let i = 0; i < n; i++) { const g = r.normal(); z += g; z2 += g * g; }
  assert.ok(Math.abs(z / n) < 1e-2, `normal mean ${z / n}`);
  assert.ok(Math.abs(z2 / n - 1) < 2e-2, `normal var ${z2 / n}`);
});

test('rope: default inv_freq is 1/theta^(2i/d) in float32', () => {
  const inv = ropeInvFreq({ headDim: 8, ropeTheta: 10000, ropeScaling: null });
  assert.equal(inv.length, 4);
  for (let i = 0; i < 4; i++) {
    const want = 1 / Math.pow(10000, (2 * i) / 8);
    assert.ok(Math.abs(inv[i] - want) <= want * 2e-7, `inv[${i}] = ${inv[i]} vs ${want}`);
    assert.equal(inv[i], Math.fround(inv[i]));
  }
});

test('rope: llama3 scaling (Llama-3.1-8B parameters) keeps high, divides low, blends medium frequencies', () => {
  const base = { headDim: 128, ropeTheta: 500000 };
  const plain = ropeInvFreq({ ...base, ropeScaling: null });
  const l3 = ropeInvFreq({
    ...base,
    ropeScaling: { ropeType: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
  });
  let nHigh = 0, nLow = 0, nMid = 0;
  for (let i = 0; i < 64; i++) {
    const wavelen = (2 * Math.PI) / plain[i];
    if (wavelen < 8192 / 4) { assert.equal(l3[i], plain[i]); nHigh++; }
    else if (wavelen > 8192 / 1) { assert.ok(Math.abs(l3[i] - plain[i] / 8) <= 1e-7 * plain[i]); nLow++; }
    else {
      const s = (8192 / wavelen - 1) / (4 - 1);
      const want = (1 - s) * plain[i] / 8 + s * plain[i];
      assert.ok(Math.abs(l3[i] - want) <= 1e-6 * want, `mid ${i}: ${l3[i]} vs ${want}`);
      assert.ok(l3[i] < plain[i] && l3[i] > plain[i] / 8);
      nMid++;
    }
  }
  // all three bands are present for these parameters (wavelengths 2π … 2π·500000^(126/128))
  assert.ok(nHigh > 0 && nLow > 0 && nMid > 0, `bands ${nHigh}/${nMid}/${nLow}`);
  assert.equal(l3[0], 1);
});

test('rope: linear scaling divides by factor; unknown types are rejected with their name', () => {
  const plain = ropeInvFreq({ headDim: 16, ropeTheta: 10000, ropeScaling: null });
  const lin = ropeInvFreq({ headDim: 16, ropeTheta: 10000, ropeScaling: { ropeType: 'linear', factor: 4 } });
  for (let i = 0; i < 8; i++) assert.equal(lin[i], Math.fround(plain[i] / 4));
  assert.throws(() => ropeInvFreq({ headDim: 16, ropeTheta: 1e4, ropeScaling: { ropeType: 'yarn', factor: 4 } }), /yarn/);
  assert.throws(() => ropeInvFreq({ headDim: 15, ropeTheta: 1e4, ropeScaling: null }), /even/);
});

test('rope: tables hold cos/sin of float32 angles and grow on demand without changing earlier rows', () => {
  const inv = ropeInvFreq({ headDim: 8, ropeTheta: 10000, ropeScaling: null });
  const { cos, sin } = ropeTables(inv, 5);
  for (let p = 0; p < 5; p++) for (let i = 0; i < 4; i++) {
    const a = Math.fround(p * inv[i]);
    assert.equal(cos[p * 4 + i], Math.fround(Math.cos(a)));
    assert.equal(sin[p * 4 + i], Math.fround(Math.sin(a)));
  }
  const cache = new RopeCache({ headDim: 8, ropeTheta: 10000, ropeScaling: null, maxPositionEmbeddings: 100 });
  const small = cache.get(3);
  const big = cache.get(1000);
  assert.ok(big.cos.length >= 1000 * 4);
  assert.deepEqual(big.cos.subarray(0, 12), small.cos.subarray(0, 12));
  const dyn = new RopeCache({ headDim: 8, ropeTheta: 10000, ropeScaling: { ropeType: 'dynamic', factor: 2 }, maxPositionEmbeddings: 100 });
  assert.throws(() => dyn.get(101), /max_position_embeddings/);
});

const lora = (over: Partial<LoraConfig> = {}): LoraConfig => ({
  r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['v_proj', 'q_proj', 'down_proj'], useRslora: false, initLoraWeights: true, ...over,
});

test('lora: PEFT names, scaling, canonical target order and validation', () => {
  assert.equal(loraParamName(3, 'q_proj', 'A'), 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight');
  assert.equal(loraParamName(0, 'gate_proj', 'B'), 'base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight');
  assert.equal(loraScaling(lora()), 2);
  assert.equal(loraScaling(lora({ useRslora: true })), 4);
  assert.deepEqual(orderedTargets(lora()), ['q_proj', 'v_proj', 'down_proj']);
  assert.throws(() => validateLoraConfig(lora({ r: 0 })), /r must be/);
  assert.throws(() => validateLoraConfig(lora({ loraDropout: 1 })), /lora_dropout/);
  assert.throws(() => validateLoraConfig(lora({ targetModules: ['lm_head' as 'q_proj'] })), /lm_head/);
});

test('lora: kaiming-uniform init is U(±1/sqrt(in)), keyed by (seed, layer, module); gaussian has std 1/r', () => {
  const r = 8, inF = 512;
  const a = new Float32Array(r * inF), b = new Float32Array(r * inF), c = new Float32Array(r * inF);
  initLoraA(a, r, inF, true, 42, 3, 'q_proj');
  initLoraA(b, r, inF, true, 42, 3, 'q_proj');
  initLoraA(c, r, inF, true, 42, 4, 'q_proj');
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  const bound = 1 / Math.sqrt(inF);
  let mx = 0, s2 = 0;
  for (const v of a) { mx = Math.max(mx, Math.abs(v)); s2 += v * v; }
  assert.ok(mx <= bound && mx > 0.95 * bound, `max |A| ${mx} vs bound ${bound}`);
  // variance of U(-b, b) is b²/3; 4096 samples → ~2% standard error
  assert.ok(Math.abs(s2 / a.length / (bound * bound / 3) - 1) < 0.08);
  const g = new Float32Array(r * inF);
  initLoraA(g, r, inF, 'gaussian', 42, 3, 'q_proj');
  let g2 = 0;
  for (const v of g) g2 += v * v;
  assert.ok(Math.abs(Math.sqrt(g2 / g.length) * r - 1) < 0.05, `gaussian std ${Math.sqrt(g2 / g.length)} vs ${1 / r}`);
});

test('lora: dropout masks are reproducible per (seed, layer, module) and drop about p', async () => {
  // 2^20 + 3 elements spans chunk boundaries (yield points) and ends on an odd element
  const n = (1 << 20) + 3;
  const m1 = await dropoutMask(n, 0.1, 5, 2, 'up_proj');
  const m2 = await dropoutMask(n, 0.1, 5, 2, 'up_proj');
  const m3 = await dropoutMask(n, 0.1, 5, 2, 'gate_proj');
  assert.deepEqual(m1, m2);
  assert.notDeepEqual(m1, m3);
  const dropped = m1.reduce((n, v) => n + (v ? 0 : 1), 0) / m1.length;
  assert.ok(Math.abs(dropped - 0.1) < 0.002, `dropped fraction ${dropped}`);
  const none = await dropoutMask(1000, 0, 5, 2, 'up_proj');
  assert.ok(none.every((v) => v === 1));
});

test('sampling: temperature 0 is argmax, top-p keeps the nucleus, same seed same draws', () => {
  const logits = Float32Array.from([0, 3, 1, 2.9, -5]);
  assert.equal(argmax(logits), 1);
  assert.equal(sampleToken(logits, 0, 1, new Rng(0)), 1);
  // probs ∝ e^[0,3,1,2.9,-5]: top two hold ~0.91 of the mass (each alone < 0.8), so top_p 0.8 samples only ids 1 and 3
  const rng = new Rng(1);
  const seen = new Set<number>();
  for (let i = 0; i < 500; i++) seen.add(sampleToken(logits, 1, 0.8, rng));
  assert.deepEqual([...seen].sort(), [1, 3]);
  const all = new Set<number>();
  const rng2 = new Rng(2);
  for (let i = 0; i < 2000; i++) all.add(sampleToken(logits, 1, 1, rng2));
  assert.ok(all.has(0) && all.has(2), 'full distribution reaches low-probability ids');
  const d1 = Array.from({ length: 20 }, ((r) => () => sampleToken(logits, 0.7, 0.95, r))(new Rng(9)));
  const d2 = Array.from({ length: 20 }, ((r) => () => sampleToken(logits, 0.7, 0.95, r))(new Rng(9)));
  assert.deepEqual(d1, d2);
});

test('vocab matrix: bf16-exact data is held as bf16 and decodes exactly; other data stays float32', async () => {
  const { VocabMatrix } = await import('../engine/model/vocab-matrix.ts');
  const { RefBackend } = await import('../engine/backends/ref.ts');
  const V = 7, C = 5;
  const exact = new Rng(3).fillNormal(new Float32Array(V * C), 0, 1);
  const bits = new Uint32Array(exact.buffer);
  for (let i = 0; i < bits.length; i++) bits[i] &= 0xffff0000;
  const m = new VocabMatrix(new Float32Array(exact), V, C);
  assert.equal(m.storedAsBf16, true);
  assert.equal(m.bytes, V * C * 2);
  assert.deepEqual(m.rowsF32(2, 5, null), exact.subarray(2 * C, 5 * C));
  assert.deepEqual(m.allF32(), exact);
  assert.equal(m.allF32(), m.allF32(), 'decoded once and kept');
  const ids = Int32Array.from([6, 0, 3]);
  const got = new Float32Array(3 * C), want = new Float32Array(3 * C);
  await m.gather(new RefBackend(), got, ids, 3);
  await new RefBackend().embeddingForward(want, ids, exact, 3, C, V);
  assert.deepEqual(got, want);
  await assert.rejects(m.gather(new RefBackend(), got, Int32Array.from([1, 7, 0]), 3), /ids\[1\] = 7 is outside the vocabulary \[0, 7\)/);
  const inexact = new Rng(3).fillNormal(new Float32Array(V * C), 0, 1);
  const f = new VocabMatrix(inexact, V, C);
  assert.equal(f.storedAsBf16, false);
  assert.equal(f.rowsF32(1, 2, null)[0], inexact[C]);
});
