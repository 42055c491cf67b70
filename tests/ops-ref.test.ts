// Tests of the float64 reference backend: hand-computed values, identities, and finite differences for every backward op.
// Sizes are tiny (tens to hundreds of elements) because the reference is O(naive) JS and finite differences
// call the forward twice per checked element; each test runs in milliseconds.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RefBackend, RefOpError, NF4_CODES, nf4DequantizeRef } from '../engine/backends/ref.ts';
import { quantizeNF4, dequantizeNF4 } from '../engine/formats/nf4.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';

const be = new RefBackend();

/** deterministic xorshift uniform [-1, 1) so failures reproduce */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    return s / 2 ** 31 - 1;
  };
}
function randn(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  return Float32Array.from({ length: n }, () => r() * scale);
}

/** Central finite difference of `loss` w.r.t. x[i], compared with analytic `grad[i]` for every i.
 *  Outputs are float32, so the loss carries ~1e-7 relative rounding; with h = 1e-2 that gives ~1e-5
 *  absolute noise, and truncation error O(h²) ~ 1e-4 for these smooth functions: tolerance 2e-3 + 2e-3·|g|. */
async function fdCheck(what: string, x: Float32Array, grad: ArrayLike<number>, loss: () => Promise<number>): Promise<void> {
  const h = 1e-2;
  for (let i = 0; i < x.length; i++) {
    const orig = x[i];
    x[i] = orig + h; const lp = await loss();
    x[i] = orig - h; const lm = await loss();
    x[i] = orig;
    const fd = (lp - lm) / (Math.fround(orig + h) - Math.fround(orig - h));
    const tol = 2e-3 + 2e-3 * Math.abs(fd);
    assert.ok(Math.abs(fd - grad[i]) <= tol, `${what}[${i}]: finite difference ${fd} vs analytic ${grad[i]}`);
  }
}
function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

test('NF4 code table has the bitsandbytes values (facts §1)', () => {
  assert.equal(NF4_CODES.length, 16);
  assert.equal(NF4_CODES[0], -1); assert.equal(NF4_CODES[7], 0); assert.equal(NF4_CODES[15], 1);
  assert.equal(NF4_CODES[8], 0.07958029955625534);
  assert.equal(NF4_CODES[3], -0.39491748809814453);
  // every code is a float32 value so lut·absmax is exact in float64
  for (const c of NF4_CODES) assert.equal(Math.fround(c), c);
});

test('nf4DequantizeRef: high nibble first, flat blocks across rows', () => {
  // 3 x 43 = 129 elements (odd, rows not block-aligned), blocksize 32 → 5 blocks
  const rows = 3, cols = 43, bs = 32, n = rows * cols;
  const packed = new Uint8Array(Math.ceil(n / 2));
  const r = rng(7);
  for (let i = 0; i < packed.length; i++) packed[i] = Math.floor((r() + 1) * 128) & 0xff;
  packed[0] = 0xf0; // element 0 → code 15 (+1), element 1 → code 0 (−1)
  const absmax = Float32Array.from({ length: Math.ceil(n / bs) }, (_, i) => 0.5 + i);
  const W: NF4Weight = { packed, absmax, rows, cols, blocksize: bs };
  const out = nf4DequantizeRef(W);
  assert.equal(out.length, n);
  assert.equal(out[0], 0.5); assert.equal(out[1], -0.5);
  // element 33 is in block 1 (absmax 1.5) and the LOW nibble of byte 16
  assert.equal(out[33], NF4_CODES[packed[16] & 0xf] * 1.5);
  assert.equal(out[128], NF4_CODES[packed[64] >> 4] * 4.5);
  // agrees with the independent dequantizer in engine/formats/nf4.ts
  const other = dequantizeNF4(W);
  for (let i = 0; i < n; i++) assert.equal(Math.fround(out[i]), other[i], `element ${i}`);
});

test('nf4 quantize→dequantize round trip through RefBackend.dequantNF4 stays within half a code step', async () => {
  const rows = 5, cols = 70, data = randn(rows * cols, 3);
  const W = quantizeNF4(data, rows, cols, 64);
  const out = new Float32Array(rows * cols);
  await be.dequantNF4(W, out);
  for (let i = 0; i < out.length; i++) {
    const amax = W.absmax[Math.floor(i / 64)];
    // largest gap between adjacent NF4 codes is −0.6962 − (−1) ≈ 0.304 → error ≤ 0.152·absmax
    assert.ok(Math.abs(out[i] - data[i]) <= 0.153 * amax + 1e-7, `element ${i}: ${out[i]} vs ${data[i]}`);
  }
});

