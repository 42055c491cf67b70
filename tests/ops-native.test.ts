// Native C++ backend vs the float64 RefBackend on random shapes (odd sizes, M=1, ragged tiles), error cases, and event-loop liveness.
// Shapes are small (≤ ~100 per dim) because the reference is naive JS; the GEMM shapes still cross the
// native tile edges (MR=6, NR=32, KC=256) so packing tails and depth-block accumulation are exercised.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { NativeBackend, NativeOpError } from '../engine/backends/native.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { createBackend } from '../engine/backends/index.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { dequantizeNF4, doubleQuantize } from '../engine/formats/nf4.ts';

// the backends by kind, as bin/swarmtune.ts registers them
registerBuiltinBackends();

const nb = new NativeBackend({ threads: 2 });
const ref = new RefBackend();
after(() => nb.dispose());

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
function randNF4(rows: number, cols: number, blocksize: number, seed: number): NF4Weight {
  const n = rows * cols, r = rng(seed);
  const packed = Uint8Array.from({ length: Math.ceil(n / 2) }, () => Math.floor((r() + 1) * 128) & 0xff);
  const absmax = Float32Array.from({ length: Math.ceil(n / blocksize) }, () => 0.05 + Math.abs(r()));
  return { packed, absmax, rows, cols, blocksize };
}
/** |got − want| ≤ atol + rtol·|want| elementwise, reporting the first offender */
function close(what: string, got: Float32Array, want: Float32Array, atol: number, rtol: number): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < got.length; i++) {
    const ok = Math.abs(got[i] - want[i]) <= atol + rtol * Math.abs(want[i]);
    if (!ok) assert.fail(`${what}[${i}]: native ${got[i]} vs ref ${want[i]}`);
  }
}

test('gemm: all trans combos, odd sizes, M=1, K across depth blocks, beta 0 (ignores NaN) and 1', async () => {
  // float32 dot products of length K: error ~ sqrt(K)·2^-24·Σ|a·b|; with |a|,|b| ≤ 1 and K ≤ 600,
  // 2e-5·K^0.5 absolute covers it with margin (observed ~1e-5)
  const shapes = [[1, 1, 1], [1, 70, 33], [3, 45, 20], [4, 40, 70], [5, 1, 17], [7, 33, 300], [13, 65, 513], [6, 32, 256], [37, 97, 600], [64, 5, 40], [50, 16, 300], [29, 17, 64], [9, 130, 300], [16, 129, 40], [4, 200, 33]];
  let seed = 100;
  for (const [M, N, K] of shapes) for (const ta of [false, true]) for (const tb of [false, true]) for (const beta of [0, 1]) {
    const A = randn(M * K, seed++), B = randn(K * N, seed++);
    const C0 = beta === 0 ? new Float32Array(M * N).fill(NaN) : randn(M * N, seed++);
    const Cn = C0.slice(), Cr = C0.slice();
    await nb.gemm(ta, tb, M, N, K, 0.75, A, B, beta, Cn);
    await ref.gemm(ta, tb, M, N, K, 0.75, A, B, beta, Cr);
    close(`gemm ${M}x${N}x${K} tA=${ta} tB=${tb} beta=${beta}`, Cn, Cr, 2e-5 * Math.sqrt(K), 1e-5);
  }
});

test('gemm works on subarray views (byteOffset ≠ 0) and K=0', async () => {
  const M = 9, N = 40, K = 31;
  const big = randn(1000 + M * K, 7), A = big.subarray(1000, 1000 + M * K);
  const B = randn(K * N, 8), Cn = new Float32Array(M * N + 3).fill(5).subarray(3), Cr = new Float32Array(M * N);
  await nb.gemm(false, false, M, N, K, 1, A, B, 0, Cn);
  await ref.gemm(false, false, M, N, K, 1, A, B, 0, Cr);
  close('subarray gemm', Cn, Cr, 2e-4, 1e-5);
  const C = Float32Array.from([1, 2, NaN]);
  await nb.gemm(false, false, 1, 3, 0, 1, new Float32Array(0), new Float32Array(0), 0, C);
  assert.deepEqual(Array.from(C), [0, 0, 0]);
});

