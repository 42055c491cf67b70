// Gemma's ops (GeGLU with the tanh GELU, soft-capping, attention with a scale, a logit soft-cap and a sliding window):
// the float64 RefBackend against hand-written formulas and finite differences, the native C++ backend against the
// RefBackend on shapes that cross its 64-row attention blocks, including windows that end inside a block.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { NativeBackend } from '../engine/backends/native.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import type { AttentionOptions } from '../engine/backend.ts';

const ref = new RefBackend();
const nb = new NativeBackend({ threads: 2 });
after(() => nb.dispose());

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 2 ** 31 - 1;
  };
}
const randn = (n: number, seed: number, scale = 1) => { const r = rng(seed); return Float32Array.from({ length: n }, () => r() * scale); };
const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => { let s = 0; for (let i = 0; i < a.length; i++) s += a[i] * b[i]; return s; };

/** central finite differences vs the analytic gradient; float32 outputs with h = 1e-2: tolerance 2e-3 + 2e-3·|g|
 *  (as tests/ops-ref.test.ts argues) */
async function fdCheck(what: string, x: Float32Array, grad: ArrayLike<number>, loss: () => Promise<number>): Promise<void> {
  const h = 1e-2;
  for (let i = 0; i < x.length; i++) {
    const orig = x[i];
    x[i] = orig + h; const lp = await loss();
    x[i] = orig - h; const lm = await loss();
    x[i] = orig;
    const fd = (lp - lm) / (Math.fround(orig + h) - Math.fround(orig - h));
    assert.ok(Math.abs(fd - grad[i]) <= 2e-3 + 2e-3 * Math.abs(fd), `${what}[${i}]: finite difference ${fd} vs analytic ${grad[i]}`);
  }
}
function close(what: string, got: Float32Array, want: Float32Array, atol: number, rtol: number): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < got.length; i++) {
    if (!(Math.abs(got[i] - want[i]) <= atol + rtol * Math.abs(want[i]))) assert.fail(`${what}[${i}]: native ${got[i]} vs ref ${want[i]}`);
  }
}

test('geglu: torch gelu(approximate="tanh") · up, backward by finite differences', async () => {
  const n = 11, gate = randn(n, 1, 4), up = randn(n, 2), g = randn(n, 3);
  const out = new Float32Array(n);
  await ref.gegluForward(out, gate, up, n);
  for (let i = 0; i < n; i++) {
    const x = gate[i];
    const want = 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))) * up[i];
    assert.ok(Math.abs(out[i] - want) <= 1e-6 * Math.max(1, Math.abs(want)), `geglu[${i}] ${out[i]} vs ${want}`);
  }
  const loss = async () => { const o = new Float32Array(n); await ref.gegluForward(o, gate, up, n); return dot(o, g); };
  const dgate = new Float32Array(n), dup = new Float32Array(n);
  await ref.gegluBackward(dgate, dup, g, gate, up, n);
  await fdCheck('dgate', gate, dgate, loss);
  await fdCheck('dup', up, dup, loss);
});

test('softcap: cap·tanh(x/cap), in place, backward by finite differences', async () => {
  const n = 9, x = randn(n, 4, 12), g = randn(n, 5), cap = 5;
  const y = new Float32Array(n);
  await ref.softcapForward(y, x, cap, n);
  for (let i = 0; i < n; i++) assert.ok(Math.abs(y[i] - cap * Math.tanh(x[i] / cap)) < 1e-6);
  const inPlace = Float32Array.from(x);
  await ref.softcapForward(inPlace, inPlace, cap, n);
  assert.deepEqual(inPlace, y);
  const loss = async () => { const o = new Float32Array(n); await ref.softcapForward(o, x, cap, n); return dot(o, g); };
  const dx = new Float32Array(n).fill(NaN);
  await ref.softcapBackward(dx, g, x, cap, n);
  await fdCheck('dx', x, dx, loss);
  await assert.rejects(ref.softcapForward(y, x, 0, n), /cap must be > 0/);
});

