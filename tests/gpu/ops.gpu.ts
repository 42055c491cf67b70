// GPU op checks: every CUDA Backend op against the float64 CPU reference (engine/backends/ref.ts) on random inputs.
//
// Run by scripts/gpu-check.sh (not part of `npm test`); skipped, never passed, without a GPU. Sizes
// are small (every op well under a second, the reference dominates) but cross every tile edge the
// kernels have: 128/64 GEMM tiles, 32-row attention tiles, 256-thread rows, partial NF4 blocks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RefBackend, gemmRef, nf4DequantizeRef } from '../../engine/backends/ref.ts';
import { randomNF4 } from '../../engine/model/random-model.ts';
import type { NF4Weight } from '../../engine/formats/nf4.ts';
import { doubleQuantize, isDoubleQuant } from '../../engine/formats/nf4.ts';
import { CudaArgumentError, CudaError } from '../../cuda/index.ts';
import { assertClose, cuda, cudaFp32, maxAbs, randn, rng, skip } from './helpers.ts';

const ref = new RefBackend();
// float32 elementwise/row ops: both sides compute in fp32 vs fp64, different summation order and
// expf/sqrtf ulp errors; 1e-5 relative covers row reductions of a few hundred terms.
const FP32 = { rtol: 1e-5, atol: 1e-6 };

/** Worst-case bound for a GEMM whose operands were rounded: per output
 *  (unitRound·2 + K·2^-24)·Σ|a||b|, with unitRound 2^-8 for bf16 operands (2^-24 for fp32). */
function gemmBound(tA: boolean, tB: boolean, M: number, N: number, K: number, alpha: number, A: ArrayLike<number>,
  B: ArrayLike<number>, beta: number, C0: Float32Array, operandRound: number): Float64Array {
  const absA = Float64Array.from(A, Math.abs), absB = Float64Array.from(B, Math.abs);
  const b = new Float64Array(M * N);
  gemmRef(tA, tB, M, N, K, Math.abs(alpha), absA, absB, 0, b);
  const f = 2 * operandRound + (K + 4) * 2 ** -24;
  for (let i = 0; i < b.length; i++) b[i] = f * b[i] + (beta === 0 ? 0 : Math.abs(beta * C0[i]) * 2 ** -23) + 1e-30;
  return b;
}

test('gemm (bf16 tensor cores / fp32 SIMT) matches the reference for all transpose flags', { skip }, async () => {
  const r = rng(1);
  for (const [M, N, K] of [[37, 45, 70], [130, 260, 33], [1, 300, 129], [256, 128, 512], [5, 7, 0]]) {
    for (const tA of [false, true]) for (const tB of [false, true]) {
      const A = randn(r, M * K), B = randn(r, K * N), C0 = randn(r, M * N);
      for (const [be, unit, label] of [[cuda!, cuda!.gemmPrecision === 'bf16' ? 2 ** -8 : 2 ** -24, 'default'],
        [cudaFp32!, 2 ** -24, 'fp32']] as const) {
        for (const [alpha, beta] of [[1, 0], [0.7, 0.3]]) {
          const want = Float64Array.from(C0);
          gemmRef(tA, tB, M, N, K, alpha, A, B, beta, want);
          const got = Float32Array.from(C0);
          if (beta === 0) got.fill(NaN);  // beta = 0 must ignore C entirely
          await be.gemm(tA, tB, M, N, K, alpha, A, B, beta, got);
          assertClose(`gemm ${label} tA=${tA} tB=${tB} ${M}x${N}x${K} a=${alpha} b=${beta}`, got, want,
            { bound: gemmBound(tA, tB, M, N, K, alpha, A, B, beta, C0, unit) });
        }
      }
    }
  }
});

function nf4Cases(): NF4Weight[] {
  const r = rng(2);
  // odd element count (padded last byte), blocksizes 32/64/128, shapes that are not tile multiples
  const plain = [randomNF4(70, 96, 0.1, r, 64), randomNF4(7, 33, 0.2, r, 32), randomNF4(300, 129, 0.05, r, 128),
    randomNF4(256, 512, 0.05, r, 64)];
  // double-quantized absmax (bitsandbytes compress_statistics): one nested block, a partial last nested block
  // (605 blocks = 256 + 256 + 93), eight full ones, and a nested blocksize other than 256 (read from a checkpoint)
  const s64 = randomNF4(300, 129, 0.05, r, 64);
  return [...plain, randomNF4(70, 96, 0.1, r, 64, { doubleQuant: true }), randomNF4(300, 129, 0.05, r, 64, { doubleQuant: true }),
    randomNF4(256, 512, 0.05, r, 64, { doubleQuant: true }), { ...s64, absmax: doubleQuantize(s64.absmax, 64) }];
}