test('NF4: dequant, fused x·Wᵀ and dY·W match the reference (odd counts, cols not a multiple of blocksize)', async () => {
  // dequant: native rounds lut·absmax to float32 once (≤ 2^-24 relative); the GEMMs add K-length float32 sums
  const cases = [[3, 43, 32], [17, 129, 64], [33, 70, 128], [1, 7, 64], [40, 300, 64]] as const;
  let seed = 300;
  for (const [rows, cols, bs] of cases) {
    const W = randNF4(rows, cols, bs, seed++);
    const dn = new Float32Array(rows * cols), dr = new Float32Array(rows * cols);
    await nb.dequantNF4(W, dn);
    await ref.dequantNF4(W, dr);
    close(`dequant ${rows}x${cols}/${bs}`, dn, dr, 0, 1.2e-7);
    for (const M of [1, 3, 7, 50]) {
      const X = randn(M * cols, seed++), Yn = randn(M * rows, seed), Yr = Yn.slice();
      for (const beta of [0, 1]) {
        await nb.gemmNF4(M, X, W, beta, Yn);
        await ref.gemmNF4(M, X, W, beta, Yr);
        close(`gemmNF4 M=${M} ${rows}x${cols}/${bs} beta=${beta}`, Yn, Yr, 3e-5 * Math.sqrt(cols), 1e-5);
      }
      const DY = randn(M * rows, seed++), DXn = randn(M * cols, seed), DXr = DXn.slice();
      for (const beta of [0, 1]) {
        await nb.gemmNF4T(M, DY, W, beta, DXn);
        await ref.gemmNF4T(M, DY, W, beta, DXr);
        close(`gemmNF4T M=${M} ${rows}x${cols}/${bs} beta=${beta}`, DXn, DXr, 3e-5 * Math.sqrt(rows), 1e-5);
      }
    }
  }
});

test('NF4 double quantization: the nested absmax decoded in the panel packing gives the reference bits, fused GEMMs match', async () => {
  // every path of nf4_decode_run (AVX-512 runs of 16, runs straddling two blocks, the scalar tail, M < 4 streaming,
  // packed panels) reads the 8-bit absmax; dequant must equal the reference bit for bit (bitsandbytes' float32
  // product, then + offset: a fused multiply-add would differ in ~10% of blocks)
  const cases = [[300, 129, 64, 256], [128, 256, 32, 256], [40, 300, 64, 64], [3, 43, 32, 256], [700, 64, 64, 4096]] as const;
  let seed = 900;
  for (const [rows, cols, bs, nbs] of cases) {
    const plain = randNF4(rows, cols, bs, seed++);
    const W: NF4Weight = { ...plain, absmax: doubleQuantize(plain.absmax as Float32Array, nbs) };
    const what = `${rows}x${cols}/${bs} nested ${nbs}`;
    const dn = new Float32Array(rows * cols), dr = new Float32Array(rows * cols);
    await nb.dequantNF4(W, dn);
    await ref.dequantNF4(W, dr);
    assert.deepEqual(dn, dr, `dequant ${what}`);
    assert.deepEqual(dn, dequantizeNF4(W), `dequant ${what} vs engine/formats/nf4.ts`);
    for (const M of [1, 3, 7, 50]) {
      const X = randn(M * cols, seed++), Yn = randn(M * rows, seed), Yr = Yn.slice();
      await nb.gemmNF4(M, X, W, 1, Yn);
      await ref.gemmNF4(M, X, W, 1, Yr);
      close(`gemmNF4 M=${M} ${what}`, Yn, Yr, 3e-5 * Math.sqrt(cols), 1e-5);
      const DY = randn(M * rows, seed++), DXn = new Float32Array(M * cols).fill(NaN), DXr = new Float32Array(M * cols);
      await nb.gemmNF4T(M, DY, W, 0, DXn);
      await ref.gemmNF4T(M, DY, W, 0, DXr);
      close(`gemmNF4T M=${M} ${what}`, DXn, DXr, 3e-5 * Math.sqrt(rows), 1e-5);
    }
  }
  const plain = randNF4(64, 64, 64, 5);
  const dq = doubleQuantize(plain.absmax as Float32Array);
  const out = new Float32Array(64 * 64);
  await assert.rejects(nb.dequantNF4({ ...plain, absmax: { ...dq, nestedBlocksize: 100 } }, out),
    (e: Error) => e instanceof NativeOpError && /dequantNF4: W\.absmax\.nestedBlocksize=100 must be a power of two in 64\.\.4096/.test(e.message));
  await assert.rejects(nb.dequantNF4({ ...plain, absmax: { ...dq, codes: dq.codes.subarray(1) } }, out), /W\.absmax\.codes has length 63, expected at least 64/);
  await assert.rejects(nb.dequantNF4({ ...plain, absmax: { ...dq, code: dq.code.subarray(0, 16) } }, out), /W\.absmax\.code has length 16, expected at least 256/);
  await assert.rejects(nb.dequantNF4({ ...plain, absmax: { ...dq, offset: 0.1 } }, out), /W\.absmax\.offset=0\.1(0*1)? must be a finite float32 value/);
  await assert.rejects(ref.dequantNF4({ ...plain, absmax: { ...dq, nestedAbsmax: new Float32Array(0) } }, out), { name: 'RefOpError', message: /nestedAbsmax has 0 entries/ });
});