test('attention with scale, soft-cap and sliding window: masked float64 softmax by hand, backward by finite differences', async () => {
  const B = 2, S = 6, H = 4, KV = 2, D = 3, T = B * S;
  const opts: AttentionOptions = { scale: 0.37, softcap: 1.5, window: 3 };
  const q = randn(T * H * D, 41, 2), k = randn(T * KV * D, 42, 2), v = randn(T * KV * D, 43), g = randn(T * H * D, 44);
  const out = new Float32Array(T * H * D), lse = new Float32Array(B * H * S);
  await ref.attentionForward(out, lse, q, k, v, B, S, H, KV, D, opts);
  for (let b = 0; b < B; b++) for (let h = 0; h < H; h++) for (let i = 0; i < S; i++) {
    const kvh = Math.floor(h / 2), qo = ((b * S + i) * H + h) * D;
    const js = [i - 2, i - 1, i].filter((j) => j >= 0); // window 3: keys i-2..i
    const s = js.map((j) => 1.5 * Math.tanh(0.37 * dot(q.subarray(qo, qo + D), k.subarray(((b * S + j) * KV + kvh) * D, ((b * S + j) * KV + kvh + 1) * D)) / 1.5));
    const z = s.reduce((a, x) => a + Math.exp(x), 0);
    assert.ok(Math.abs(lse[(b * H + h) * S + i] - Math.log(z)) < 1e-5);
    for (let d = 0; d < D; d++) {
      const want = js.reduce((a, j, n) => a + Math.exp(s[n]) / z * v[((b * S + j) * KV + kvh) * D + d], 0);
      assert.ok(Math.abs(out[qo + d] - want) < 1e-5, `out ${b} ${h} ${i} ${d}: ${out[qo + d]} vs ${want}`);
    }
  }
  const loss = async () => {
    const o = new Float32Array(T * H * D), l = new Float32Array(B * H * S);
    await ref.attentionForward(o, l, q, k, v, B, S, H, KV, D, opts);
    return dot(o, g);
  };
  const dq = new Float32Array(T * H * D), dk = new Float32Array(T * KV * D).fill(NaN), dv = new Float32Array(T * KV * D);
  await ref.attentionBackward(dq, dk, dv, g, q, k, v, out, lse, B, S, H, KV, D, opts);
  await fdCheck('dq', q, dq, loss);
  await fdCheck('dk', k, dk, loss);
  await fdCheck('dv', v, dv, loss);
  await assert.rejects(ref.attentionForward(out, lse, q, k, v, B, S, H, KV, D, { window: 1.5 }), /window must be a non-negative integer/);
  await assert.rejects(nb.attentionForward(out, lse, q, k, v, B, S, H, KV, D, { softcap: -1 }), /attentionForward: attention: softcap must be >= 0/);
});

test('native: geglu, softcap (in place too) and attention with options match the reference across 64-row blocks', async () => {
  const n = 1000, gate = randn(n, 7, 5), up = randn(n, 8), d = randn(n, 9);
  const on = new Float32Array(n), or = new Float32Array(n);
  await nb.gegluForward(on, gate, up, n); await ref.gegluForward(or, gate, up, n);
  close('geglu', on, or, 1e-6, 1e-5);
  const gn = [new Float32Array(n), new Float32Array(n)], gr = [new Float32Array(n), new Float32Array(n)];
  await nb.gegluBackward(gn[0], gn[1], d, gate, up, n); await ref.gegluBackward(gr[0], gr[1], d, gate, up, n);
  close('geglu dgate', gn[0], gr[0], 1e-6, 1e-5); close('geglu dup', gn[1], gr[1], 1e-6, 1e-5);
  const x = randn(n, 10, 40), cn = Float32Array.from(x), cr = new Float32Array(n);
  await nb.softcapForward(cn, cn, 30, n); await ref.softcapForward(cr, x, 30, n);
  close('softcap', cn, cr, 1e-5, 1e-6);
  const dn = Float32Array.from(d), dr = new Float32Array(n);
  await nb.softcapBackward(dn, dn, x, 30, n); await ref.softcapBackward(dr, d, x, 30, n);
  close('softcap dx', dn, dr, 1e-6, 1e-5);
  // softmax via a polynomial exp and float32 dot products: tolerances of tests/ops-native.test.ts's attention test
  for (const [B, S, H, KV, D, opts] of [
    [1, 150, 2, 1, 16, { scale: 0.21, softcap: 2.0, window: 37 }],
    [2, 70, 4, 2, 8, { scale: 0.3, window: 64 }],
    [1, 130, 2, 2, 8, { softcap: 1.0, window: 1 }],
    [2, 9, 2, 1, 4, { scale: 0.5, softcap: 50, window: 100 }],
  ] as const) {
    const T = B * S;
    const q = randn(T * H * D, S + 1, 1.5), k = randn(T * KV * D, S + 2, 1.5), v = randn(T * KV * D, S + 3);
    const o1 = new Float32Array(T * H * D), o2 = new Float32Array(T * H * D), l1 = new Float32Array(B * H * S), l2 = new Float32Array(B * H * S);
    await nb.attentionForward(o1, l1, q, k, v, B, S, H, KV, D, opts);
    await ref.attentionForward(o2, l2, q, k, v, B, S, H, KV, D, opts);
    const tag = `B=${B} S=${S} H=${H} KV=${KV} D=${D} ${JSON.stringify(opts)}`;
    close(`out ${tag}`, o1, o2, 1e-5, 1e-4); close(`lse ${tag}`, l1, l2, 1e-5, 1e-5);
    const dout = randn(T * H * D, S + 4);
    const nan = (m: number) => new Float32Array(m).fill(NaN);
    const a = [nan(T * H * D), nan(T * KV * D), nan(T * KV * D)], r = [new Float32Array(T * H * D), new Float32Array(T * KV * D), new Float32Array(T * KV * D)];
    await nb.attentionBackward(a[0], a[1], a[2], dout, q, k, v, o1, l1, B, S, H, KV, D, opts);
    await ref.attentionBackward(r[0], r[1], r[2], dout, q, k, v, o2, l2, B, S, H, KV, D, opts);
    close(`dq ${tag}`, a[0], r[0], 5e-5, 1e-4); close(`dk ${tag}`, a[1], r[1], 5e-5, 1e-4); close(`dv ${tag}`, a[2], r[2], 5e-5, 1e-4);
  }
});
