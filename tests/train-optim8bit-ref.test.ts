// The CPU 8-bit AdamW (engine/train/optim.ts) against the independent bitsandbytes reference
// (tests/gpu/adamw-ref.ts, written from facts §3 in float64) state by state, and against 32-bit Adam at the
// tolerances of bitsandbytes' own test_optimizer8bit. Runs on CPU in CI; the GPU kernels are checked against
// the same reference in tests/gpu/optim.gpu.ts.
// Sizes: 5000 elements = 19 full 256-blocks and a partial one, over 7 pages of 3 blocks, for 40 steps (enough
// for a value to land on a code midpoint); bitsandbytes' test shape 1024×32 for 50 steps. Each runs in under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AdamW, OPTIM8_BLOCKSIZE } from '../engine/train/optim.ts';
import type { OptimizerState } from '../engine/optimizer.ts';
import { createDynamicMap } from '../engine/formats/dynamic-map.ts';
import { Rng } from '../engine/model/rng.ts';
import { adamw8bitRef, Q_SIGNED, Q_UNSIGNED } from './gpu/adamw-ref.ts';

const U = 2 ** -24; // float32 unit roundoff

interface State8 { state1: Uint8Array; state2: Uint8Array; absmax1: Float32Array; absmax2: Float32Array }

function state8(st: OptimizerState, name: string): State8 {
  const t = (s: string) => {
    const x = st.tensors.find((e) => e.name === `${name}.${s}`);
    assert.ok(x, `exported state has no ${name}.${s}`);
    return x.data.slice();
  };
  return { state1: t('state1') as Uint8Array, state2: t('state2') as Uint8Array, absmax1: t('absmax1') as Float32Array, absmax2: t('absmax2') as Float32Array };
}

function randn(r: Rng, n: number, std: number): Float32Array {
  return r.fillNormal(new Float32Array(n), 0, std);
}

