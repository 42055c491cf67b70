// CudaTensors' bookkeeping (cuda/tensors.ts) without a GPU: slices, double free, use after free, frees
// deferred behind running ops, the constant cache, the garbage-collection backstop, dispose, and that
// every op reaches the backend with the right buffers.
//
// The device is a host-memory stand-in: allocations are Float32Arrays at made-up, 256-byte aligned
// addresses; an address resolves only inside a live allocation (as the addon's stc_dev_check does), so a
// view or a freed address that leaked past CudaTensors' checks fails loudly. Ops run on the native CPU
// backend over the resolved views, so results must equal hostTensors(native) bit for bit. The real device
// path is tests/gpu/tensors.gpu.ts. Runs in about a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { CudaTensor, CudaTensors, type TensorDevice } from '../cuda/tensors.ts';
import { CudaArgumentError } from '../cuda/errors.ts';
import { NativeBackend } from '../engine/backends/native.ts';
import { hostTensors, type Backend, type Ops } from '../engine/backend.ts';
import { Rng } from '../engine/model/rng.ts';
import { loadStage } from '../engine/model/load.ts';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { LORA_TARGETS, type LoraConfig, type Stage } from '../engine/types.ts';

const native = new NativeBackend({ threads: 1 });
const host = hostTensors(native);
process.on('exit', () => native.dispose());

class HostDevice implements TensorDevice {
  mem = new Map<bigint, Float32Array>();
  log: string[] = [];
  next = 0x7f0000000000n;
  /** resolves before each op runs when set (to hold ops in flight) */
  gate: Promise<void> | null = null;
  opsRun = 0;
  alloc(bytes: number): bigint {
    const addr = this.next;
    this.next += BigInt(Math.ceil(Math.max(bytes, 16) / 256) * 256 + 256);
    this.mem.set(addr, new Float32Array(Math.ceil(bytes / 4)));
    this.log.push(`alloc ${bytes}`);
    return addr;
  }
  free(addr: bigint, bytes: number): void {
    const m = this.mem.get(addr);
    if (!m) throw new Error(`stand-in: free of ${addr.toString(16)}, not a live allocation`);
    assert.equal(m.length * 4, bytes, 'free with a byte count other than allocated');
    this.mem.delete(addr);
    this.log.push(`free ${bytes}`);
  }
  view(addr: bigint, n: number): Float32Array {
    for (const [base, m] of this.mem) {
      const off = addr - base;
      if (off >= 0n && off % 4n === 0n && Number(off) / 4 + n <= m.length) return m.subarray(Number(off) / 4, Number(off) / 4 + n);
    }
    throw new Error(`stand-in: ${addr.toString(16)} + ${n} floats is not inside a live allocation`);
  }
  async copy(dst: Float32Array | bigint, src: Float32Array | bigint, bytes: number): Promise<void> {
    await this.gate;
    const n = bytes / 4;
    const d = typeof dst === 'bigint' ? this.view(dst, n) : dst.subarray(0, n);
    const s = typeof src === 'bigint' ? this.view(src, n) : src.subarray(0, n);
    d.set(s);
  }
  async add(y: bigint, x: bigint, n: number): Promise<void> {
    await this.gate;
    await host.add(this.view(y, n), this.view(x, n), n);
  }
  async addBias(y: bigint, bias: bigint, T: number, N: number): Promise<void> {
    await this.gate;
    await host.addBias(this.view(y, T * N), this.view(bias, N), T, N);
  }
  async maskScale(out: bigint, x: bigint, mask: Uint8Array, scale: number, n: number, acc: boolean): Promise<void> {
    await this.gate;
    await host.maskScale(this.view(out, n), this.view(x, n), mask, scale, n, acc);
  }
  /** the Backend ops over resolved views: every CudaTensor argument becomes its host view */
  ops(): Ops<CudaTensor> {
    return new Proxy({} as Ops<CudaTensor>, {
      get: (_t, name: string) => async (...args: unknown[]) => {
        await this.gate;
        this.opsRun++;
        const mapped = args.map((a) => (a instanceof CudaTensor ? this.view(a.addr, a.length) : a));
        return (native as unknown as Record<string, (...a: unknown[]) => Promise<void>>)[name](...mapped);
      },
    });
  }
  liveBytes(): number {
    let b = 0;
    for (const m of this.mem.values()) b += m.length * 4;
    return b;
  }
}

