// Trainer optimizers, paging, clipping and schedules against independent float64 formulas.
// Sizes: a few thousand elements and <= 10 steps, enough to cross the 4096-element 8-bit threshold and
// several 256-blocks/pages while staying in milliseconds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AdamW, MIN_8BIT_SIZE } from '../engine/train/optim.ts';
import type { AdamWOptions } from '../engine/optimizer.ts';
import { PagedStore } from '../engine/train/paged.ts';
import { clipGradNorm, gradNorm } from '../engine/train/clip.ts';
import { lrLambda, warmupStepsFor } from '../engine/train/schedule.ts';
import { Rng } from '../engine/model/rng.ts';

function randn(n: number, seed: number, std = 1): Float32Array {
  return new Rng(seed).fillNormal(new Float32Array(n), 0, std);
}

const base: Omit<AdamWOptions, 'optim'> = { beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1 };

test('adamw_torch matches the torch AdamW formula (decay first) step by step', () => {
  const n = 300, lr = 1e-2;
  const p = randn(n, 1), ref = Float64Array.from(p);
  const m = new Float64Array(n), v = new Float64Array(n);
  const opt = new AdamW([{ name: 'w', numel: n }], { ...base, optim: 'adamw_torch' });
  for (let t = 1; t <= 5; t++) {
    const g = randn(n, 100 + t);
    opt.update([p], [g], lr);
    for (let i = 0; i < n; i++) {
      ref[i] -= lr * 0.1 * ref[i];
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
      ref[i] -= lr * (m[i] / (1 - 0.9 ** t)) / (Math.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8);
    }
  }
  for (let i = 0; i < n; i++) assert.ok(Math.abs(p[i] - ref[i]) < 1e-5, `w[${i}]: ${p[i]} vs ${ref[i]}`);
});

test('paged_adamw_32bit matches the bitsandbytes formula (eps·sqrt(1-β2^t), decay after) and skips NaN grads', () => {
  const n = 300, lr = 1e-2;
  const p = randn(n, 2), ref = Float64Array.from(p);
  const m = new Float64Array(n), v = new Float64Array(n);
  const opt = new AdamW([{ name: 'w', numel: n }], { ...base, optim: 'paged_adamw_32bit' });
  for (let t = 1; t <= 5; t++) {
    const g = randn(n, 200 + t);
    g[7] = Number.NaN;
    opt.update([p], [g], lr);
    const c1 = 1 - 0.9 ** t, c2 = Math.sqrt(1 - 0.999 ** t);
    for (let i = 0; i < n; i++) {
      if (i === 7) continue;
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
      ref[i] += (-lr * c2 / c1) * (m[i] / (Math.sqrt(v[i]) + 1e-8 * c2));
      ref[i] *= 1 - lr * 0.1;
    }
  }
  for (let i = 0; i < n; i++) assert.ok(Math.abs(p[i] - ref[i]) < 1e-5, `w[${i}]: ${p[i]} vs ${ref[i]}`);
  assert.equal(p[7], Math.fround(ref[7]), 'NaN grad leaves the param unchanged');
});