test('8-bit AdamW: codes, block absmax and params match the bitsandbytes reference after every step', () => {
  const n = 5000;
  // bitsandbytes AdamW8bit defaults (lr 1e-3, wd 1e-2) and the scales of its own optimizer test (p 0.1, g 0.01)
  const hp = { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 1e-2 };
  const opt = new AdamW([{ name: 'w', numel: n }], { optim: 'paged_adamw_8bit', ...hp, pageBytes: 2048 });
  const r = new Rng(81);
  const p = randn(r, n, 0.1);
  const zeroBlock = 16; // elements 4096..4351 get zero gradients for two steps: an all-zero block
  const worst = { absmax: 0, p: 0, flips: 0, codes: 0 };
  for (let step = 1; step <= 40; step++) {
    const g = randn(r, n, 0.01);
    if (step <= 2) g.fill(0, zeroBlock * OPTIM8_BLOCKSIZE, (zeroBlock + 1) * OPTIM8_BLOCKSIZE);
    if (step === 3) { g[10] = NaN; g[4500] = Infinity; g[4999] = -Infinity; }
    // both sides start the step from the CPU's state, so each step's error stands on its own
    const before = state8(opt.exportState(), 'w');
    const ref = state8(opt.exportState(), 'w');
    const pR = p.slice(), p0 = p.slice();
    const pre = { m: new Float64Array(n), v: new Float64Array(n) };
    opt.update([p], [g], hp.lr);
    adamw8bitRef(pR, g, ref.state1, ref.state2, ref.absmax1, ref.absmax2, { ...hp, step }, pre);
    const got = state8(opt.exportState(), 'w');

    // absmax = max|state| of the block: float32 vs float64 arithmetic and the maps' float32 vs float64
    // construction (entries 1 ulp apart) leave a few ulps
    for (let b = 0; b < ref.absmax1.length; b++) {
      for (const [what, a, e] of [['absmax1', got.absmax1[b], ref.absmax1[b]], ['absmax2', got.absmax2[b], ref.absmax2[b]]] as const) {
        const rel = e === 0 ? Math.abs(a) : Math.abs(a - e) / e;
        worst.absmax = Math.max(worst.absmax, rel);
        assert.ok(rel <= 8 * U, `step ${step} ${what}[${b}]: ${a} vs reference ${e} (relative ${rel.toExponential(2)})`);
      }
    }
    assert.equal(got.absmax1[zeroBlock] === 0 && got.absmax2[zeroBlock] === 0, step <= 2, `step ${step}: block ${zeroBlock} absmax`);

    // codes: identical, except where the value sits so close to the midpoint between two neighbouring codes that
    // rounding may put it on either side. The CPU value differs from the reference's by the float32 rounding of
    // the state's two terms (old state·β, new term) plus the map entries' 1 ulp, relative to the block absmax.
    const b1 = Math.fround(hp.beta1), b2 = Math.fround(hp.beta2);
    for (let i = 0; i < n; i++) {
      const b = Math.floor(i / OPTIM8_BLOCKSIZE);
      const checks = [
        ['state1', got.state1[i], ref.state1[i], Q_SIGNED, pre.m[i], ref.absmax1[b],
          Math.abs(Q_SIGNED[before.state1[i]] * before.absmax1[b] * b1) + Math.abs((1 - b1) * g[i])],
        ['state2', got.state2[i], ref.state2[i], Q_UNSIGNED, pre.v[i], ref.absmax2[b],
          Math.abs(Q_UNSIGNED[before.state2[i]] * before.absmax2[b] * b2) + Math.abs((1 - b2) * g[i] * g[i])],
      ] as const;
      for (const [what, c, cr, map, x, amax, terms] of checks) {
        worst.codes++;
        if (c === cr) continue;
        worst.flips++;
        assert.equal(Math.abs(c - cr), 1, `step ${step} ${what}[${i}]: code ${c} vs reference ${cr}, not neighbours`);
        const xn = x / amax, mid = (map[c] + map[cr]) / 2;
        const slack = 8 * U * (terms / amax + Math.abs(xn));
        assert.ok(Math.abs(xn - mid) <= slack,
          `step ${step} ${what}[${i}]: code ${c} vs reference ${cr}, but the value ${xn} is ${Math.abs(xn - mid).toExponential(2)} from their midpoint ${mid} (slack ${slack.toExponential(2)})`);
      }
    }

    // params: the same update before requantization; two float32 roundings (Adam step, decay) of |p| ~ 0.1
    for (let i = 0; i < n; i++) {
      const d = Math.abs(p[i] - pR[i]);
      worst.p = Math.max(worst.p, d / (Math.abs(pR[i]) * U + 1e-6 * hp.lr));
      assert.ok(d <= 4 * U * Math.abs(pR[i]) + 1e-6 * hp.lr, `step ${step} p[${i}]: ${p[i]} vs reference ${pR[i]}`);
    }
    if (step === 3) {
      for (const i of [10, 4500, 4999]) {
        assert.equal(p[i], p0[i], `step 3: non-finite gradient at ${i} changed p`);
        assert.equal(Q_SIGNED[got.state1[i]] * got.absmax1[Math.floor(i / OPTIM8_BLOCKSIZE)], 0, `step 3: state1[${i}] not reset`);
        assert.equal(Q_UNSIGNED[got.state2[i]], 0, `step 3: state2[${i}] not reset`);
      }
    }
  }
  console.log(`# worst: absmax ${(worst.absmax / U).toFixed(2)} ulp, p ${worst.p.toFixed(2)} (units of the tolerance's ulp term), ${worst.flips} of ${worst.codes} codes on a midpoint`);
  opt.dispose();
});