function setup(): { dev: HostDevice; tb: CudaTensors } {
  const dev = new HostDevice();
  return { dev, tb: new CudaTensors(dev, dev.ops(), 'stand-in') };
}

const rng = new Rng(5, 9);
const randn = (n: number) => rng.fillNormal(new Float32Array(n), 0, 1);
const isArgError = (re: RegExp) => (e: Error) => e instanceof CudaArgumentError && re.test(e.message);

test('alloc is zero-filled; upload and download round-trip; download checks out', async () => {
  const { dev, tb } = setup();
  assert.equal(tb.resident, 'device');
  const z = tb.alloc(5);
  assert.deepEqual(await tb.download(z), new Float32Array(5));
  const src = randn(37);
  const t = await tb.upload(src);
  assert.equal(t.length, 37);
  const back = await tb.download(t);
  assert.notEqual(back, src);
  assert.deepEqual(back, src);
  const out = new Float32Array(37);
  assert.equal(await tb.download(t, out), out);
  assert.deepEqual(out, src);
  await assert.rejects(tb.download(t, new Float32Array(36)), isArgError(/download: out has 36 elements, the buffer 37/));
  tb.free(t);
  tb.free(z);
  tb.free(null);
  tb.free(undefined);
  assert.equal(dev.mem.size, 0);
  assert.deepEqual(tb.stats().tensors, 0);
  assert.throws(() => tb.alloc(-1), isArgError(/alloc: n=-1/));
  assert.throws(() => tb.alloc(1.5), isArgError(/alloc: n=1.5/));
});

test('slices are views: ops on a slice write into the parent; bounds, nesting and free are checked', async () => {
  const { dev, tb } = setup();
  const src = randn(64);
  const t = await tb.upload(src);
  const s = tb.slice(t, 16, 48);
  assert.equal(s.length, 32);
  assert.equal(s.owner, t);
  assert.equal(s.addr, t.addr + 64n);
  assert.deepEqual(await tb.download(s), src.subarray(16, 48));
  const ss = tb.slice(s, 8, 12);  // a slice of a slice views the same allocation
  assert.equal(ss.owner, t);
  assert.deepEqual(await tb.download(ss), src.subarray(24, 28));
  // an op into the slice changes exactly those elements of the parent
  const ones = await tb.upload(new Float32Array(4).fill(1));
  await tb.add(ss, ones, 4);
  const want = src.slice();
  for (let i = 24; i < 28; i++) want[i] += 1;
  assert.deepEqual(await tb.download(t), want);
  assert.deepEqual(tb.slice(t, 64, 64).length, 0);
  assert.throws(() => tb.slice(t, 10, 65), isArgError(/slice: \[10, 65\) is not a range inside a buffer of 64 elements/));
  assert.throws(() => tb.slice(t, -1, 2), isArgError(/slice/));
  assert.throws(() => tb.slice(s, 0, 33), isArgError(/slice/));
  assert.throws(() => tb.free(s), isArgError(/free: the buffer is a slice/));
  tb.free(t);
  tb.free(ones);
  assert.equal(dev.mem.size, 0);
});