test('rmsnorm, swiglu, embedding, rope match the reference', async () => {
  // elementwise float32 math against float64: a few ulp (rtol 1e-5); rmsnorm sums C squares in float32
  for (const [T, C] of [[1, 1], [5, 33], [19, 130]] as const) {
    const x = randn(T * C, T + C), w = randn(C, 2 * C), g = randn(T * C, 3 * C);
    const on = new Float32Array(T * C), or = new Float32Array(T * C), rn = new Float32Array(T), rr = new Float32Array(T);
    await nb.rmsnormForward(on, rn, x, w, T, C, 1e-5);
    await ref.rmsnormForward(or, rr, x, w, T, C, 1e-5);
    close('rmsnorm out', on, or, 1e-6, 2e-5); close('rmsnorm rstd', rn, rr, 0, 2e-5);
    const dxn = new Float32Array(T * C), dxr = new Float32Array(T * C);
    const dwn = new Float32Array(C).fill(0.5), dwr = dwn.slice();
    await nb.rmsnormBackward(dxn, dwn, g, x, w, rr, T, C);
    await ref.rmsnormBackward(dxr, dwr, g, x, w, rr, T, C);
    close('rmsnorm dx', dxn, dxr, 1e-5, 1e-4); close('rmsnorm dw', dwn, dwr, 1e-5, 1e-4);
    await nb.rmsnormBackward(dxn, null, g, x, w, rr, T, C); // frozen norm: no dw
    close('rmsnorm dx (no dw)', dxn, dxr, 1e-5, 1e-4);
  }
  for (const n of [1, 15, 1000, 70001]) {
    const gate = randn(n, n, 6), up = randn(n, n + 1), d = randn(n, n + 2);
    const on = new Float32Array(n), or = new Float32Array(n);
    await nb.swigluForward(on, gate, up, n); await ref.swigluForward(or, gate, up, n);
    close('swiglu out', on, or, 1e-7, 1e-5);
    const a = new Float32Array(n), b = new Float32Array(n), c = new Float32Array(n), e = new Float32Array(n);
    await nb.swigluBackward(a, b, d, gate, up, n); await ref.swigluBackward(c, e, d, gate, up, n);
    close('swiglu dgate', a, c, 1e-7, 1e-5); close('swiglu dup', b, e, 1e-7, 1e-5);
  }
  const V = 50, C = 17, T = 23, table = randn(V * C, 9);
  const ids = Int32Array.from({ length: T }, (_, i) => (i * 7) % V);
  const en = new Float32Array(T * C), er = new Float32Array(T * C);
  await nb.embeddingForward(en, ids, table, T, C, V); await ref.embeddingForward(er, ids, table, T, C, V);
  assert.deepEqual(en, er);
  const half = 8, D = 16, maxPos = 40, H = 3;
  const cos = randn(maxPos * half, 10), sin = randn(maxPos * half, 11);
  const pos = Int32Array.from({ length: T }, (_, i) => (i * 5) % maxPos);
  for (const inverse of [false, true]) {
    const xn = randn(T * H * D, 12), xr = xn.slice();
    await nb.rope(xn, cos, sin, pos, T, H, D, inverse); await ref.rope(xr, cos, sin, pos, T, H, D, inverse);
    close(`rope inverse=${inverse}`, xn, xr, 1e-6, 1e-5);
  }
});