const label = (W: NF4Weight) => `[${W.rows},${W.cols}] blocksize ${W.blocksize}${isDoubleQuant(W.absmax) ? ` double-quant/${W.absmax.nestedBlocksize}` : ''}`;

test('dequantNF4 is bit-exact (lut·absmax is one correctly rounded fp32 product; a double-quantized absmax is bnb\'s f32 product + offset)', { skip }, async () => {
  for (const W of nf4Cases()) {
    const got = new Float32Array(W.rows * W.cols), want = new Float32Array(W.rows * W.cols);
    await cuda!.dequantNF4(W, got);
    await ref.dequantNF4(W, want);
    assert.deepEqual(got, want, `dequantNF4 ${label(W)}`);
  }
});

test('gemmNF4 and gemmNF4T (NF4 fused into the GEMM B loader) match the reference', { skip }, async () => {
  const r = rng(3);
  for (const W of nf4Cases()) {
    const N = W.rows, K = W.cols, Wd = nf4DequantizeRef(W);
    for (const [be, unit] of [[cuda!, cuda!.gemmPrecision === 'bf16' ? 2 ** -8 : 2 ** -24], [cudaFp32!, 2 ** -24]] as const) {
      for (const M of [1, 45, 130]) {
        for (const beta of [0, 0.5]) {
          const X = randn(r, M * K), Y0 = randn(r, M * N);
          const y = Float32Array.from(Y0), yRef = Float32Array.from(Y0);
          await be.gemmNF4(M, X, W, beta, y);
          await ref.gemmNF4(M, X, W, beta, yRef);
          assertClose(`gemmNF4 M=${M} W${label(W)} beta=${beta}`, y, yRef,
            { bound: gemmBound(false, true, M, N, K, 1, X, Wd, beta, Y0, unit) });
          const DY = randn(r, M * N), DX0 = randn(r, M * K);
          const dx = Float32Array.from(DX0), dxRef = Float32Array.from(DX0);
          await be.gemmNF4T(M, DY, W, beta, dx);
          await ref.gemmNF4T(M, DY, W, beta, dxRef);
          assertClose(`gemmNF4T M=${M} W${label(W)} beta=${beta}`, dx, dxRef,
            { bound: gemmBound(false, false, M, K, N, 1, DY, Wd, beta, DX0, unit) });
        }
      }
    }
  }
});

test('rmsnorm forward/backward match, dw accumulates and null dw is allowed', { skip }, async () => {
  const r = rng(4);
  for (const [T, C] of [[33, 300], [1, 4096], [5, 7]]) {
    const x = randn(r, T * C, 2), w = r.fillUniform(new Float32Array(C), 0.5, 1.5), eps = 1e-5;
    const out = new Float32Array(T * C), rstd = new Float32Array(T), outR = new Float32Array(T * C), rstdR = new Float32Array(T);
    await cuda!.rmsnormForward(out, rstd, x, w, T, C, eps);
    await ref.rmsnormForward(outR, rstdR, x, w, T, C, eps);
    assertClose('rmsnorm out', out, outR, FP32);
    assertClose('rmsnorm rstd', rstd, rstdR, FP32);
    const dout = randn(r, T * C), dw0 = randn(r, C);
    const dx = new Float32Array(T * C), dxR = new Float32Array(T * C), dw = Float32Array.from(dw0), dwR = Float32Array.from(dw0);
    await cuda!.rmsnormBackward(dx, dw, dout, x, w, rstdR, T, C);
    await ref.rmsnormBackward(dxR, dwR, dout, x, w, rstdR, T, C);
    assertClose('rmsnorm dx', dx, dxR, { rtol: 1e-4, atol: 1e-5 * maxAbs(dxR) });
    // dw sums T rows: fp32 accumulation error grows with T
    assertClose('rmsnorm dw (+=)', dw, dwR, { rtol: 1e-5, atol: 1e-6 * T * maxAbs(dwR) });
    const dx2 = new Float32Array(T * C);
    await cuda!.rmsnormBackward(dx2, null, dout, x, w, rstdR, T, C);
    assert.deepEqual(dx2, dx);
  }
});

