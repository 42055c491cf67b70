// Device-resident tensors (cuda/tensors.ts, the library's host-or-device pointers) on a GPU.
//
// - every Backend op run on CudaTensors equals the same op on host Float32Arrays bit for bit (same
//   kernels; only the data path differs), with buffers at aligned and unaligned offsets inside bigger
//   allocations (unaligned dequant output is staged, aligned is written in place), resident and
//   per-call NF4 weights;
// - add/addBias/maskScale equal hostTensors(native) bit for bit (the JS float64 arithmetic);
// - the addon refuses made-up, freed and too-short device addresses with TypeError;
// - a whole tiny-model stage (engine/tiny) forward + backward on the CUDA backend's tensors() matches the
//   CPU native backend (fp32 GEMMs: 1e-4 of each tensor's scale; bf16: loss 2e-2 and gradient cosine);
//   a second step allocates and frees exactly as many device tensors and pool bytes as it returns (no leak);
// - dispose releases every tensor.
// Run by scripts/gpu-check.sh; skipped (never passed) without a GPU. About 10 s on an H100-class GPU.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { hostTensors } from '../../engine/backend.ts';
import { type NF4Weight } from '../../engine/formats/nf4.ts';
import { NativeBackend } from '../../engine/backends/native.ts';
import { randomNF4 } from '../../engine/model/random-model.ts';
import { loadStage } from '../../engine/model/load.ts';
import { ensureTinyModel } from '../../engine/tiny/index.ts';
import { openModelDir } from '../../engine/formats/model-dir.ts';
import { LORA_TARGETS, type LoraConfig, type Stage } from '../../engine/types.ts';
import { Rng } from '../../engine/model/rng.ts';
import { CudaArgumentError, CudaBackend, CudaTensor, loadCudaAddon, loadCudaBackend, type F32 } from '../../cuda/index.ts';
import { cuda, cudaFp32, randn, rng, skip, randomStageStep } from './helpers.ts';

const native = new NativeBackend({ threads: 2 });
const uncached = cuda ? await loadCudaBackend({ weightCacheBytes: 0 }) : null;
process.on('exit', () => { native.dispose(); uncached?.dispose(); });