test('attention forward/backward match the reference for GQA ratios 1, 2, 4', async () => {
  // softmax via a polynomial exp (≈2 ulp) and float32 dot products over D and S: 1e-5 abs + 1e-4 rel on
  // O(1) values; backward sums over S rows and the query heads of a group, hence 5e-5 absolute
  for (const [B, S, H, KV, D] of [[1, 1, 1, 1, 4], [2, 7, 2, 2, 8], [2, 37, 4, 2, 16], [1, 20, 8, 2, 64], [3, 5, 4, 1, 6]] as const) {
    const T = B * S, r = 0.5;
    const q = randn(T * H * D, S + 1, r * 3), k = randn(T * KV * D, S + 2, r * 3), v = randn(T * KV * D, S + 3);
    const on = new Float32Array(T * H * D), or = new Float32Array(T * H * D);
    const ln = new Float32Array(B * H * S), lr = new Float32Array(B * H * S);
    await nb.attentionForward(on, ln, q, k, v, B, S, H, KV, D);
    await ref.attentionForward(or, lr, q, k, v, B, S, H, KV, D);
    const tag = `B=${B} S=${S} H=${H} KV=${KV} D=${D}`;
    close(`attn out ${tag}`, on, or, 1e-5, 1e-4); close(`attn lse ${tag}`, ln, lr, 1e-5, 1e-5);
    const dout = randn(T * H * D, S + 4);
    const g = (n: number) => new Float32Array(n).fill(NaN); // outputs are assigned, never accumulated
    const dqn = g(T * H * D), dkn = g(T * KV * D), dvn = g(T * KV * D);
    const dqr = new Float32Array(T * H * D), dkr = new Float32Array(T * KV * D), dvr = new Float32Array(T * KV * D);
    await nb.attentionBackward(dqn, dkn, dvn, dout, q, k, v, on, ln, B, S, H, KV, D);
    await ref.attentionBackward(dqr, dkr, dvr, dout, q, k, v, or, lr, B, S, H, KV, D);
    close(`attn dq ${tag}`, dqn, dqr, 5e-5, 1e-4); close(`attn dk ${tag}`, dkn, dkr, 5e-5, 1e-4);
    close(`attn dv ${tag}`, dvn, dvr, 5e-5, 1e-4);
  }
});