test('double free and use after free throw CudaArgumentError naming the op and argument', async () => {
  const { dev, tb } = setup();
  const A = await tb.upload(randn(6)), B = await tb.upload(randn(6)), C = tb.alloc(4);
  const s = tb.slice(A, 0, 3);
  tb.free(A);
  assert.equal(A.freed, true);
  assert.equal(s.freed, true);
  assert.throws(() => tb.free(A), isArgError(/free: the buffer was freed \(use after free\)/));
  await assert.rejects(tb.download(A), isArgError(/download: the buffer was freed/));
  await assert.rejects(tb.download(s), isArgError(/download: the buffer was freed/));
  assert.throws(() => tb.slice(A, 0, 1), isArgError(/slice: the buffer was freed/));
  await assert.rejects(tb.gemm(false, false, 2, 2, 3, 1, A, B, 0, C), isArgError(/gemm: A was freed/));
  await assert.rejects(tb.gemm(false, false, 2, 2, 3, 1, B, s, 0, C), isArgError(/gemm: B was freed/));
  await assert.rejects(tb.add(C, A, 1), isArgError(/add: x was freed/));
  await assert.rejects(tb.swigluForward(C, B, A, 4), isArgError(/swigluForward: up was freed/));
  await assert.rejects(tb.rmsnormBackward(C, A, C, C, C, C, 1, 1), isArgError(/rmsnormBackward: dw was freed/));
  assert.equal(dev.opsRun, 0, 'an op reached the device with a freed buffer');
  // a host array or another backend's tensor is refused too
  await assert.rejects(tb.add(C, new Float32Array(4) as unknown as CudaTensor, 4), isArgError(/add: x must be a CudaTensor, got a host Float32Array/));
  const other = setup().tb;
  const foreign = other.alloc(4);
  await assert.rejects(tb.add(C, foreign, 4), isArgError(/add: x belongs to another CUDA backend/));
  // lengths are checked with the op and argument named
  await assert.rejects(tb.add(C, B, 5), isArgError(/add: y has length 4, expected at least 5/));
  await assert.rejects(tb.addBias(B, C, 2, 5), isArgError(/addBias: y has length 6, expected at least 10/));
  await assert.rejects(tb.addBias(B, C, 1, 5), isArgError(/addBias: bias has length 4, expected at least 5/));
  await assert.rejects(tb.maskScale(C, B, new Uint8Array(3), 2, 4, false), isArgError(/maskScale: mask has length 3, expected at least 4/));
  tb.free(B);
  tb.free(C);
  assert.equal(dev.mem.size, 0);
  assert.deepEqual(dev.log.filter((l) => l.startsWith('free')).length, 3);
});

test('a free while an op uses the tensor waits for the op; the op still sees live memory', async () => {
  const { dev, tb } = setup();
  const x = await tb.upload(randn(8)), y = tb.alloc(8);
  let open!: () => void;
  dev.gate = new Promise((r) => { open = r; });
  const running = tb.add(y, x, 8);
  tb.free(x);  // the op above has not run yet
  assert.equal(x.freed, true);
  assert.equal(dev.mem.size, 2, 'freed under a running op');
  await assert.rejects(tb.add(y, x, 8), isArgError(/add: x was freed/));
  open();
  await running;  // resolves its views while x is still allocated
  assert.equal(dev.mem.size, 1);
  assert.equal(tb.stats().deferredFrees, 1);
  dev.gate = null;
  tb.free(y);
  assert.equal(dev.mem.size, 0);
});

