// GPU checks of device-resident NF4 weights: cached and uncached calls agree bit for bit, eviction under a tiny budget stays correct.
//
// Run by scripts/gpu-check.sh; skipped (never passed) without a GPU. The resident path runs the same
// kernels on the same bytes as the per-call upload path, so results must be identical, not just close.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomNF4 } from '../../engine/model/random-model.ts';
import type { NF4Weight } from '../../engine/formats/nf4.ts';
import { isDoubleQuant } from '../../engine/formats/nf4.ts';
import { CudaArgumentError, loadCudaBackend, type CudaBackend } from '../../cuda/index.ts';
import { randn, rng, skip } from './helpers.ts';

const uncached: CudaBackend | null = skip ? null : await loadCudaBackend({ weightCacheBytes: 0 });
const cached: CudaBackend | null = skip ? null : await loadCudaBackend();

function weights(): NF4Weight[] {
  const r = rng(21);
  // odd element count, every blocksize the tests use, shapes off the 128/64 tiles; two double-quantized
  return [randomNF4(70, 96, 0.1, r, 64), randomNF4(7, 33, 0.2, r, 32), randomNF4(300, 129, 0.05, r, 128),
    randomNF4(256, 512, 0.05, r, 64), randomNF4(300, 129, 0.05, r, 64, { doubleQuant: true }),
    randomNF4(7, 33, 0.2, r, 32, { doubleQuant: true })];
}

const residentBytes = (be: CudaBackend, W: NF4Weight) =>
  be.nf4ResidentBytes(W.rows, W.cols, W.blocksize, isDoubleQuant(W.absmax) ? W.absmax.nestedBlocksize : 0);

async function runAll(be: CudaBackend, W: NF4Weight, M: number, seed: number): Promise<Float32Array[]> {
  const r = rng(seed);
  const X = randn(r, M * W.cols), Y = randn(r, M * W.rows), DY = randn(r, M * W.rows), DX = randn(r, M * W.cols);
  const y0 = new Float32Array(M * W.rows), y1 = Float32Array.from(Y), dx0 = new Float32Array(M * W.cols), dx1 = Float32Array.from(DX);
  await be.gemmNF4(M, X, W, 0, y0);
  await be.gemmNF4(M, X, W, 0.5, y1);
  await be.gemmNF4T(M, DY, W, 0, dx0);
  await be.gemmNF4T(M, DY, W, 1, dx1);
  const d = new Float32Array(W.rows * W.cols);
  await be.dequantNF4(W, d);
  return [y0, y1, dx0, dx1, d];
}

test('resident weights give bit-identical results to per-call uploads, uploaded once each', { skip }, async () => {
  const ws = weights();
  const before = cached!.weightCacheStats();
  for (const M of [1, 45, 130]) {
    for (const [i, W] of ws.entries()) {
      const want = await runAll(uncached!, W, M, 100 * M + i);
      const got = await runAll(cached!, W, M, 100 * M + i);
      for (let k = 0; k < want.length; k++) assert.deepEqual(got[k], want[k], `output ${k} of W${i} [${W.rows},${W.cols}] M=${M}`);
    }
  }
  const st = cached!.weightCacheStats();
  assert.equal(st.uploads - before.uploads, ws.length, 'each weight should be uploaded exactly once');
  assert.equal(st.hits - before.hits, 3 * 5 * ws.length - ws.length);
  assert.equal(st.libraryCount, st.entries);
  assert.equal(st.libraryBytes, st.residentBytes);
  assert.equal(st.residentBytes - before.residentBytes,
    ws.reduce((a, W) => a + residentBytes(cached!, W), 0));
  assert.equal(uncached!.weightCacheStats().libraryCount, 0, 'budget 0 must never keep a weight');
});

test('eviction under a tiny budget keeps results correct and the device within budget', { skip }, async () => {
  const ws = weights();
  const sizes = ws.map((W) => residentBytes(uncached!, W));
  // room for the largest weight plus a little: most uses evict something, the largest fits alone
  const budget = Math.max(...sizes) + 4096;
  const tiny = (await loadCudaBackend({ weightCacheBytes: budget }))!;
  try {
    for (let round = 0; round < 3; round++) {
      for (const [i, W] of ws.entries()) {
        const want = await runAll(uncached!, W, 37, 7 * i + round);
        const got = await runAll(tiny, W, 37, 7 * i + round);
        for (let k = 0; k < want.length; k++) assert.deepEqual(got[k], want[k], `round ${round} W${i} output ${k}`);
        const st = tiny.weightCacheStats();
        assert.ok(st.libraryBytes <= budget, `library holds ${st.libraryBytes} bytes, budget ${budget}`);
      }
    }
    const st = tiny.weightCacheStats();
    assert.ok(st.evictions >= 6, `only ${st.evictions} evictions`);
    assert.equal(st.freeErrors, 0, `free failed: ${tiny.weightCacheStats().freeErrors}`);
    // a budget below every weight: all calls take the per-call path and still agree
    const none = (await loadCudaBackend({ weightCacheBytes: Math.min(...sizes) - 1 }))!;
    try {
      const got = await runAll(none, ws[0], 5, 1), want = await runAll(uncached!, ws[0], 5, 1);
      for (let k = 0; k < want.length; k++) assert.deepEqual(got[k], want[k]);
      assert.equal(none.weightCacheStats().libraryCount, 0);
      assert.ok(none.weightCacheStats().bypassed > 0);
    } finally {
      none.dispose();
    }
  } finally {
    tiny.dispose();
  }
});

test('a weight modified after caching is refused with CudaArgumentError; a new object is fine', { skip }, async () => {
  const W = randomNF4(64, 64, 0.1, rng(31), 64);
  const out = new Float32Array(64 * 64);
  await cached!.dequantNF4(W, out);
  W.packed[0] ^= 0x11;
  await assert.rejects(cached!.dequantNF4(W, out), (e: Error) => e instanceof CudaArgumentError && /changed after it was cached/.test(e.message));
  const fresh: NF4Weight = { ...W, packed: W.packed.slice(), absmax: W.absmax.slice() };
  const want = new Float32Array(64 * 64);
  await cached!.dequantNF4(fresh, out);
  await uncached!.dequantNF4(fresh, want);
  assert.deepEqual(out, want);
  // double-quantized constants changed in place are refused too
  const D = randomNF4(64, 64, 0.1, rng(32), 64, { doubleQuant: true });
  await cached!.dequantNF4(D, out);
  D.absmax.codes[0] ^= 0x01;
  await assert.rejects(cached!.dequantNF4(D, out), (e: Error) => e instanceof CudaArgumentError && /changed after it was cached/.test(e.message));
});

test('NF4 benchmark on resident data reports finite dequant GB/s and NF4 GEMM TFLOP/s (float32 and double-quantized absmax)', { skip }, async () => {
  for (const doubleQuant of [false, true]) {
    const b = await cached!.benchNF4({ M: 256, rows: 1024, cols: 1024, iters: 3, doubleQuant });
    assert.ok(Number.isFinite(b.dequantGBs) && b.dequantGBs > 0, `dequant ${b.dequantGBs} GB/s (doubleQuant ${doubleQuant})`);
    assert.ok(Number.isFinite(b.gemmNF4Tflops) && b.gemmNF4Tflops > 0, `gemm ${b.gemmNF4Tflops} TFLOP/s (doubleQuant ${doubleQuant})`);
  }
  await assert.rejects(cached!.benchNF4({ M: 0, rows: 1, cols: 1 }), CudaArgumentError);
});