test('chunked cross-entropy forward/backward match the reference (ignored rows, label in later chunk)', async () => {
  const T = 9, V = 103, chunk = 40; // 40 does not divide 103: a short last chunk
  const logits = randn(T * V, 77, 8);
  const labels = Int32Array.from([0, 102, -100, 55, 39, 40, -100, 80, 7]);
  const run = async (be: NativeBackend | RefBackend) => {
    const m = new Float32Array(T).fill(-Infinity), s = new Float32Array(T), picked = new Float32Array(T);
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0), part = new Float32Array(T * Vc);
      for (let t = 0; t < T; t++) part.set(logits.subarray(t * V + v0, t * V + v0 + Vc), t * Vc);
      await be.crossEntropyChunkForward(part, labels, v0, T, Vc, m, s, picked);
    }
    const lse = Float32Array.from(m, (mt, t) => labels[t] < 0 ? 0 : mt + Math.log(s[t]));
    const scale = Float32Array.from(labels, (l) => l < 0 ? 0 : 0.125);
    const grads: Float32Array[] = [];
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0), part = new Float32Array(T * Vc);
      for (let t = 0; t < T; t++) part.set(logits.subarray(t * V + v0, t * V + v0 + Vc), t * Vc);
      await be.crossEntropyChunkBackward(part, labels, v0, T, Vc, lse, scale);
      grads.push(part);
    }
    return { lse, picked, grad: Float32Array.from(grads.flatMap((g) => Array.from(g))) };
  };
  const a = await run(nb), b = await run(ref);
  close('ce lse', a.lse, b.lse, 1e-5, 1e-6);  // sum of float32 exps, accumulated in double
  close('ce picked', a.picked, b.picked, 0, 0);
  close('ce grad', a.grad, b.grad, 1e-7, 1e-5);
});

test('bad arguments reject with NativeOpError naming the op and buffer, never crash', async () => {
  const is = (re: RegExp) => (e: Error) => e instanceof NativeOpError && e.name === 'NativeOpError' && re.test(e.message);
  await assert.rejects(nb.gemm(false, false, 2, 2, 3, 1, new Float32Array(5), new Float32Array(6), 0, new Float32Array(4)),
    is(/^gemm: A has length 5, expected at least 6/));
  await assert.rejects(nb.gemm(false, false, 2, 2, 3, 1, new Float64Array(6) as unknown as Float32Array, new Float32Array(6), 0, new Float32Array(4)),
    is(/gemm: A must be a Float32Array/));
  await assert.rejects(nb.gemm(false, false, -1, 2, 3, 1, new Float32Array(6), new Float32Array(6), 0, new Float32Array(4)),
    is(/M=-1 must be an integer/));
  await assert.rejects(nb.embeddingForward(new Float32Array(6), Int32Array.from([0, 5, 1]), new Float32Array(15), 3, 2, 5),
    is(/embeddingForward: ids\[1\]=5 outside vocabulary \[0, 5\)/));
  await assert.rejects(nb.embeddingForward(new Float32Array(6), Int32Array.from([0, -1, 1]), new Float32Array(15), 3, 2, 5),
    is(/ids\[1\]=-1/));
  const W = randNF4(4, 4, 32, 1);
  await assert.rejects(nb.gemmNF4(2, new Float32Array(8), { ...W, blocksize: 48 }, 0, new Float32Array(8)), is(/W.blocksize=48/));
  await assert.rejects(nb.gemmNF4(2, new Float32Array(8), { ...W, packed: new Uint8Array(7) }, 0, new Float32Array(8)),
    is(/W.packed has length 7, expected at least 8/));
  await assert.rejects(nb.rope(new Float32Array(8), new Float32Array(4), new Float32Array(4), Int32Array.from([0, 2]), 2, 1, 4, false),
    is(/rope: positions\[1\]=2 outside the cos\/sin table of 2 rows/));
  await assert.rejects(nb.attentionForward(new Float32Array(24), new Float32Array(6), new Float32Array(24),
    new Float32Array(16), new Float32Array(16), 1, 2, 3, 2, 4), is(/H=3 must be a positive multiple of KV=2/));
  const gone = new NativeBackend({ threads: 1 });
  gone.dispose();
  await assert.rejects(gone.swigluForward(new Float32Array(1), new Float32Array(1), new Float32Array(1), 1), is(/disposed/));
});