test('gemm: hand-computed product, all transpose combos, alpha/beta, beta=0 ignores NaN', async () => {
  // A (2,3), B (3,2)
  const A = Float32Array.from([1, 2, 3, 4, 5, 6]);
  const B = Float32Array.from([7, 8, 9, 10, 11, 12]);
  const expect = [58, 64, 139, 154];
  const At = Float32Array.from([1, 4, 2, 5, 3, 6]);   // (3,2)
  const Bt = Float32Array.from([7, 9, 11, 8, 10, 12]); // (2,3)
  for (const [ta, tb] of [[false, false], [true, false], [false, true], [true, true]] as const) {
    const C = Float32Array.from([NaN, NaN, NaN, NaN]);
    await be.gemm(ta, tb, 2, 2, 3, 1, ta ? At : A, tb ? Bt : B, 0, C);
    assert.deepEqual(Array.from(C), expect, `transA=${ta} transB=${tb}`);
  }
  const C = Float32Array.from([1, 1, 1, 1]);
  await be.gemm(false, false, 2, 2, 3, 0.5, A, B, 2, C);
  assert.deepEqual(Array.from(C), expect.map((v) => v / 2 + 2));
});

test('gemmNF4 / gemmNF4T equal gemm with the dequantized weight', async () => {
  const N = 6, K = 37, M = 3; // K odd and not a multiple of the blocksize
  const W = quantizeNF4(randn(N * K, 11), N, K, 32);
  const Wf = new Float32Array(N * K);
  await be.dequantNF4(W, Wf);
  const X = randn(M * K, 12);
  const Y = new Float32Array(M * N), Yd = new Float32Array(M * N);
  await be.gemmNF4(M, X, W, 0, Y);
  await be.gemm(false, true, M, N, K, 1, X, Wf, 0, Yd);
  // gemmNF4 uses the exact float64 lut·absmax, Wf holds it rounded to float32: ≤ 2^-24 relative per term
  const close = (a: Float32Array, b: Float32Array, what: string) => {
    for (let i = 0; i < a.length; i++) assert.ok(Math.abs(a[i] - b[i]) <= 1e-5 * (1 + Math.abs(b[i])), `${what}[${i}]: ${a[i]} vs ${b[i]}`);
  };
  close(Y, Yd, 'Y');
  const DY = randn(M * N, 13);
  const DX = new Float32Array(M * K).fill(1), DXd = new Float32Array(M * K).fill(1);
  await be.gemmNF4T(M, DY, W, 1, DX);
  await be.gemm(false, false, M, K, N, 1, DY, Wf, 1, DXd);
  close(DX, DXd, 'DX');
});

test('rmsnorm forward value and backward by finite differences (dw accumulates)', async () => {
  const T = 3, C = 7, eps = 1e-5;
  const x = randn(T * C, 21), w = randn(C, 22), g = randn(T * C, 23);
  const out = new Float32Array(T * C), rstd = new Float32Array(T);
  await be.rmsnormForward(out, rstd, x, w, T, C, eps);
  const ms = dot(x.subarray(0, C), x.subarray(0, C)) / C;
  assert.ok(Math.abs(rstd[0] - 1 / Math.sqrt(ms + eps)) < 1e-6);
  assert.ok(Math.abs(out[2] - x[2] * w[2] / Math.sqrt(ms + eps)) < 1e-6);
  const loss = async () => {
    const o = new Float32Array(T * C), r = new Float32Array(T);
    await be.rmsnormForward(o, r, x, w, T, C, eps);
    return dot(o, g);
  };
  const dx = new Float32Array(T * C), dw = new Float32Array(C).fill(1);
  await be.rmsnormBackward(dx, dw, g, x, w, rstd, T, C);
  await fdCheck('dx', x, dx, loss);
  await fdCheck('dw', w, Array.from(dw, (v) => v - 1), loss);
});

