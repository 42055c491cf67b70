// GPU optimizer checks: CUDA AdamW 32-bit / 8-bit blockwise vs the TS bitsandbytes reference, and paged vs unpaged.
//
// Run by scripts/gpu-check.sh; skipped without a GPU. 5000-element tensors give 20 quantization blocks
// (one partial) and, with 1024-element pages, five pages through two staging slots.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { AdamW8bitState, AdamWHyper } from '../../cuda/index.ts';
import { adamw32Ref, adamw8bitRef, Q_SIGNED, Q_UNSIGNED } from './adamw-ref.ts';
import { assertClose, cuda, maxAbs, randn, rng, skip } from './helpers.ts';

const hp = (step: number): AdamWHyper => ({ lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, step });

function fresh8(n: number): AdamW8bitState {
  const nb = Math.ceil(n / 256);
  return { state1: new Uint8Array(n), state2: new Uint8Array(n), absmax1: new Float32Array(nb), absmax2: new Float32Array(nb) };
}
function clone8(s: AdamW8bitState): AdamW8bitState {
  return { state1: s.state1.slice(), state2: s.state2.slice(), absmax1: s.absmax1.slice(), absmax2: s.absmax2.slice() };
}

test('AdamW 32-bit matches the bitsandbytes reference over 5 steps, skipping non-finite gradients', { skip }, async () => {
  const r = rng(20);
  const n = 5000;
  const p = randn(r, n), m = new Float32Array(n), v = new Float32Array(n);
  const pR = p.slice(), mR = m.slice(), vR = v.slice();
  for (let step = 1; step <= 5; step++) {
    const g = randn(r, n, 0.1);
    if (step === 3) { g[10] = NaN; g[4000] = -Infinity; }  // skipped: p, m, v of those elements unchanged
    const before = [p[10], m[10], v[10], p[4000]];
    await cuda!.adamw32Step(p, g, m, v, hp(step));
    adamw32Ref(pR, g, mR, vR, hp(step));
    if (step === 3) assert.deepEqual([p[10], m[10], v[10], p[4000]], before, 'a non-finite gradient changed p or the state');
    // m = b1·m + (1-b1)·g cancels: its fp32 rounding error is a few ulps of the terms (~|g|), not of m, and it
    // carries over the steps (both sides keep their own state): 2^-21·max|g| bounds 5 steps of it
    assertClose(`adamw32 m step ${step}`, m, mR, { rtol: 1e-5, atol: 2 ** -21 * maxAbs(g) });
    assertClose(`adamw32 v step ${step}`, v, vR, { rtol: 1e-5, atol: 1e-12 });
    // the update is ~lr per element: compare against that scale
    assertClose(`adamw32 p step ${step}`, p, pR, { rtol: 1e-6, atol: 1e-6 * hp(step).lr });
  }
});

test('AdamW 8-bit blockwise matches the reference step by step (codes within one step of the map)', { skip }, async () => {
  const r = rng(21);
  const n = 5000;
  const p = randn(r, n);
  const st = fresh8(n);  // each step starts both sides from the GPU's state, isolating one step's error
  for (let step = 1; step <= 5; step++) {
    const g = randn(r, n, 0.1);
    if (step === 3) { g[10] = NaN; g[4000] = Infinity; }
    const refSt = clone8(st), pR = p.slice(), p0 = p.slice();
    await cuda!.adamw8bitStep(p, g, st, hp(step));
    adamw8bitRef(pR, g, refSt.state1, refSt.state2, refSt.absmax1, refSt.absmax2, hp(step));
    assertClose(`adamw8bit absmax1 step ${step}`, st.absmax1, refSt.absmax1, { rtol: 1e-5 });
    assertClose(`adamw8bit absmax2 step ${step}`, st.absmax2, refSt.absmax2, { rtol: 1e-5 });
    assertClose(`adamw8bit p step ${step}`, p, pR, { rtol: 1e-6, atol: 1e-5 * hp(step).lr });
    // fp32 vs fp64 can move a value that sits on a code midpoint to the neighbouring code, nothing more
    let differ = 0;
    for (let i = 0; i < n; i++) {
      for (const [a, b, map] of [[st.state1[i], refSt.state1[i], Q_SIGNED], [st.state2[i], refSt.state2[i], Q_UNSIGNED]] as const) {
        if (a !== b) {
          differ++;
          assert.ok(Math.abs(a - b) <= 1, `step ${step} element ${i}: code ${a} vs reference ${b} (${map[a]} vs ${map[b]})`);
        }
      }
    }
    assert.ok(differ <= n * 0.002, `step ${step}: ${differ} of ${2 * n} codes differ from the reference`);
    if (step === 3) {
      assert.equal(p[10], p0[10], 'NaN gradient changed p');
      assert.equal(p[4000], p0[4000], 'Inf gradient changed p');
    }
  }
});

test('paged AdamW (many pages through two slots) equals the unpaged kernels bit for bit', { skip }, async () => {
  const r = rng(22);
  for (const bits of [32, 8] as const) {
    const opt = cuda!.createPagedAdamW({ bits, deviceBudgetBytes: 64 * 1024, pageElems: 1024 });
    assert.ok(opt.plan.deviceBytes <= 64 * 1024);
    assert.equal(opt.plan.slots, 2);
    const sizes = [5000, 300];  // 300 < min_8bit_size: fp32 state even in 8-bit mode
    const ids = sizes.map((n) => opt.add(n));
    const ps = sizes.map((n) => randn(r, n)), pu = ps.map((p) => p.slice());
    const m = sizes.map((n) => new Float32Array(n)), v = sizes.map((n) => new Float32Array(n));
    const s8 = sizes.map((n) => fresh8(n));
    for (let step = 1; step <= 3; step++) {
      for (let t = 0; t < sizes.length; t++) {
        const g = randn(r, sizes[t], 0.1);
        await opt.step(ids[t], ps[t], g, hp(step));
        if (bits === 8 && sizes[t] >= 4096) await cuda!.adamw8bitStep(pu[t], g, s8[t], hp(step));
        else await cuda!.adamw32Step(pu[t], g, m[t], v[t], hp(step));
        assert.deepEqual(ps[t], pu[t], `bits=${bits} tensor ${t} step ${step}`);
      }
    }
    const big = opt.readState(ids[0]), small = opt.readState(ids[1]);
    if (bits === 8) {
      assert.ok('state1' in big);
      assert.deepEqual(big.state1, s8[0].state1);
      assert.deepEqual(big.absmax2, s8[0].absmax2);
    } else {
      assert.ok('m' in big);
      assert.deepEqual(big.v, v[0]);
    }
    assert.ok('m' in small, 'small tensor should keep fp32 state');
    assert.deepEqual(small.m, m[1]);
    // checkpoint round trip: write the state back into a fresh optimizer and keep stepping identically
    const opt2 = cuda!.createPagedAdamW({ bits, deviceBudgetBytes: 64 * 1024, pageElems: 1024 });
    const id2 = opt2.add(sizes[0]);
    opt2.writeState(id2, big);
    const g = randn(r, sizes[0], 0.1), pa = ps[0].slice(), pb = ps[0].slice();
    await opt.step(ids[0], pa, g, hp(4));
    await opt2.step(id2, pb, g, hp(4));
    assert.deepEqual(pa, pb);
    const stats = opt.stats();
    assert.ok(stats.deviceBytes <= 64 * 1024, `device bytes ${stats.deviceBytes}`);
    assert.ok(stats.hostPinnedBytes > 0);
    opt.destroy();
    opt2.destroy();
  }
});