test('the event loop keeps running while a long GEMM computes', async () => {
  // 1536³ ≈ 7.2 GFLOP on ONE thread: ≥ 50 ms even on a fast core (~80 ms here, seconds under contention),
  // so a 1 ms interval must tick many times; it could not tick at all if the GEMM ran on the JS thread
  const one = new NativeBackend({ threads: 1 });
  const n = 1536, A = randn(n * n, 1), B = randn(n * n, 2), C = new Float32Array(n * n);
  let ticks = 0;
  const timer = setInterval(() => { ticks++; }, 1);
  const t0 = performance.now();
  try {
    await one.gemm(false, false, n, n, n, 1, A, B, 0, C);
  } finally {
    clearInterval(timer);
    one.dispose();
  }
  const ms = performance.now() - t0;
  assert.ok(ticks >= 5, `only ${ticks} timer ticks during a ${ms.toFixed(0)} ms GEMM`);
  // spot-check one element so the GEMM was real
  let want = 0;
  for (let p = 0; p < n; p++) want += A[5 * n + p] * B[p * n + 9];
  assert.ok(Math.abs(C[5 * n + 9] - want) < 1e-2);
});

test('createBackend: auto/cpu give the native backend, ref the reference, cuda the GPU backend or a clear reason', async () => {
  const a = await createBackend('auto', { threads: 1 });
  assert.equal(a.name, 'cpu'); assert.equal(a.threads, 1); a.dispose();
  const r = await createBackend('ref');
  assert.equal(r.name, 'ref');
  // without a GPU (or without the CUDA build) the error says why; with one, a CUDA backend comes back
  const cuda = await createBackend('cuda').catch((e: Error) => e);
  if (cuda instanceof Error) {
    assert.equal(cuda.name, 'BackendUnavailableError');
    assert.match(cuda.message, /^the CUDA backend is not available: \S/);
  } else {
    assert.equal(cuda.name, 'cuda');
    cuda.dispose();
  }
});

test('results are bitwise identical for 1 and 2 threads (replicas with different core counts agree)', async () => {
  // sizes large enough that the 2-thread pool really splits the work (GEMM > 2e5 flops, many row tasks)
  const one = new NativeBackend({ threads: 1 });
  try {
    const M = 70, N = 150, K = 300;
    const A = randn(M * K, 901), B = randn(N * K, 902);
    const c1 = new Float32Array(M * N), c2 = new Float32Array(M * N);
    await one.gemm(false, true, M, N, K, 1, A, B, 0, c1);
    await nb.gemm(false, true, M, N, K, 1, A, B, 0, c2);
    assert.deepEqual(c1, c2);
    const W = randNF4(N, K, 64, 903);
    const dx1n = new Float32Array(M * K), dx2n = new Float32Array(M * K);
    await one.gemmNF4T(M, randn(M * N, 904), W, 0, dx1n);
    await nb.gemmNF4T(M, randn(M * N, 904), W, 0, dx2n);
    assert.deepEqual(dx1n, dx2n);
    const T = 200, C = 96, x = randn(T * C, 905), w = randn(C, 906), g = randn(T * C, 907), rstd = new Float32Array(T);
    await nb.rmsnormForward(new Float32Array(T * C), rstd, x, w, T, C, 1e-5);
    const dx1 = new Float32Array(T * C), dx2 = new Float32Array(T * C), dw1 = new Float32Array(C), dw2 = new Float32Array(C);
    await one.rmsnormBackward(dx1, dw1, g, x, w, rstd, T, C);
    await nb.rmsnormBackward(dx2, dw2, g, x, w, rstd, T, C);
    assert.deepEqual(dx1, dx2); assert.deepEqual(dw1, dw2);
    const Bt = 2, S = 70, H = 4, KV = 2, D = 16, TT = Bt * S;
    const q = randn(TT * H * D, 908), k = randn(TT * KV * D, 909), v = randn(TT * KV * D, 910), dout = randn(TT * H * D, 911);
    const outs = [];
    for (const be of [one, nb]) {
      const o = new Float32Array(TT * H * D), l = new Float32Array(Bt * H * S);
      const dq = new Float32Array(TT * H * D), dk = new Float32Array(TT * KV * D), dv = new Float32Array(TT * KV * D);
      await be.attentionForward(o, l, q, k, v, Bt, S, H, KV, D);
      await be.attentionBackward(dq, dk, dv, dout, q, k, v, o, l, Bt, S, H, KV, D);
      outs.push([o, l, dq, dk, dv]);
    }
    for (let i = 0; i < 5; i++) assert.deepEqual(outs[0][i], outs[1][i], `attention output ${i}`);
  } finally {
    one.dispose();
  }
});