function bits(a: Float32Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

function assertBitEqual(what: string, got: Float32Array, want: Float32Array): void {
  assert.equal(got.length, want.length, `${what}: length`);
  if (bits(got).equals(bits(want))) return;
  let i = 0;
  while (i < got.length && Object.is(got[i], want[i])) i++;
  assert.fail(`${what}: element ${i} is ${got[i]} on device tensors but ${want[i]} on host arrays`);
}

/**
 * Runs `call` once on host copies of `bufs` and once on device tensors holding the same values, each
 * placed `offset` floats into a bigger allocation, then compares every buffer (inputs too: some ops work
 * in place) bit for bit.
 */
async function sameOnDevice(be: CudaBackend, what: string, bufs: Record<string, Float32Array>, offset: number,
  call: (b: Record<string, F32>) => Promise<void>): Promise<void> {
  const tb = be.tensors();
  const hostBufs: Record<string, Float32Array> = {};
  const dev: Record<string, CudaTensor> = {};
  const parents: CudaTensor[] = [];
  for (const [k, v] of Object.entries(bufs)) {
    hostBufs[k] = v.slice();
    const padded = new Float32Array(offset + v.length + 3).fill(-7);
    padded.set(v, offset);
    const p = await tb.upload(padded);
    parents.push(p);
    dev[k] = tb.slice(p, offset, offset + v.length);
  }
  await call(hostBufs);
  await call(dev);
  for (const k of Object.keys(bufs)) {
    assertBitEqual(`${what} (offset ${offset}): ${k}`, await tb.download(dev[k]), hostBufs[k]);
  }
  // nothing outside the slices was touched
  for (const p of parents) {
    const all = await tb.download(p);
    for (let i = 0; i < offset; i++) assert.equal(all[i], -7, `${what}: wrote before its slice`);
    for (let i = all.length - 3; i < all.length; i++) assert.equal(all[i], -7, `${what}: wrote past its slice`);
    tb.free(p);
  }
}

test('every Backend op on device tensors equals the same op on host arrays, bit for bit', { skip }, async () => {
  const r = rng(101);
  const nf4: NF4Weight[] = [randomNF4(70, 96, 0.1, r, 64), randomNF4(7, 33, 0.2, r, 32), randomNF4(300, 129, 0.05, r, 128),
    randomNF4(300, 129, 0.05, r, 64, { doubleQuant: true })];
  for (const be of [cuda!, cudaFp32!, uncached!]) {
    for (const off of [0, 1, 4]) {
      const tag = `${be.gemmPrecision}${be === uncached ? ' uncached' : ''}`;
      for (const [M, N, K] of [[37, 45, 70], [130, 260, 33]]) {
        for (const tA of [false, true]) for (const tB of [false, true]) for (const beta of [0, 0.3]) {
          const C = randn(r, M * N);
          if (beta === 0) C.fill(NaN);
          await sameOnDevice(be, `${tag} gemm tA=${tA} tB=${tB} ${M}x${N}x${K} beta=${beta}`,
            { A: randn(r, M * K), B: randn(r, K * N), C }, off,
            (b) => be.gemm(tA, tB, M, N, K, 0.7, b.A, b.B, beta, b.C));
        }
      }
      for (const W of nf4) {
        for (const beta of [0, 1]) {
          const M = 45;
          await sameOnDevice(be, `${tag} gemmNF4 [${W.rows},${W.cols}] beta=${beta}`,
            { X: randn(r, M * W.cols), Y: randn(r, M * W.rows) }, off, (b) => be.gemmNF4(M, b.X, W, beta, b.Y));
          await sameOnDevice(be, `${tag} gemmNF4T [${W.rows},${W.cols}] beta=${beta}`,
            { DY: randn(r, M * W.rows), DX: randn(r, M * W.cols) }, off, (b) => be.gemmNF4T(M, b.DY, W, beta, b.DX));
        }
        await sameOnDevice(be, `${tag} dequantNF4 [${W.rows},${W.cols}]`, { out: randn(r, W.rows * W.cols) }, off,
          (b) => be.dequantNF4(W, b.out));
      }
    }
  }
  const be = cuda!;
  for (const off of [0, 3]) {
    const T = 33, C = 300;
    await sameOnDevice(be, 'rmsnormForward', { out: randn(r, T * C), rstd: randn(r, T), x: randn(r, T * C, 2), w: randn(r, C) }, off,
      (b) => be.rmsnormForward(b.out, b.rstd, b.x, b.w, T, C, 1e-5));
    const rstd = Float32Array.from({ length: T }, () => 0.5 + r.nextFloat());
    await sameOnDevice(be, 'rmsnormBackward', { dx: randn(r, T * C), dw: randn(r, C), dout: randn(r, T * C), x: randn(r, T * C),
      w: randn(r, C), rstd }, off, (b) => be.rmsnormBackward(b.dx, b.dw, b.dout, b.x, b.w, b.rstd, T, C));
    await sameOnDevice(be, 'rmsnormBackward dw=null', { dx: randn(r, T * C), dout: randn(r, T * C), x: randn(r, T * C),
      w: randn(r, C), rstd }, off, (b) => be.rmsnormBackward(b.dx, null, b.dout, b.x, b.w, b.rstd, T, C));
    const nH = 3, D = 16, maxPos = 64, Tr = 20;
    const pos = Int32Array.from({ length: Tr }, () => Math.floor(r.nextFloat() * maxPos));
    for (const inverse of [false, true]) {
      await sameOnDevice(be, `rope inverse=${inverse}`, { x: randn(r, Tr * nH * D), cos: randn(r, maxPos * D / 2), sin: randn(r, maxPos * D / 2) },
        off, (b) => be.rope(b.x, b.cos, b.sin, pos, Tr, nH, D, inverse));
    }
    const B = 2, S = 45, H = 4, KV = 2, Da = 64, Ta = B * S;
    const q = randn(r, Ta * H * Da), k = randn(r, Ta * KV * Da), v = randn(r, Ta * KV * Da);
    const o = new Float32Array(Ta * H * Da), lse = new Float32Array(B * H * S);
    await be.attentionForward(o, lse, q, k, v, B, S, H, KV, Da);
    await sameOnDevice(be, 'attentionForward', { out: randn(r, Ta * H * Da), lse: randn(r, B * H * S), q, k, v }, off,
      (b) => be.attentionForward(b.out, b.lse, b.q, b.k, b.v, B, S, H, KV, Da));
    await sameOnDevice(be, 'attentionBackward', { dq: randn(r, Ta * H * Da), dk: randn(r, Ta * KV * Da), dv: randn(r, Ta * KV * Da),
      dout: randn(r, Ta * H * Da), q, k, v, out: o, lse }, off,
      (b) => be.attentionBackward(b.dq, b.dk, b.dv, b.dout, b.q, b.k, b.v, b.out, b.lse, B, S, H, KV, Da));
    const n = 1000;
    await sameOnDevice(be, 'swigluForward', { out: randn(r, n), gate: randn(r, n, 4), up: randn(r, n) }, off,
      (b) => be.swigluForward(b.out, b.gate, b.up, n));
    await sameOnDevice(be, 'swigluBackward', { dgate: randn(r, n), dup: randn(r, n), dout: randn(r, n), gate: randn(r, n, 4), up: randn(r, n) },
      off, (b) => be.swigluBackward(b.dgate, b.dup, b.dout, b.gate, b.up, n));
    // Gemma: attention with a scale, soft-cap and window; GeGLU; soft-cap separate and in place
    const ga = { scale: 0.09, softcap: 3.0, window: 17 };
    await be.attentionForward(o, lse, q, k, v, B, S, H, KV, Da, ga);
    await sameOnDevice(be, 'attentionForward (gemma)', { out: randn(r, Ta * H * Da), lse: randn(r, B * H * S), q, k, v }, off,
      (b) => be.attentionForward(b.out, b.lse, b.q, b.k, b.v, B, S, H, KV, Da, ga));
    await sameOnDevice(be, 'attentionBackward (gemma)', { dq: randn(r, Ta * H * Da), dk: randn(r, Ta * KV * Da), dv: randn(r, Ta * KV * Da),
      dout: randn(r, Ta * H * Da), q, k, v, out: o, lse }, off,
      (b) => be.attentionBackward(b.dq, b.dk, b.dv, b.dout, b.q, b.k, b.v, b.out, b.lse, B, S, H, KV, Da, ga));
    await sameOnDevice(be, 'gegluForward', { out: randn(r, n), gate: randn(r, n, 4), up: randn(r, n) }, off,
      (b) => be.gegluForward(b.out, b.gate, b.up, n));
    await sameOnDevice(be, 'gegluBackward', { dgate: randn(r, n), dup: randn(r, n), dout: randn(r, n), gate: randn(r, n, 4), up: randn(r, n) },
      off, (b) => be.gegluBackward(b.dgate, b.dup, b.dout, b.gate, b.up, n));
    await sameOnDevice(be, 'softcapForward', { y: randn(r, n), x: randn(r, n, 40) }, off, (b) => be.softcapForward(b.y, b.x, 30, n));
    await sameOnDevice(be, 'softcapForward in place', { x: randn(r, n, 40) }, off, (b) => be.softcapForward(b.x, b.x, 30, n));
    await sameOnDevice(be, 'softcapBackward in place', { dy: randn(r, n), x: randn(r, n, 40) }, off, (b) => be.softcapBackward(b.dy, b.dy, b.x, 30, n));
    const V = 97, Ce = 40, Te = 30;
    const ids = Int32Array.from({ length: Te }, () => Math.floor(r.nextFloat() * V));
    await sameOnDevice(be, 'embeddingForward', { out: randn(r, Te * Ce), table: randn(r, V * Ce) }, off,
      (b) => be.embeddingForward(b.out, ids, b.table, Te, Ce, V));
    const Vc = 300, v0 = 200;
    const labels = Int32Array.from({ length: Te }, (_, i) => (i % 7 === 3 ? -100 : Math.floor(r.nextFloat() * 700)));
    await sameOnDevice(be, 'crossEntropyChunkForward', { logits: randn(r, Te * Vc, 3), m: randn(r, Te), s: Float32Array.from({ length: Te }, () => 1 + r.nextFloat()),
      picked: randn(r, Te) }, off, (b) => be.crossEntropyChunkForward(b.logits, labels, v0, Te, Vc, b.m, b.s, b.picked));
    await sameOnDevice(be, 'crossEntropyChunkBackward', { logits: randn(r, Te * Vc, 3), lse: Float32Array.from({ length: Te }, () => 6 + r.nextFloat()),
      scale: randn(r, Te) }, off, (b) => be.crossEntropyChunkBackward(b.logits, labels, v0, Te, Vc, b.lse, b.scale));
  }
});

test('add, addBias and maskScale on the device equal hostTensors(native) bit for bit', { skip }, async () => {
  const r = rng(102);
  const tb = cuda!.tensors(), host = hostTensors(native);
  // magnitudes spread over many binades so that double rounding would show if the kernels rounded differently
  const wide = (n: number) => Float32Array.from({ length: n }, () => (r.nextFloat() - 0.5) * 2 ** Math.floor(r.nextFloat() * 40 - 20));
  const n = 200_003;
  const y = wide(n), x = wide(n);
  const dy = await tb.upload(y), dx = await tb.upload(x);
  await tb.add(dy, dx, n);
  await host.add(y, x, n);
  assertBitEqual('add', await tb.download(dy), y);
  const T = 301, N = 513, yb = wide(T * N), bias = wide(N);
  const dyb = await tb.upload(yb);
  await tb.addBias(dyb, await tb.constant(bias), T, N);
  await host.addBias(yb, bias, T, N);
  assertBitEqual('addBias', await tb.download(dyb), yb);
  for (const scale of [1 / 0.9, 1 / (1 - 0.05), 1 / 0.7, 1, 0.3, 2 ** -30]) {
    const mask = Uint8Array.from({ length: n }, () => (r.nextFloat() < 0.8 ? 1 : 0));
    for (const accumulate of [false, true]) {
      const out = wide(n), xs = wide(n);
      const dOut = await tb.upload(out), dXs = await tb.upload(xs);
      await tb.maskScale(dOut, dXs, mask, scale, n, accumulate);
      await host.maskScale(out, xs, mask, scale, n, accumulate);
      assertBitEqual(`maskScale scale=${scale} accumulate=${accumulate}`, await tb.download(dOut), out);
      // in place (x = out), as LoRA dropout may call it
      await tb.maskScale(dXs, dXs, mask, scale, n, accumulate);
      await host.maskScale(xs, xs, mask, scale, n, accumulate);
      assertBitEqual(`maskScale in place scale=${scale} accumulate=${accumulate}`, await tb.download(dXs), xs);
      tb.free(dOut); tb.free(dXs);
    }
  }
  tb.free(dy); tb.free(dx); tb.free(dyb);
});

test('the addon refuses made-up, freed and too-short device addresses with TypeError', { skip }, async () => {
  const addon = loadCudaAddon() as unknown as Record<string, (...a: unknown[]) => unknown> & { open(d: number, p: number): object; close(c: object): void };
  const ctx = addon.open(0, 0);
  try {
    const isType = (re: RegExp) => (e: Error) => e.name === 'TypeError' && re.test(e.message);
    const a = addon.devAlloc(ctx, 64) as bigint, b = addon.devAlloc(ctx, 64) as bigint;
    assert.equal(typeof a, 'bigint');
    await addon.add(ctx, a, b, 16);  // a live address works
    assert.throws(() => addon.add(ctx, a, 0x1234n, 16), isType(/add: argument 2 must be a Float32Array or a live device address/));
    assert.throws(() => addon.add(ctx, a, -1n, 16), isType(/add: argument 2/));
    assert.throws(() => addon.add(ctx, a, 'x', 16), isType(/add: argument 2 must be a Float32Array or a device address/));
    assert.throws(() => addon.add(ctx, a, new Float64Array(16), 16), isType(/add: argument 2/));
    assert.throws(() => addon.copy(ctx, new Float32Array(16), a + 32n, 64), isType(/copy: argument 2 must be a live device address \(BigInt\) with room for the copy/));
    assert.throws(() => addon.copy(ctx, new Float32Array(15), a, 64), isType(/copy: argument 1 must be a typed array of at least 64 bytes/));
    addon.devFree(ctx, b, 64);
    assert.throws(() => addon.add(ctx, a, b, 16), isType(/add: argument 2/));  // freed
    assert.throws(() => addon.devFree(ctx, b, 64), (e: Error & { cudaStatus?: number }) => e.cudaStatus === 10001 && /not a live device tensor/.test(e.message));
    assert.throws(() => addon.devFree(ctx, a, 60), (e: Error & { cudaStatus?: number }) => e.cudaStatus === 10001);
    assert.deepEqual(addon.devStats(ctx), { tensors: 1, tensorBytes: 64, poolInUseBytes: 4096 });
    addon.devFree(ctx, a, 64);
    assert.deepEqual(addon.devStats(ctx), { tensors: 0, tensorBytes: 0, poolInUseBytes: 0 });
  } finally {
    addon.close(ctx);
  }
});

const lora: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true };

