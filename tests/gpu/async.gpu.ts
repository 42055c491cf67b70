// Asynchronous device ops on a GPU (docs/cuda.md "Data path", "Threads"): device-only ops return without
// synchronizing and the host waits only where it reads.
//
// - a tiny-model stage forward + backward on tensors() gives bit-identical results to the same backend with
//   every op synchronizing (syncEachOp), bf16 and fp32 GEMMs; the asynchronous run launched its device ops
//   inline and queued them without waiting;
// - an illegal-address kernel (debugFault, in a child process: the fault poisons the CUDA context) surfaces at
//   the next download as CudaAsyncError naming it an asynchronous failure of an earlier op, and later ops fail
//   with CudaAsyncError too;
// - 10,000 alternating alloc / op / free rounds with no wait in between (pool buffers reused while earlier
//   kernels are still queued) give exactly the expected sum at the end;
// - a download behind a long queue waits without the op mutex: inline launches issued meanwhile complete, and
//   the figures (launch time vs wait time) are printed.
// Run by scripts/gpu-check.sh; skipped (never passed) without a GPU. About 10-20 s.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadStage } from '../../engine/model/load.ts';
import { ensureTinyModel } from '../../engine/tiny/index.ts';
import { openModelDir } from '../../engine/formats/model-dir.ts';
import { LORA_TARGETS, type LoraConfig, type Stage } from '../../engine/types.ts';
import { Rng } from '../../engine/model/rng.ts';
import { loadCudaBackend, type CudaBackend } from '../../cuda/index.ts';
import { randn, skip, randomStageStep } from './helpers.ts';

const here = dirname(fileURLToPath(import.meta.url));
const lora: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true };

const step = randomStageStep;

const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

test('a tiny-model stage gives the same bits with asynchronous ops as with every op synchronizing', { skip }, async () => {
  const md = await openModelDir(await ensureTinyModel());
  for (const gemmPrecision of ['bf16', 'fp32'] as const) {
    const asyncBe = (await loadCudaBackend({ gemmPrecision }))!;
    const syncBe = (await loadCudaBackend({ gemmPrecision, syncEachOp: true }))!;
    try {
      for (const [layerStart, layerEnd] of [[0, 4], [1, 3]]) {
        const results = [];
        for (const be of [asyncBe, syncBe]) {
          const stage = await loadStage(md.weights, be, { layerStart, layerEnd, lora, seed: 1 });
          const init = new Rng(3, 4);
          for (const p of stage.params) init.fillNormal(p.data, 0, 0.05);
          const s0 = be.opStats();
          results.push({ r: await step(stage, 'k', 2, 24, new Rng(9, 1)), s0, s1: be.opStats() });
        }
        const [a, s] = results;
        const tag = `${gemmPrecision} [${layerStart}, ${layerEnd})`;
        assert.ok(a.s1.inlineOps - a.s0.inlineOps > 50, `${tag}: only ${a.s1.inlineOps - a.s0.inlineOps} inline launches`);
        assert.ok(a.s1.asyncOps - a.s0.asyncOps > 50, `${tag}: the library queued only ${a.s1.asyncOps - a.s0.asyncOps} ops without waiting`);
        assert.equal(s.s1.asyncOps - s.s0.asyncOps, 0, `${tag}: syncEachOp still queued ops without waiting`);
        assert.equal(a.r.lossSum, s.r.lossSum, `${tag}: loss`);
        for (const k of ['hidden', 'gradIn'] as const) {
          const x = a.r[k], y = s.r[k];
          assert.equal(x === undefined, y === undefined);
          if (x && y) assert.ok(same(x, y), `${tag}: ${k} differs between asynchronous and synchronous ops`);
        }
        a.r.grads.forEach((g, i) => assert.ok(same(g, s.r.grads[i]), `${tag}: gradient ${i} differs`));
        console.log(`async.gpu: ${tag}: ${a.s1.inlineOps - a.s0.inlineOps} inline launches ` +
          `(${((a.s1.inlineNs - a.s0.inlineNs) / 1e6).toFixed(2)} ms on the JS thread), ${a.s1.workerOps - a.s0.workerOps} worker ops, ` +
          `${a.s1.waits - a.s0.waits} waits (${((a.s1.waitNs - a.s0.waitNs) / 1e6).toFixed(2)} ms)`);
      }
    } finally {
      asyncBe.dispose();
      syncBe.dispose();
    }
  }
});