test('concurrent ops on one backend all complete correctly', async () => {
  // the pool serializes parallel regions; several in-flight promises must neither deadlock nor mix up
  const jobs = Array.from({ length: 6 }, async (_, j) => {
    const M = 20 + j, N = 33, K = 47;
    const A = randn(M * K, 950 + j), B = randn(K * N, 960 + j), Cn = new Float32Array(M * N), Cr = new Float32Array(M * N);
    await Promise.all([nb.gemm(false, false, M, N, K, 1, A, B, 0, Cn), ref.gemm(false, false, M, N, K, 1, A, B, 0, Cr)]);
    close(`concurrent gemm ${j}`, Cn, Cr, 2e-4, 1e-5);
  });
  await Promise.all(jobs);
});

test('ops never write past the elements they own (guard values after every output)', async () => {
  // outputs are views followed by 16 guard floats in the same buffer; a kernel tail bug (ragged tile,
  // vector remainder) would overwrite them
  const GUARD = 16, SENTINEL = 12345.5;
  const guarded = (n: number) => {
    const buf = new Float32Array(n + GUARD).fill(SENTINEL);
    return { view: buf.subarray(0, n), check: (what: string) => {
      for (let i = n; i < n + GUARD; i++) assert.equal(buf[i], SENTINEL, `${what}: wrote guard element ${i - n}`);
    } };
  };
  for (const [M, N, K] of [[7, 33, 19], [13, 16, 40], [2, 45, 9], [9, 130, 30]]) {
    for (const tb of [false, true]) {
      const C = guarded(M * N);
      await nb.gemm(false, tb, M, N, K, 1, randn(M * K, 1), randn(K * N, 2), 0, C.view);
      C.check(`gemm ${M}x${N}x${K} tB=${tb}`);
    }
    const W = randNF4(N, K, 32, 3);
    const Y = guarded(M * N), DX = guarded(M * K), DQ = guarded(N * K);
    await nb.gemmNF4(M, randn(M * K, 4), W, 0, Y.view); Y.check('gemmNF4');
    await nb.gemmNF4T(M, randn(M * N, 5), W, 0, DX.view); DX.check('gemmNF4T');
    await nb.dequantNF4(W, DQ.view); DQ.check('dequantNF4');
  }
  const B = 1, S = 67, H = 2, KV = 1, D = 12, T = B * S;
  const o = guarded(T * H * D), l = guarded(B * H * S), dq = guarded(T * H * D), dk = guarded(T * KV * D), dv = guarded(T * KV * D);
  const q = randn(T * H * D, 6), k = randn(T * KV * D, 7), v = randn(T * KV * D, 8);
  await nb.attentionForward(o.view, l.view, q, k, v, B, S, H, KV, D);
  await nb.attentionBackward(dq.view, dk.view, dv.view, randn(T * H * D, 9), q, k, v, o.view, l.view, B, S, H, KV, D);
  for (const [name, g] of [['out', o], ['lse', l], ['dq', dq], ['dk', dk], ['dv', dv]] as const) g.check(`attention ${name}`);
  const n = 37, sg = guarded(n), dg = guarded(n), du = guarded(n);
  await nb.swigluForward(sg.view, randn(n, 10), randn(n, 11), n); sg.check('swiglu');
  await nb.swigluBackward(dg.view, du.view, randn(n, 12), randn(n, 10), randn(n, 11), n); dg.check('dgate'); du.check('dup');
});