const step = randomStageStep;

function relErr(got: Float32Array, want: Float32Array): number {
  let d = 0, s = 0;
  for (let i = 0; i < want.length; i++) {
    d = Math.max(d, Math.abs(got[i] - want[i]));
    s = Math.max(s, Math.abs(want[i]));
  }
  return d / (s || 1);
}

function cosine(a: Float32Array, b: Float32Array): number {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) { ab += a[i] * b[i]; aa += a[i] * a[i]; bb += b[i] * b[i]; }
  return ab / Math.sqrt(aa * bb || 1);
}

test('a tiny-model stage on the CUDA tensors matches the CPU native backend; a step leaks no device memory', { skip }, async () => {
  const md = await openModelDir(await ensureTinyModel());
  try {
    for (const [layerStart, layerEnd] of [[0, 4], [1, 3]]) {
      for (const be of [cudaFp32!, cuda!]) {
        const cpu = await loadStage(md.weights, native, { layerStart, layerEnd, lora, seed: 1 });
        const gpu = await loadStage(md.weights, be, { layerStart, layerEnd, lora, seed: 1 });
        const init = new Rng(3, 4);
        for (let i = 0; i < cpu.params.length; i++) {
          init.fillNormal(cpu.params[i].data, 0, 0.05);
          gpu.params[i].data.set(cpu.params[i].data);
        }
        const tag = `[${layerStart}, ${layerEnd}) ${be.gemmPrecision}`;
        const allocs0 = be.tensorStats().allocs;
        const want = await step(cpu, 'k', 2, 24, new Rng(9, 1));
        const got = await step(gpu, 'k', 2, 24, new Rng(9, 1));
        assert.ok(be.tensorStats().allocs - allocs0 > 20, `${tag}: the stage did not compute on device tensors (tensorsOf(backend) not used?)`);
        const fp32 = be.gemmPrecision === 'fp32';
        const pairs: [string, Float32Array | undefined, Float32Array | undefined][] = [
          ['hidden', got.hidden, want.hidden], ['gradIn', got.gradIn, want.gradIn],
          ...got.grads.map((g, i) => [`grad ${cpu.params[i].name}`, g, want.grads[i]] as [string, Float32Array, Float32Array]),
        ];
        if (want.lossSum !== undefined) {
          const rel = Math.abs(got.lossSum! - want.lossSum) / Math.abs(want.lossSum);
          assert.ok(rel < (fp32 ? 1e-4 : 2e-2), `${tag}: loss ${got.lossSum} vs ${want.lossSum} (relative ${rel})`);
        }
        for (const [name, g, w] of pairs) {
          assert.equal(g === undefined, w === undefined, `${tag}: ${name} present on one backend only`);
          if (!g || !w) continue;
          if (fp32) assert.ok(relErr(g, w) < 1e-4, `${tag}: ${name} differs by ${relErr(g, w)} of its scale`);
          else assert.ok(cosine(g, w) > 0.99, `${tag}: ${name} cosine ${cosine(g, w)}`);
        }
        // a second step, all shapes warm: every device tensor it allocates is freed, the pool hands back what it took
        const before = be.tensorStats();
        await step(gpu, 'k2', 2, 24, new Rng(10, 1));
        const after = be.tensorStats();
        assert.equal(after.tensors, before.tensors, `${tag}: live tensors ${before.tensors} -> ${after.tensors}`);
        assert.equal(after.libraryTensorBytes, before.libraryTensorBytes, `${tag}: library tensor bytes grew`);
        assert.equal(after.poolInUseBytes, before.poolInUseBytes, `${tag}: pool bytes in use ${before.poolInUseBytes} -> ${after.poolInUseBytes}`);
        assert.ok(after.allocs > before.allocs && after.frees - before.frees === after.allocs - before.allocs);
        cpu.dispose();
        gpu.dispose();
      }
    }
  } finally {
    await md.close();
  }
});

test('dispose releases every device tensor; their later use throws CudaArgumentError', { skip }, async () => {
  const be = (await loadCudaBackend({ gemmPrecision: 'fp32' }))!;
  const tb = be.tensors();
  assert.equal(be.tensors(), tb, 'one TensorBackend per backend');
  const a = await tb.upload(randn(rng(103), 1000)), c = await tb.constant(new Float32Array(10));
  tb.alloc(1 << 20);
  const st = be.tensorStats();
  assert.equal(st.libraryTensors, 3);
  assert.equal(st.libraryTensorBytes, st.tensorBytes + st.constantBytes);
  be.dispose();
  assert.equal(a.freed, true);
  assert.equal(c.freed, true);
  await assert.rejects(tb.download(a), (e: Error) => e instanceof CudaArgumentError && /disposed/.test(e.message));
  assert.throws(() => be.tensors(), (e: Error) => e instanceof CudaArgumentError && /disposed/.test(e.message));
});