test('rope: position 0 is identity, D=2 rotation by hand, inverse is the transpose', async () => {
  const half = 3, D = 2 * half, maxPos = 4, T = 3, nH = 2;
  const cos = new Float32Array(maxPos * half), sin = new Float32Array(maxPos * half);
  for (let p = 0; p < maxPos; p++) for (let i = 0; i < half; i++) {
    const th = p / 10000 ** (2 * i / D);
    cos[p * half + i] = Math.cos(th); sin[p * half + i] = Math.sin(th);
  }
  const x = randn(T * nH * D, 31);
  const pos0 = new Int32Array(T);
  const y0 = x.slice();
  await be.rope(y0, cos, sin, pos0, T, nH, D, false);
  assert.deepEqual(y0, x);
  const positions = Int32Array.from([3, 1, 2]);
  const y = x.slice();
  await be.rope(y, cos, sin, positions, T, nH, D, false);
  // element i=1 of head 1 of token 0 (position 3): pairs with i+half
  const o = (0 * nH + 1) * D, c = cos[3 * half + 1], s = sin[3 * half + 1];
  assert.ok(Math.abs(y[o + 1] - (x[o + 1] * c - x[o + 1 + half] * s)) < 1e-6);
  assert.ok(Math.abs(y[o + 1 + half] - (x[o + 1 + half] * c + x[o + 1] * s)) < 1e-6);
  // <dy, R x> = <Rᵀ dy, x>: the inverse rope is the backward of rope
  const dy = randn(T * nH * D, 32), rtdy = dy.slice();
  await be.rope(rtdy, cos, sin, positions, T, nH, D, true);
  assert.ok(Math.abs(dot(dy, y) - dot(rtdy, x)) < 1e-5);
  const back = y.slice();
  await be.rope(back, cos, sin, positions, T, nH, D, true);
  for (let i = 0; i < x.length; i++) assert.ok(Math.abs(back[i] - x[i]) < 1e-6);
  await assert.rejects(be.rope(x.slice(), cos, sin, Int32Array.from([0, 4, 0]), T, nH, D, false),
    (e: Error) => e.name === 'RefOpError' && /positions\[1\]=4/.test(e.message));
});

for (const [H, KV] of [[2, 2], [4, 2], [4, 1]] as const) {
  test(`attention H=${H} KV=${KV}: causal forward facts and backward by finite differences`, async () => {
    const B = 2, S = 4, D = 3, T = B * S;
    const q = randn(T * H * D, 41), k = randn(T * KV * D, 42), v = randn(T * KV * D, 43), g = randn(T * H * D, 44);
    const out = new Float32Array(T * H * D), lse = new Float32Array(B * H * S);
    await be.attentionForward(out, lse, q, k, v, B, S, H, KV, D);
    // first token of each sequence sees only itself: out = v, lse = q·k·scale
    const group = H / KV;
    for (let b = 0; b < B; b++) for (let h = 0; h < H; h++) {
      const t = b * S, kvh = Math.floor(h / group);
      for (let d = 0; d < D; d++) assert.ok(Math.abs(out[(t * H + h) * D + d] - v[(t * KV + kvh) * D + d]) < 1e-6);
      const s0 = dot(q.subarray((t * H + h) * D, (t * H + h + 1) * D), k.subarray((t * KV + kvh) * D, (t * KV + kvh + 1) * D)) / Math.sqrt(D);
      assert.ok(Math.abs(lse[(b * H + h) * S] - s0) < 1e-6);
    }
    const loss = async () => {
      const o = new Float32Array(T * H * D), l = new Float32Array(B * H * S);
      await be.attentionForward(o, l, q, k, v, B, S, H, KV, D);
      return dot(o, g);
    };
    const dq = new Float32Array(T * H * D), dk = new Float32Array(T * KV * D), dv = new Float32Array(T * KV * D);
    dk.fill(NaN); // assigned, not accumulated
    await be.attentionBackward(dq, dk, dv, g, q, k, v, out, lse, B, S, H, KV, D);
    await fdCheck('dq', q, dq, loss);
    await fdCheck('dk', k, dk, loss);
    await fdCheck('dv', v, dv, loss);
  });
}

test('swiglu forward value and backward by finite differences', async () => {
  const n = 9, gate = randn(n, 51, 3), up = randn(n, 52), g = randn(n, 53);
  const out = new Float32Array(n);
  await be.swigluForward(out, gate, up, n);
  assert.ok(Math.abs(out[4] - gate[4] / (1 + Math.exp(-gate[4])) * up[4]) < 1e-6);
  const loss = async () => { const o = new Float32Array(n); await be.swigluForward(o, gate, up, n); return dot(o, g); };
  const dgate = new Float32Array(n), dup = new Float32Array(n);
  await be.swigluBackward(dgate, dup, g, gate, up, n);
  await fdCheck('dgate', gate, dgate, loss);
  await fdCheck('dup', up, dup, loss);
});