test('adamw_8bit stays within quantization error of 32-bit; small tensors keep exact 32-bit state', () => {
  const big = 3 * 4096 + 100, small = MIN_8BIT_SIZE - 1, lr = 1e-3;
  const specs = [{ name: 'big', numel: big }, { name: 'small', numel: small }];
  const o8 = new AdamW(specs, { ...base, optim: 'adamw_8bit' });
  const o32 = new AdamW(specs, { ...base, optim: 'paged_adamw_32bit' });
  const p0 = [randn(big, 3), randn(small, 4)];
  const p8 = p0.map((x) => x.slice()), p32 = p0.map((x) => x.slice());
  for (let t = 1; t <= 10; t++) {
    // scales vary by block so per-block absmax matters
    const g = [randn(big, 300 + t), randn(small, 400 + t)];
    for (let i = 0; i < big; i++) g[0][i] *= 1 + (i >> 8) % 5;
    o8.update(p8, g, lr);
    o32.update(p32, g, lr);
  }
  let num = 0, den = 0;
  for (let i = 0; i < big; i++) {
    num += Math.abs((p8[0][i] - p0[0][i]) - (p32[0][i] - p0[0][i]));
    den += Math.abs(p32[0][i] - p0[0][i]);
  }
  // 8-bit dynamic-map state has ~1-2% relative error per block; 5% of the mean update is a loose bound
  // that a broken requantization (wrong map, wrong block, missing sign fix) exceeds by far
  assert.ok(num / den < 0.05, `8-bit vs 32-bit mean relative update error ${num / den}`);
  assert.ok(num > 0, '8-bit state must actually be quantized');
  assert.deepEqual(p8[1], p32[1], 'tensors below min_8bit_size use the 32-bit kernel');
  const st = o8.exportState();
  assert.equal(st.tensors.find((t) => t.name === 'big.state1')?.dtype, 'U8');
  assert.equal(st.tensors.find((t) => t.name === 'small.exp_avg')?.dtype, 'F32');
});

test('8-bit: a non-finite grad zeroes that element state and keeps the param', () => {
  const n = 4096, lr = 1e-3;
  const o = new AdamW([{ name: 'w', numel: n }], { ...base, optim: 'paged_adamw_8bit' });
  const p = randn(n, 5);
  o.update([p], [randn(n, 6)], lr);
  const before = p[10];
  const g = randn(n, 7);
  g[10] = Number.POSITIVE_INFINITY;
  o.update([p], [g], lr);
  assert.equal(p[10], before);
  const st = o.exportState();
  const absmax1 = st.tensors.find((t) => t.name === 'w.absmax1')!.data as Float32Array;
  const q1 = st.tensors.find((t) => t.name === 'w.state1')!.data as Uint8Array;
  assert.ok(absmax1[0] > 0);
  assert.equal(q1[10], 127, 'signed dynamic map index 127 is 0');
});