test('rope forward and inverse match and inverse undoes forward', { skip }, async () => {
  const r = rng(5);
  const T = 20, nH = 3, D = 16, maxPos = 64;
  const cos = new Float32Array(maxPos * D / 2), sin = new Float32Array(maxPos * D / 2);
  for (let p = 0; p < maxPos; p++) for (let i = 0; i < D / 2; i++) {
    const a = p / 10000 ** (2 * i / D);
    cos[p * D / 2 + i] = Math.cos(a); sin[p * D / 2 + i] = Math.sin(a);
  }
  const pos = Int32Array.from({ length: T }, () => Math.floor(r.nextFloat() * maxPos));
  const x0 = randn(r, T * nH * D);
  for (const inverse of [false, true]) {
    const x = Float32Array.from(x0), xR = Float32Array.from(x0);
    await cuda!.rope(x, cos, sin, pos, T, nH, D, inverse);
    await ref.rope(xR, cos, sin, pos, T, nH, D, inverse);
    assertClose(`rope inverse=${inverse}`, x, xR, FP32);
  }
  const x = Float32Array.from(x0);
  await cuda!.rope(x, cos, sin, pos, T, nH, D, false);
  await cuda!.rope(x, cos, sin, pos, T, nH, D, true);
  assertClose('rope roundtrip', x, x0, { rtol: 1e-5, atol: 1e-6 });
  await assert.rejects(cuda!.rope(x, cos, sin, Int32Array.of(...pos.subarray(0, T - 1), maxPos), T, nH, D, false),
    (e: Error) => e instanceof CudaArgumentError && /positions\[19\]=64 outside/.test(e.message));
});

test('attention forward/backward (flash, causal GQA) match the reference', { skip }, async () => {
  const r = rng(6);
  // S=70 crosses two 32-row tiles with a partial third; D covers each register-tile size and a non-power of two
  for (const [B, S, H, KV, D] of [[2, 70, 4, 2, 16], [1, 33, 2, 2, 64], [1, 70, 8, 2, 128], [2, 9, 3, 1, 40], [1, 40, 2, 1, 256]]) {
    const T = B * S;
    const q = randn(r, T * H * D), k = randn(r, T * KV * D), v = randn(r, T * KV * D);
    const out = new Float32Array(T * H * D), lse = new Float32Array(B * H * S);
    const outR = new Float32Array(T * H * D), lseR = new Float32Array(B * H * S);
    await cuda!.attentionForward(out, lse, q, k, v, B, S, H, KV, D);
    await ref.attentionForward(outR, lseR, q, k, v, B, S, H, KV, D);
    const tag = `B${B} S${S} H${H} KV${KV} D${D}`;
    // outputs are convex combinations of v rows (|v| ~ 4): absolute error of fp32 exp/sum
    assertClose(`attention out ${tag}`, out, outR, { rtol: 1e-4, atol: 1e-5 * maxAbs(v) });
    assertClose(`attention lse ${tag}`, lse, lseR, { rtol: 1e-5, atol: 1e-5 });
    const dout = randn(r, T * H * D);
    const dq = new Float32Array(T * H * D), dk = new Float32Array(T * KV * D), dv = new Float32Array(T * KV * D);
    const dqR = new Float32Array(T * H * D), dkR = new Float32Array(T * KV * D), dvR = new Float32Array(T * KV * D);
    await cuda!.attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, B, S, H, KV, D);
    await ref.attentionBackward(dqR, dkR, dvR, dout, q, k, v, outR, lseR, B, S, H, KV, D);
    // gradients sum up to S·H/KV terms of mixed sign: tolerance relative to the tensor's scale
    assertClose(`attention dq ${tag}`, dq, dqR, { rtol: 1e-3, atol: 1e-4 * maxAbs(dqR) });
    assertClose(`attention dk ${tag}`, dk, dkR, { rtol: 1e-3, atol: 1e-4 * maxAbs(dkR) });
    assertClose(`attention dv ${tag}`, dv, dvR, { rtol: 1e-3, atol: 1e-4 * maxAbs(dvR) });
  }
});

test('swiglu forward/backward match, including saturated gates', { skip }, async () => {
  const r = rng(7);
  const n = 10007;
  const gate = randn(r, n, 3), up = randn(r, n), dout = randn(r, n);
  gate[0] = 30; gate[1] = -30; gate[2] = 0; gate[3] = -100;
  const out = new Float32Array(n), outR = new Float32Array(n);
  await cuda!.swigluForward(out, gate, up, n);
  await ref.swigluForward(outR, gate, up, n);
  assertClose('swiglu out', out, outR, FP32);
  const dg = new Float32Array(n), du = new Float32Array(n), dgR = new Float32Array(n), duR = new Float32Array(n);
  await cuda!.swigluBackward(dg, du, dout, gate, up, n);
  await ref.swigluBackward(dgR, duR, dout, gate, up, n);
  assertClose('swiglu dgate', dg, dgR, FP32);
  assertClose('swiglu dup', du, duR, FP32);
});