test('8-bit AdamW passes bitsandbytes\' own test_optimizer8bit against 32-bit Adam (1024×32, 50 steps, its tolerances)', () => {
  // tests/test_optim.py test_optimizer8bit, adam8bit_blockwise, float32: p ~ 0.1·N(0,1), g ~ 0.01·N(0,1), Adam8bit
  // defaults (lr 1e-3, no weight decay) vs torch.optim.Adam (here in float64). After each step the 8-bit side takes
  // the 32-bit side's params and the 32-bit side takes the 8-bit side's dequantized states, so every step starts
  // both from the same point and measures that step's error alone.
  const dim1 = 1024, dim2 = 32, n = dim1 * dim2, lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  const r = new Rng(82);
  const p2 = randn(r, n, 0.1);
  const p1 = Float64Array.from(p2), m = new Float64Array(n), v = new Float64Array(n);
  let opt = new AdamW([{ name: 'p', numel: n }], { optim: 'adamw_8bit', beta1: b1, beta2: b2, eps, weightDecay: 0 });
  const code1 = createDynamicMap(true), code2 = createDynamicMap(false);
  const isclose = (a: number, b: number, atol: number, rtol: number) => Math.abs(a - b) <= atol + rtol * Math.abs(b);
  let worstErr = 0, worstRel = 0, worstStates = 0;
  for (let i = 0; i < 50; i++) {
    const t = i + 1;
    const g = randn(r, n, 0.01);
    const bc1 = 1 - b1 ** t, bc2 = 1 - b2 ** t;
    for (let k = 0; k < n; k++) {
      m[k] = b1 * m[k] + (1 - b1) * g[k];
      v[k] = b2 * v[k] + (1 - b2) * g[k] * g[k];
      p1[k] -= (lr / bc1) * m[k] / (Math.sqrt(v[k]) / Math.sqrt(bc2) + eps);
    }
    opt.update([p2], [g], lr);
    const st = state8(opt.exportState(), 'p');
    // dequantized states: fewer than 20 of n outside atol 3e-3, rtol 1e-3
    const deq1 = new Float64Array(n), deq2 = new Float64Array(n);
    let notClose1 = 0, notClose2 = 0;
    for (let k = 0; k < n; k++) {
      const blk = Math.floor(k / OPTIM8_BLOCKSIZE);
      deq1[k] = code1[st.state1[k]] * st.absmax1[blk];
      deq2[k] = code2[st.state2[k]] * st.absmax2[blk];
      if (!isclose(m[k], deq1[k], 3e-3, 1e-3)) notClose1++;
      if (!isclose(v[k], deq2[k], 3e-3, 1e-3)) notClose2++;
    }
    worstStates = Math.max(worstStates, notClose1, notClose2);
    assert.ok(notClose1 < 20 && notClose2 < 20, `step ${t}: ${notClose1} exp_avg and ${notClose2} exp_avg_sq values not close`);
    // params: mean |err| < 6e-5, mean relative error < 6e-4
    let err = 0, rel = 0;
    for (let k = 0; k < n; k++) {
      const e = Math.abs(p1[k] - p2[k]);
      err += e;
      rel += e / (Math.abs(p1[k]) + 1e-9);
    }
    err /= n; rel /= n;
    worstErr = Math.max(worstErr, err); worstRel = Math.max(worstRel, rel);
    assert.ok(err < 6e-5 && rel < 6e-4, `step ${t}: mean error ${err}, mean relative error ${rel}`);
    if (i % 10 === 0 && i > 0) {
      // assert_most_approx_close(p1, p2, patol, prtol, max_error_count=0): its signature is (a, b, rtol, atol), so
      // every element within rtol 1e-5, atol 1e-3; and the state survives a checkpoint
      for (let k = 0; k < n; k++) assert.ok(isclose(p1[k], p2[k], 1e-3, 1e-5), `step ${t} p[${k}]: ${p2[k]} vs 32-bit ${p1[k]}`);
      const saved = opt.exportState();
      opt.dispose();
      opt = new AdamW([{ name: 'p', numel: n }], { optim: 'adamw_8bit', beta1: b1, beta2: b2, eps, weightDecay: 0 });
      opt.importState(saved);
      assert.deepEqual(state8(opt.exportState(), 'p'), state8(saved, 'p'));
    }
    // keep the two together, as bitsandbytes' test does
    for (let k = 0; k < n; k++) { p2[k] = p1[k]; p1[k] = p2[k]; m[k] = deq1[k]; v[k] = deq2[k]; }
  }
  console.log(`# worst step: mean error ${worstErr.toExponential(2)} (< 6e-5), mean relative ${worstRel.toExponential(2)} (< 6e-4), ${worstStates} states not close (< 20)`);
  opt.dispose();
});