for (const optim of ['paged_adamw_32bit', 'paged_adamw_8bit'] as const) {
  test(`${optim}: spilling pages to disk gives bit-identical results to keeping them resident`, () => {
    const dir = mkdtempSync(join(tmpdir(), 'swarmtune-paged-'));
    try {
      const specs = [{ name: 'a', numel: 9000 }, { name: 'b', numel: 5000 }];
      const resident = new AdamW(specs, { ...base, optim, pageBytes: 4096 });
      const spilled = new AdamW(specs, { ...base, optim, pageBytes: 4096, residentBytes: 8192, spillDir: dir });
      const pr = [randn(9000, 8), randn(5000, 9)], ps = pr.map((x) => x.slice());
      for (let t = 1; t <= 4; t++) {
        const g = [randn(9000, 500 + t), randn(5000, 600 + t)];
        resident.update(pr, g, 1e-3);
        spilled.update(ps, g, 1e-3);
      }
      assert.deepEqual(ps, pr);
      const s = spilled.storeStats();
      assert.ok(s.spills > 0 && s.loads > 0, `expected spills and loads, got ${JSON.stringify(s)}`);
      assert.ok(s.peakResidentBytes <= 8192 + 4096, `peak resident ${s.peakResidentBytes} exceeds budget + one page`);
      assert.ok(readdirSync(dir).length > 0, 'spill files are on disk');
      assert.deepEqual(spilled.exportState(), resident.exportState());
      spilled.dispose();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('exported optimizer state resumes identically, even with another page size', () => {
  for (const optim of ['adamw_torch', 'adamw_8bit'] as const) {
    const specs = [{ name: 'w', numel: 6000 }];
    const a = new AdamW(specs, { ...base, optim });
    const pa = [randn(6000, 10)];
    for (let t = 1; t <= 3; t++) a.update(pa, [randn(6000, 700 + t)], 1e-3);
    const b = new AdamW(specs, { ...base, optim, pageBytes: 3000 });
    b.importState(a.exportState());
    const pb = [pa[0].slice()];
    for (let t = 4; t <= 6; t++) {
      const g = [randn(6000, 700 + t)];
      a.update(pa, g, 1e-3);
      b.update(pb, g, 1e-3);
    }
    assert.deepEqual(pb, pa, optim);
    assert.throws(() => new AdamW([{ name: 'x', numel: 6000 }], { ...base, optim }).importState(a.exportState()), /missing optimizer tensor x\./);
  }
});

test('PagedStore keeps data across spill and reload', () => {
  const dir = mkdtempSync(join(tmpdir(), 'swarmtune-store-'));
  try {
    const s = new PagedStore({ residentBytes: 100, spillDir: dir });
    const ids = [0, 1, 2].map(() => s.allocate(64));
    ids.forEach((id) => s.use(id, (b) => b.fill(id + 1)));
    for (const id of ids) s.use(id, (b) => assert.ok(b.every((x) => x === id + 1)));
    assert.ok(s.stats().spills >= 2);
    assert.throws(() => new PagedStore({ residentBytes: 10 }), /spillDir/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('clip_grad_norm_: global norm over tensors, coef = max/(norm+1e-6), no scaling below the limit', () => {
  const g = [Float32Array.from([3, 0]), Float32Array.from([0, 4])];
  assert.equal(clipGradNorm(g, 1), 5);
  const c = 1 / (5 + 1e-6);
  assert.deepEqual([...g[0], ...g[1]], [3 * c, 0, 0, 4 * c].map(Math.fround));
  const h = [Float32Array.from([0.3, 0.4])];
  clipGradNorm(h, 1);
  assert.deepEqual([...h[0]], [Math.fround(0.3), Math.fround(0.4)]);
  assert.ok(Math.abs(gradNorm(h) - 0.5) < 1e-7);
});

test('schedules follow the HF formulas step by step, λ(0) on the first step', () => {
  const N = 10, W = warmupStepsFor(N, 0, 0.25); // ceil(2.5) = 3
  assert.equal(W, 3);
  assert.equal(warmupStepsFor(N, 2, 0.25), 2, 'explicit warmup_steps wins');
  const expected: Record<string, number[]> = {
    linear: [0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7],
    cosine: [0, 1 / 3, 2 / 3, ...[0, 1, 2, 3, 4, 5, 6].map((k) => 0.5 * (1 + Math.cos(Math.PI * k / 7)))],
    constant: Array(10).fill(1),
    constant_with_warmup: [0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1],
  };
  for (const [type, vals] of Object.entries(expected)) {
    vals.forEach((e, s) => assert.ok(Math.abs(lrLambda(type as 'linear', s, W, N) - e) < 1e-12, `${type} step ${s}: ${lrLambda(type as 'linear', s, W, N)} vs ${e}`));
  }
  assert.equal(lrLambda('linear', 12, W, N), 0, 'never negative past the end');
});

test('8-bit: requantizing m keeps its sign as bitsandbytes does (a tiny negative moves off the zero code, a tiny positive stays)', () => {
  const n = 4096;
  const o = new AdamW([{ name: 'w', numel: n }], { ...base, optim: 'adamw_8bit' });
  const p = new Float32Array(n);
  const g = new Float32Array(n);
  g[0] = 1;        // the block's absmax: s1 = 0.1
  g[1] = -1e-9;    // s1/absmax = -1e-9, nearer to the +0 code (index 127) than to any negative code
  g[2] = 1e-9;
  o.update([p], [g], 1e-3);
  const q1 = o.exportState().tensors.find((t) => t.name === 'w.state1')!.data as Uint8Array;
  assert.equal(q1[2], 127, 'a tiny positive m stays at the zero code (signbit(+0) == signbit(m))');
  assert.equal(q1[1], 126, 'a tiny negative m is bumped to the smallest negative code');
  assert.equal(q1[3], 127, 'a zero m is the zero code');
});