test('an illegal-address kernel surfaces at the next download as CudaAsyncError (child process)', { skip }, () => {
  const node = process.execPath;
  const out = execFileSync(node, [join(here, 'fault-child.ts')], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, SWARMTUNE_CUDA_SYNC: '' } });
  const r = JSON.parse(out.trim().split('\n').pop()!) as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
  assert.equal(r.faultReturned, true, `the faulting launch should return before the fault is seen: ${JSON.stringify(r.faultReturned)}`);
  // the add queued behind it may already see the sticky error at its launch check; if so it must be typed as asynchronous
  if (r.addAfter !== 'ok') assert.equal(r.addAfter.async, true, JSON.stringify(r.addAfter));
  const first = r.addAfter !== 'ok' ? r.addAfter : r.download;
  assert.equal(typeof first, 'object', `the download after the fault succeeded: ${JSON.stringify(r)}`);
  assert.equal(first.name, 'CudaAsyncError', JSON.stringify(first));
  assert.equal(first.cuda, true);
  assert.equal(first.status, 700, `cudaErrorIllegalAddress expected: ${JSON.stringify(first)}`);
  assert.match(first.message, /asynchronous failure of an earlier op/);
  assert.match(first.message, /stc_debug_fault/, 'the queued op list names the faulting op');
  assert.equal(r.download.async, true, 'the download reports the failure as asynchronous');
  assert.equal(r.later.async, true, 'later ops fail as a consequence of the earlier failure');
  assert.match(r.later.message, /unusable after an earlier asynchronous failure/);
  assert.equal(r.stats.stickyStatus, 700);
});

test('10,000 alloc / op / free rounds without waiting reuse pool memory safely', { skip }, async () => {
  const be: CudaBackend = (await loadCudaBackend({ weightCacheBytes: 0 }))!;
  try {
    const tb = be.tensors();
    const n = 1 << 16;
    const src = Float32Array.from({ length: n }, (_, i) => (i % 7) + 1);  // small integers: sums are exact
    const x = await tb.upload(src);
    const acc = tb.alloc(n);
    const s0 = be.opStats();
    let maxPending = 0;
    const rounds = 10_000;
    for (let i = 0; i < rounds; i++) {
      const t = tb.alloc(i % 2 ? n : n + 1024);  // zero-filled on the stream, from buffers freed just before
      await tb.add(t, x, n);                      // t = x
      await tb.add(t, x, n);                      // t = 2x
      await tb.add(acc, t, n);                    // acc += 2x
      tb.free(t);                                 // back to the pool with its kernels still queued
      if (i % 500 === 0) maxPending = Math.max(maxPending, be.opStats().pendingOps);
    }
    const s1 = be.opStats();
    const got = await tb.download(acc);
    for (let i = 0; i < n; i++) {
      if (got[i] !== 2 * rounds * src[i]) assert.fail(`acc[${i}] = ${got[i]}, expected ${2 * rounds * src[i]}`);
    }
    assert.equal(s1.waits - s0.waits, 0, 'the loop never waited for the device');
    assert.equal(s1.workerOps - s0.workerOps, 0, 'the loop never used a worker');
    assert.ok(maxPending > 0, 'ops were queued without waiting');
    const st = be.tensorStats();
    assert.equal(st.tensors, 2);
    assert.ok(st.poolInUseBytes <= st.libraryTensorBytes + (8 << 20), `pool in use ${st.poolInUseBytes} vs tensors ${st.libraryTensorBytes}`);
    console.log(`async.gpu: ${3 * rounds} ops in ${rounds} rounds: ${((s1.inlineNs - s0.inlineNs) / 1e6).toFixed(1)} ms of inline launches, max ${maxPending} pending`);
  } finally {
    be.dispose();
  }
});

test('a download behind a long queue waits without the op mutex: inline launches meanwhile still complete', { skip }, async () => {
  const be: CudaBackend = (await loadCudaBackend({ weightCacheBytes: 0 }))!;
  try {
    const tb = be.tensors();
    const M = 2048;
    const a = await tb.upload(randn(new Rng(1, 1), M * M, 0.01)), c = tb.alloc(M * M);
    for (let i = 0; i < 200; i++) await be.gemm(false, false, M, M, M, 1, a, a, 0, c);  // tens of ms or more of queued GEMMs
    const t0 = performance.now();
    const dl = tb.download(a);               // a worker: waits for the queue without the op mutex
    const small = tb.alloc(16);
    const tl = performance.now();
    await tb.add(small, small, 16);          // an inline launch while the download waits
    const launchMs = performance.now() - tl;
    await dl;
    const totalMs = performance.now() - t0;
    console.log(`async.gpu: inline launch behind a waiting download took ${launchMs.toFixed(3)} ms; the download waited ${totalMs.toFixed(1)} ms`);
    assert.ok(be.opStats().waits > 0);
  } finally {
    be.dispose();
  }
});