test('embedding copies rows and rejects ids outside the vocabulary', async () => {
  const V = 5, C = 3, table = randn(V * C, 61), ids = Int32Array.from([4, 0, 4]);
  const out = new Float32Array(3 * C);
  await be.embeddingForward(out, ids, table, 3, C, V);
  assert.deepEqual(Array.from(out.subarray(0, C)), Array.from(table.subarray(4 * C, 5 * C)));
  assert.deepEqual(Array.from(out.subarray(C, 2 * C)), Array.from(table.subarray(0, C)));
  await assert.rejects(be.embeddingForward(out, Int32Array.from([0, 5, 1]), table, 3, C, V),
    (e: Error) => e instanceof RefOpError && /ids\[1\]=5/.test(e.message));
});

test('chunked cross-entropy: chunks combine to the full log-sum-exp; backward by finite differences', async () => {
  const T = 4, V = 11, logits = randn(T * V, 71, 4);
  const labels = Int32Array.from([3, -100, 10, 0]);
  const scale = Float32Array.from([0.5, 0, 0.5, 0.25]);
  const chunked = async (lg: Float32Array, chunk: number) => {
    const m = new Float32Array(T).fill(-Infinity), s = new Float32Array(T), picked = new Float32Array(T);
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0);
      const part = new Float32Array(T * Vc);
      for (let t = 0; t < T; t++) part.set(lg.subarray(t * V + v0, t * V + v0 + Vc), t * Vc);
      await be.crossEntropyChunkForward(part, labels, v0, T, Vc, m, s, picked);
    }
    return { m, s, picked };
  };
  const { m, s, picked } = await chunked(logits, 4); // 4 does not divide 11: a short last chunk
  const lse = new Float32Array(T);
  for (let t = 0; t < T; t++) {
    if (labels[t] < 0) { assert.equal(m[t], -Infinity); assert.equal(s[t], 0); continue; }
    let direct = 0;
    for (let j = 0; j < V; j++) direct += Math.exp(logits[t * V + j]);
    lse[t] = m[t] + Math.log(s[t]);
    assert.ok(Math.abs(lse[t] - Math.log(direct)) < 1e-5, `row ${t}: ${lse[t]} vs ${Math.log(direct)}`);
    assert.equal(picked[t], logits[t * V + labels[t]]);
  }
  const loss = async () => {
    const r = await chunked(logits, 4);
    let L = 0;
    for (let t = 0; t < T; t++) if (labels[t] >= 0) L += scale[t] * (r.m[t] + Math.log(r.s[t]) - r.picked[t]);
    return L;
  };
  // backward chunk by chunk too (v0 > 0 exercises the label offset), reassembled into [T, V]
  const grad = new Float32Array(T * V);
  for (let v0 = 0; v0 < V; v0 += 4) {
    const Vc = Math.min(4, V - v0), part = new Float32Array(T * Vc);
    for (let t = 0; t < T; t++) part.set(logits.subarray(t * V + v0, t * V + v0 + Vc), t * Vc);
    await be.crossEntropyChunkBackward(part, labels, v0, T, Vc, lse, scale);
    for (let t = 0; t < T; t++) grad.set(part.subarray(t * Vc, (t + 1) * Vc), t * V + v0);
  }
  for (let j = 0; j < V; j++) assert.equal(grad[V + j], 0); // ignored row
  await fdCheck('dlogits', logits, grad, loss);
});

test('length and blocksize errors name the op and the buffer', async () => {
  await assert.rejects(be.gemm(false, false, 2, 2, 3, 1, new Float32Array(5), new Float32Array(6), 0, new Float32Array(4)),
    (e: Error) => e.name === 'RefOpError' && /gemm: A has length 5, expected at least 6/.test(e.message));
  const W: NF4Weight = { packed: new Uint8Array(8), absmax: new Float32Array(1), rows: 4, cols: 4, blocksize: 48 };
  await assert.rejects(be.dequantNF4(W, new Float32Array(16)), /blocksize=48/);
  await assert.rejects(be.attentionForward(new Float32Array(24), new Float32Array(6), new Float32Array(24),
    new Float32Array(16), new Float32Array(16), 1, 2, 3, 2, 4), /H=3 must be a positive multiple of KV=2/);
});