test('constant: one transfer per host array object, shared, never freed by callers, released with its array', async () => {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const { dev, tb } = setup();
  const w = randn(16);
  const [c1, c2] = await Promise.all([tb.constant(w), tb.constant(w)]);
  assert.equal(c1, c2);
  assert.equal(await tb.constant(w), c1);
  assert.equal(c1.constant, true);
  assert.deepEqual(await tb.download(c1), w);
  assert.equal(dev.log.filter((l) => l.startsWith('alloc')).length, 1);
  const w2 = w.slice();  // equal content, another object: its own copy
  assert.notEqual(await tb.constant(w2), c1);
  assert.throws(() => tb.free(c1), isArgError(/free: the buffer is a constant/));
  assert.equal(tb.stats().constants, 2);
  // a constant whose host array is collected is released
  await (async () => { await tb.constant(randn(32)); })();
  assert.equal(tb.stats().constants, 3);
  for (let i = 0; i < 50 && tb.stats().constantsCollected === 0; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.equal(tb.stats().constantsCollected, 1);
  assert.equal(tb.stats().constants, 2);
  assert.equal(dev.mem.size, 2);
  assert.deepEqual(await tb.download(await tb.constant(w)), w);
  // an allocation dropped without free is released by the backstop
  (() => { tb.alloc(1000); })();
  assert.equal(dev.mem.size, 3);
  for (let i = 0; i < 50 && tb.stats().collected === 0; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.equal(tb.stats().collected, 1);
  assert.equal(dev.mem.size, 2);
});

test('dispose releases every tensor and constant; later use throws', async () => {
  const { dev, tb } = setup();
  const a = await tb.upload(randn(10));
  tb.alloc(3);
  const w = randn(4);
  const c = await tb.constant(w);
  assert.equal(dev.mem.size, 3);
  tb.dispose();
  assert.equal(dev.mem.size, 0);
  assert.equal(a.freed, true);
  assert.equal(c.freed, true);
  await assert.rejects(tb.download(a), isArgError(/download: the CUDA backend was disposed/));
  assert.throws(() => tb.alloc(1), isArgError(/alloc: the CUDA backend was disposed/));
  assert.throws(() => tb.free(a), isArgError(/disposed/));
  tb.dispose();  // idempotent
});

test('every op reaches the backend with its buffers in order: results equal hostTensors(native) bit for bit', async () => {
  const { dev, tb } = setup();
  const T = 6, C = 16, H = 4, KV = 2, D = 4, I = 24, V = 11;
  const up = (a: Float32Array) => tb.upload(a);
  const check = async (what: string, t: CudaTensor, h: Float32Array) => assert.deepEqual(await tb.download(t), h, what);
  // gemm into a slice of a bigger buffer (offset addressing)
  const A = randn(T * C), B = randn(C * I), Cbig = randn(3 + T * I);
  const hC = Cbig.slice();
  const dBig = await up(Cbig);
  await tb.gemm(false, false, T, I, C, 0.5, await up(A), await up(B), 0.25, tb.slice(dBig, 3, 3 + T * I));
  await host.gemm(false, false, T, I, C, 0.5, A, B, 0.25, hC.subarray(3));
  await check('gemm', dBig, hC);
  // rmsnorm forward + backward
  const x = randn(T * C), w = randn(C), dout = randn(T * C), dwInit = randn(C);
  const hOut = new Float32Array(T * C), hR = new Float32Array(T), hDx = new Float32Array(T * C), hDw = dwInit.slice();
  const dOut = tb.alloc(T * C), dR = tb.alloc(T), dDx = tb.alloc(T * C), dDw = await up(dwInit);
  const dX = await up(x), dW = await tb.constant(w), dDout = await up(dout);
  await tb.rmsnormForward(dOut, dR, dX, dW, T, C, 1e-5);
  await host.rmsnormForward(hOut, hR, x, w, T, C, 1e-5);
  await tb.rmsnormBackward(dDx, dDw, dDout, dX, dW, dR, T, C);
  await host.rmsnormBackward(hDx, hDw, dout, x, w, hR, T, C);
  await check('rmsnorm out', dOut, hOut); await check('rstd', dR, hR); await check('dx', dDx, hDx); await check('dw', dDw, hDw);
  // rope, attention forward/backward
  const q = randn(T * H * D), k = randn(T * KV * D), v = randn(T * KV * D), cos = randn(8 * D / 2), sin = randn(8 * D / 2);
  const pos = Int32Array.from({ length: T }, (_, i) => i % 3);
  const dQ = await up(q), dK = await up(k), dV = await up(v), dCos = await tb.constant(cos), dSin = await tb.constant(sin);
  await tb.rope(dQ, dCos, dSin, pos, T, H, D, false);
  await host.rope(q, cos, sin, pos, T, H, D, false);
  await check('rope', dQ, q);
  const ao = new Float32Array(T * H * D), lse = new Float32Array(2 * H * 3);
  const dAo = tb.alloc(T * H * D), dLse = tb.alloc(2 * H * 3);
  await tb.attentionForward(dAo, dLse, dQ, dK, dV, 2, 3, H, KV, D);
  await host.attentionForward(ao, lse, q, k, v, 2, 3, H, KV, D);
  await check('attention out', dAo, ao); await check('lse', dLse, lse);
  const gO = randn(T * H * D), hq = new Float32Array(T * H * D), hk = new Float32Array(T * KV * D), hv = new Float32Array(T * KV * D);
  const dq = tb.alloc(T * H * D), dk = tb.alloc(T * KV * D), dv = tb.alloc(T * KV * D);
  await tb.attentionBackward(dq, dk, dv, await up(gO), dQ, dK, dV, dAo, dLse, 2, 3, H, KV, D);
  await host.attentionBackward(hq, hk, hv, gO, q, k, v, ao, lse, 2, 3, H, KV, D);
  await check('dq', dq, hq); await check('dk', dk, hk); await check('dv', dv, hv);
  // swiglu, embedding, cross-entropy, bias, mask-scale
  const g = randn(T * I), u = randn(T * I), so = new Float32Array(T * I), dg = new Float32Array(T * I), du = new Float32Array(T * I);
  const dG = await up(g), dU = await up(u), dSo = tb.alloc(T * I), dDg = tb.alloc(T * I), dDu = tb.alloc(T * I);
  await tb.swigluForward(dSo, dG, dU, T * I); await host.swigluForward(so, g, u, T * I);
  const gs = randn(T * I);
  await tb.swigluBackward(dDg, dDu, await up(gs), dG, dU, T * I); await host.swigluBackward(dg, du, gs, g, u, T * I);
  await check('swiglu', dSo, so); await check('dgate', dDg, dg); await check('dup', dDu, du);
  const table = randn(V * C), ids = Int32Array.from({ length: T }, (_, i) => (i * 7) % V), emb = new Float32Array(T * C);
  const dEmb = tb.alloc(T * C);
  await tb.embeddingForward(dEmb, ids, await tb.constant(table), T, C, V); await host.embeddingForward(emb, ids, table, T, C, V);
  await check('embedding', dEmb, emb);
  const logits = randn(T * V), labels = Int32Array.from({ length: T }, (_, i) => (i === 2 ? -100 : (i * 5) % V));
  const m = new Float32Array(T).fill(-Infinity), s = new Float32Array(T), picked = new Float32Array(T);
  const dLg = await up(logits), dM = await up(m), dS = await up(s), dP = await up(picked);
  await tb.crossEntropyChunkForward(dLg, labels, 0, T, V, dM, dS, dP);
  await host.crossEntropyChunkForward(logits, labels, 0, T, V, m, s, picked);
  await check('ce m', dM, m); await check('ce s', dS, s); await check('ce picked', dP, picked);
  const lseCe = Float32Array.from(m, (mm, i) => mm + Math.log(s[i] || 1)), scale = randn(T);
  await tb.crossEntropyChunkBackward(dLg, labels, 0, T, V, await up(lseCe), await up(scale));
  await host.crossEntropyChunkBackward(logits, labels, 0, T, V, lseCe, scale);
  await check('ce backward', dLg, logits);
  const y = randn(T * C), bias = randn(C), dY = await up(y);
  await tb.addBias(dY, await tb.constant(bias), T, C); await host.addBias(y, bias, T, C);
  const mask = Uint8Array.from({ length: T * C }, (_, i) => (i % 3 ? 1 : 0)), xs = randn(T * C);
  const dXs = await up(xs);
  await tb.maskScale(dY, dXs, mask, 1 / 0.9, T * C, true); await host.maskScale(y, xs, mask, 1 / 0.9, T * C, true);
  await check('addBias + maskScale accumulate', dY, y);
  const ms = new Float32Array(T * C), dMs = tb.alloc(T * C);
  await tb.maskScale(dMs, dXs, mask, 1 / 0.9, T * C, false); await host.maskScale(ms, xs, mask, 1 / 0.9, T * C, false);
  await check('maskScale', dMs, ms);
  assert.equal(dev.opsRun, 11);  // the Backend ops above; add/addBias/maskScale/copies go to the device directly
});

test('a tiny-model stage computing on CudaTensors (stand-in device) equals the native backend bit for bit and frees what it allocates', async () => {
  const md = await openModelDir(await ensureTinyModel());
  try {
    const lora: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true };
    for (const [layerStart, layerEnd] of [[0, 4], [1, 3]]) {
      const { dev, tb } = setup();
      // the native backend, except that tensorsOf(backend) gives the stand-in's CudaTensors
      const be = new Proxy(native, {
        get: (t, k) => (k === 'tensors' ? () => tb : typeof (t as never)[k] === 'function' ? ((t as never)[k] as Function).bind(t) : (t as never)[k]),
      }) as Backend;
      const cpu = await loadStage(md.weights, native, { layerStart, layerEnd, lora, seed: 1 });
      const dv = await loadStage(md.weights, be, { layerStart, layerEnd, lora, seed: 1 });
      const init = new Rng(3, 4);
      for (let i = 0; i < cpu.params.length; i++) {
        init.fillNormal(cpu.params[i].data, 0, 0.05);
        dv.params[i].data.set(cpu.params[i].data);
      }
      const tag = `[${layerStart}, ${layerEnd})`;
      for (const key of ['a', 'b']) {
        const want = await stageStep(cpu, key, 2, 24, new Rng(9, key.charCodeAt(0)));
        const before = tb.stats();
        const got = await stageStep(dv, key, 2, 24, new Rng(9, key.charCodeAt(0)));
        const after = tb.stats();
        assert.ok(after.allocs - before.allocs > 20, `${tag}: the stage did not compute on the backend's tensors()`);
        assert.equal(got.lossSum, want.lossSum, `${tag} ${key}: loss`);
        for (const k of ['hidden', 'gradIn'] as const) {
          assert.equal(got[k] === undefined, want[k] === undefined, `${tag}: ${k}`);
          if (got[k]) assert.deepEqual(got[k], want[k], `${tag} ${key}: ${k}`);
        }
        for (let i = 0; i < want.grads.length; i++) assert.deepEqual(got.grads[i], want.grads[i], `${tag} ${key}: grad ${cpu.params[i].name}`);
        // every tensor a step allocates is freed by the end of its backward (constants stay cached)
        if (key === 'b') assert.equal(after.tensors, before.tensors, `${tag}: live tensors ${before.tensors} -> ${after.tensors}`);
        assert.equal(after.allocs - before.allocs, after.frees - before.frees + after.tensors - before.tensors);
        assert.equal(after.collected, 0, `${tag}: tensors dropped without free`);
      }
      assert.ok(tb.stats().constants > 0, 'frozen arrays go through constant()');
      cpu.dispose();
      dv.dispose();
      tb.dispose();
      assert.equal(dev.mem.size, 0);
    }
  } finally {
    await md.close();
  }
});

async function stageStep(stage: Stage, key: string, B: number, S: number, r: Rng):
  Promise<{ lossSum?: number; hidden?: Float32Array; grads: Float32Array[]; gradIn?: Float32Array }> {
  const C = stage.config.hiddenSize, V = stage.config.vocabSize;
  const ids = Int32Array.from({ length: B * S }, () => r.nextU32() % V);
  const labels = Int32Array.from({ length: B * S }, (_, i) => ((i + 1) % S === 0 ? -100 : ids[i + 1]));
  const hidden = stage.isFirst ? undefined : r.fillNormal(new Float32Array(B * S * C), 0, 1);
  const grads = stage.newGrads();
  const fwd = await stage.forward({ key, batch: B, seqLen: S, ids: stage.isFirst ? ids : undefined, hidden, labels, dropoutSeed: 7 }, { train: true });
  const gradOut = stage.isLast ? undefined : r.fillNormal(new Float32Array(B * S * C), 0, 1);
  const bwd = await stage.backward(key, grads, stage.isLast ? { lossScale: 1 / (fwd.tokens ?? 1) } : { gradOut });
  return { lossSum: fwd.lossSum, hidden: fwd.hidden, grads, gradIn: bwd.gradIn };
}