test('embedding is an exact gather and rejects out-of-range ids', { skip }, async () => {
  const r = rng(8);
  const T = 50, C = 77, V = 300;
  const table = randn(r, V * C), ids = Int32Array.from({ length: T }, () => Math.floor(r.nextFloat() * V));
  ids[0] = 0; ids[1] = V - 1;
  const out = new Float32Array(T * C), outR = new Float32Array(T * C);
  await cuda!.embeddingForward(out, ids, table, T, C, V);
  await ref.embeddingForward(outR, ids, table, T, C, V);
  assert.deepEqual(out, outR);
  ids[7] = V;
  await assert.rejects(cuda!.embeddingForward(out, ids, table, T, C, V),
    (e: Error) => e.name === 'CudaArgumentError' && /ids\[7\]=300 outside vocabulary/.test(e.message));
});

test('chunked cross-entropy forward over all chunks and backward match, ignore index skipped', { skip }, async () => {
  const r = rng(9);
  const T = 37, V = 1000, Vc = 300;  // last chunk is partial (100 columns)
  const logitsFull = randn(r, T * V, 3);
  const labels = Int32Array.from({ length: T }, () => Math.floor(r.nextFloat() * V));
  labels[3] = -100; labels[20] = -100;
  const state = () => ({ m: new Float32Array(T).fill(-Infinity), s: new Float32Array(T), picked: new Float32Array(T) });
  const g = state(), w = state();
  const chunk = (v0: number) => {
    const vc = Math.min(Vc, V - v0), out = new Float32Array(T * vc);
    for (let t = 0; t < T; t++) out.set(logitsFull.subarray(t * V + v0, t * V + v0 + vc), t * vc);
    return out;
  };
  for (let v0 = 0; v0 < V; v0 += Vc) {
    const vc = Math.min(Vc, V - v0), lg = chunk(v0);
    await cuda!.crossEntropyChunkForward(lg, labels, v0, T, vc, g.m, g.s, g.picked);
    await ref.crossEntropyChunkForward(lg, labels, v0, T, vc, w.m, w.s, w.picked);
  }
  assert.deepEqual(g.m, w.m);  // a max is exact
  assertClose('ce s', g.s, w.s, FP32);
  assert.deepEqual(g.picked, w.picked);  // copied logits
  assert.equal(g.m[3], -Infinity, 'ignored row was touched');
  const lse = Float32Array.from(w.m, (m, t) => (labels[t] < 0 ? 0 : m + Math.log(w.s[t])));
  const scale = new Float32Array(T).fill(1 / 35);
  for (let v0 = 0; v0 < V; v0 += Vc) {
    const vc = Math.min(Vc, V - v0), a = chunk(v0), b = chunk(v0);
    await cuda!.crossEntropyChunkBackward(a, labels, v0, T, vc, lse, scale);
    await ref.crossEntropyChunkBackward(b, labels, v0, T, vc, lse, scale);
    assertClose(`ce backward chunk ${v0}`, a, b, { rtol: 1e-5, atol: 1e-8 });
  }
});

test('argument errors are CudaArgumentError; device failures are CudaError and the backend keeps working', { skip }, async () => {
  await assert.rejects(cuda!.gemm(false, false, 4, 4, 4, 1, new Float32Array(15), new Float32Array(16), 0, new Float32Array(16)),
    (e: Error) => e.name === 'CudaArgumentError' && /A has length 15, expected at least 16/.test(e.message));
  // a staging slot far beyond device memory: cudaMalloc fails and must surface as a typed error
  assert.throws(() => cuda!.createPagedAdamW({ bits: 32, deviceBudgetBytes: 2 ** 42, pageElems: 2 ** 37 }),
    (e: Error) => e instanceof CudaError && e.name === 'CudaError' && e.status === 2 && /cudaMalloc|out of memory/i.test(e.message));
  const C = new Float32Array(4);
  await cuda!.gemm(false, false, 2, 2, 1, 1, Float32Array.of(1, 2), Float32Array.of(3, 4), 0, C);
  assert.deepEqual(C, Float32Array.of(3, 4, 6, 8));
});
