// The addon's two op paths without a GPU: the real N-API addon (cuda/addon/*.cc) is compiled here against a
// host-memory stand-in for libswarmtune_cuda.so (cuda/testing/stub/host-stub.cc, plus a failing definition for every
// other api.h entry point), then driven through cuda/index.ts and CudaTensors exactly as on a GPU machine.
//
// Checked: an op whose buffers are all device addresses is launched inline on the JS thread and returns an
// already-settled promise (no worker hop), an op with a host array runs on a worker; failures of inline ops
// reject the settled promise with the library's status; a fault queued by a device-only op surfaces at the next
// download as CudaAsyncError and poisons later ops; CudaTensors' free logic with ops that complete inline (freed
// at once) and with a worker op in flight (deferred until it completes). Needs g++ and node_api.h (build.sh's
// requirements); about 5-15 s, mostly compiling.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { hostTensors } from '../engine/backend.ts';
import { NativeBackend } from '../engine/backends/native.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dir = mkdtempSync(join(tmpdir(), 'stc-stub-'));

function nodeInclude(): string | null {
  for (const d of [resolve(process.execPath, '../../include/node'), '/usr/include/node', '/usr/local/include/node']) {
    if (existsSync(join(d, 'node_api.h'))) return d;
  }
  return null;
}
function hasGxx(): boolean {
  try { execFileSync('g++', ['--version'], { stdio: 'ignore' }); return true; } catch { return false; }
}
const skip = !hasGxx() ? 'g++ not installed' : !nodeInclude() ? 'node_api.h not found' : false;

// every api.h entry point the stub does not define fails with STC_E_INVALID
function fallbacks(): string {
  const header = readFileSync(join(root, 'cuda', 'src', 'api.h'), 'utf8').replace(/\/\*[\s\S]*?\*\//g, '');
  const stub = readFileSync(join(root, 'cuda', 'testing', 'stub', 'host-stub.cc'), 'utf8');
  const out = ['#include "' + join(root, 'cuda', 'src', 'api.h') + '"', 'extern "C" {'];
  for (const m of header.matchAll(/STC_API\s+([\w\s*]+?)\b(stc_\w+)\s*\(([^)]*)\)\s*;/g)) {
    const [, ret, name, args] = m;
    if (new RegExp(`\\b${name}\\s*\\([^;]*\\)\\s*\\{`).test(stub)) continue;
    const r = ret.trim();
    const body = r === 'void' ? '' : r === 'int' ? 'return STC_E_INVALID;' : r.includes('*') ? 'return nullptr;' : 'return -1;';
    out.push(`${r} ${name}(${args}) { ${body} }`);
  }
  out.push('}');
  return out.join('\n');
}

type Native = any; // eslint-disable-line @typescript-eslint/no-explicit-any
let native: Native;
let cudaIndex: typeof import('../cuda/index.ts');

before(() => {
  if (skip) return;
  writeFileSync(join(dir, 'fallbacks.cc'), fallbacks());
  execFileSync('g++', ['-O1', '-std=c++17', '-shared', '-fPIC', join(root, 'cuda', 'testing', 'stub', 'host-stub.cc'),
    join(dir, 'fallbacks.cc'), '-o', join(dir, 'libswarmtune_cuda.so')], { stdio: 'inherit' });
  const napiInc = dirname(createRequire(import.meta.url).resolve('node-addon-api/package.json'));
  const addonSources = readdirSync(join(root, 'cuda', 'addon')).filter((f) => f.endsWith('.cc')).map((f) => join(root, 'cuda', 'addon', f));
  execFileSync('g++', ['-O1', '-std=c++17', '-shared', '-fPIC', '-fvisibility=hidden', '-DNAPI_VERSION=8',
    '-DNAPI_DISABLE_CPP_EXCEPTIONS', `-I${nodeInclude()}`, `-I${napiInc}`, ...addonSources,
    '-o', join(dir, 'swarmtune_cuda.node'), `-L${dir}`, '-lswarmtune_cuda', '-Wl,-rpath,$ORIGIN'], { stdio: 'inherit' });
  process.env.SWARMTUNE_CUDA_ADDON = join(dir, 'swarmtune_cuda.node');
});

async function load() {
  cudaIndex ??= await import('../cuda/index.ts');
  assert.equal(cudaIndex.CUDA_ADDON_PATH, join(dir, 'swarmtune_cuda.node'), 'the stub addon is the one loaded');
  native ??= cudaIndex.loadCudaAddon();
  assert.ok(native, `stub addon failed to load: ${cudaIndex.cudaUnavailableReason()}`);
  return { native, cuda: cudaIndex };
}

/** true when p is already settled: its reaction runs within the current microtask turns, which a worker's
 *  completion (delivered by a later event-loop turn) never does */
async function settledNow(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(() => { done = true; }, () => { done = true; });
  await null;
  await null;
  return done;
}

test('device-only ops launch inline and return settled promises; host-array ops take a worker', { skip }, async () => {
  const { native } = await load();
  const ctx = native.open(0, 0);
  const n = 1000;
  const y = native.devAlloc(ctx, 4 * n), x = native.devAlloc(ctx, 4 * n);
  const before = native.opStats(ctx);
  const up = native.copy(ctx, y, Float32Array.from({ length: n }, (_, i) => i), 4 * n);  // host source
  assert.equal(await settledNow(up), false, 'a copy from a host array is queued on a worker, not settled yet');
  await up;
  const s1 = native.opStats(ctx);
  assert.equal(s1.workerOps - before.workerOps, 1);
  assert.equal(s1.inlineOps - before.inlineOps, 0);
  await native.copy(ctx, x, new Float32Array(n).fill(0.5), 4 * n);

  const ops = [native.add(ctx, y, x, n), native.addBias(ctx, y, x, 10, 100),
    native.maskScale(ctx, y, y, new Uint8Array(n).fill(1), 2, n, false),  // host mask bytes: still inline
    native.copy(ctx, x, y, 4 * n)];                                        // device to device: inline
  for (const p of ops) assert.equal(await settledNow(p), true, 'an all-device op returns a settled promise');
  const s2 = native.opStats(ctx);
  assert.equal(s2.inlineOps - s1.inlineOps, 4);
  assert.equal(s2.workerOps - s1.workerOps, 1, 'only the second upload used a worker');
  assert.equal(s2.asyncOps - s1.asyncOps, 4, 'the library queued the four ops without waiting');
  assert.ok(s2.pendingOps >= 4, 'they count as pending until a wait');

  const out = new Float32Array(n);
  await native.copy(ctx, out, x, 4 * n);  // download: a worker, which waits for the queue first
  const s3 = native.opStats(ctx);
  assert.equal(s3.pendingOps, 0, 'the download waited for every queued op');
  for (let i = 0; i < n; i++) assert.equal(out[i], Math.fround((Math.fround(i + 0.5) + 0.5) * 2), `out[${i}]`);

  // mixed arguments (device y, host x) go to a worker
  const mixed = native.add(ctx, y, new Float32Array(n), n);
  assert.equal(await settledNow(mixed), false);
  await mixed;
  assert.equal(native.opStats(ctx).workerOps - s3.workerOps, 1);
  native.close(ctx);
});

test('an inline op that fails rejects its settled promise with the library status and message', { skip }, async () => {
  const { native, cuda } = await load();
  const ctx = native.open(0, 0);
  const y = native.devAlloc(ctx, 16);
  const p = native.add(ctx, y, y, -1);
  assert.equal(await settledNow(p), true);
  await assert.rejects(p, (e: Error & { cudaStatus: number; asynchronous: boolean }) =>
    e.cudaStatus === 10001 && e.asynchronous === false && /add: negative n=-1/.test(e.message));
  // through CudaBackend: an argument error is typed before anything reaches the library
  const be = await cuda.loadCudaBackend({ weightCacheBytes: 0 });
  assert.ok(be);
  const tb = be.tensors();
  await assert.rejects(() => tb.add(tb.alloc(2), tb.alloc(1), 2), cuda.CudaArgumentError);
  be.dispose();
  native.close(ctx);
});

test('a fault queued by a device-only op surfaces at the next download as CudaAsyncError and poisons later ops', { skip }, async () => {
  const { cuda } = await load();
  const be = (await cuda.loadCudaBackend({ weightCacheBytes: 0 }))!;
  const tb = be.tensors();
  const t = await tb.upload(new Float32Array([1, 2, 3]));
  await be.debugFault('illegal-address');        // launched: returns before the fault is seen
  await tb.add(t, t, 3);                          // queued behind it, also returns
  assert.equal(be.opStats().stickyStatus, 0, 'nothing has waited yet');
  await assert.rejects(tb.download(t), (e: Error) => e instanceof cuda.CudaAsyncError && e instanceof cuda.CudaError &&
    (e as InstanceType<typeof cuda.CudaAsyncError>).status === 700 && /asynchronous failure of an earlier op/.test(e.message) &&
    (e as InstanceType<typeof cuda.CudaAsyncError>).op === 'CudaTensors.copy');
  assert.equal(be.opStats().stickyStatus, 700);
  // sticky: an inline op now fails too, still typed as a consequence of the earlier failure
  await assert.rejects(tb.add(t, t, 3), (e: Error) => e instanceof cuda.CudaAsyncError && /unusable after an earlier asynchronous failure/.test(e.message));
  await assert.rejects(be.synchronize(), cuda.CudaAsyncError);
  be.dispose();
});

test('syncEachOp makes device-only ops wait, so a fault is reported by the op that caused it', { skip }, async () => {
  const { cuda } = await load();
  const be = (await cuda.loadCudaBackend({ weightCacheBytes: 0, syncEachOp: true }))!;
  assert.equal(be.opStats().syncEachOp, true);
  const tb = be.tensors();
  const t = await tb.upload(new Float32Array([1, 2]));
  const s0 = be.opStats();
  await tb.add(t, t, 2);
  const s1 = be.opStats();
  assert.equal(s1.asyncOps - s0.asyncOps, 0);
  assert.equal(s1.syncedOps - s0.syncedOps, 1);
  assert.equal(s1.inlineOps - s0.inlineOps, 1, 'still inline (a synchronous call on the JS thread)');
  await assert.rejects(be.debugFault('illegal-address'), (e: Error) => e instanceof cuda.CudaAsyncError && e.message.includes('debugFault'));
  be.dispose();
});

test('CudaTensors frees with inline ops: released at once after an inline op, deferred behind a worker op in flight', { skip }, async () => {
  const { cuda } = await load();
  const be = (await cuda.loadCudaBackend({ weightCacheBytes: 0 }))!;
  const tb = be.tensors();
  const a = await tb.upload(new Float32Array([1, 2, 3, 4]));
  const b = await tb.upload(new Float32Array([10, 20, 30, 40]));
  const p = tb.add(a, b, 4);   // inline: the library call has returned when add() returns its promise
  tb.free(b);                  // b is still marked busy until the promise's continuation runs
  await p;
  let st = be.tensorStats();
  assert.equal(st.libraryTensors, 1, 'b went back to the pool once the (inline) op completed');
  assert.equal(st.deferredFrees, 1);
  const c = tb.alloc(4);
  await tb.add(c, a, 4);
  tb.free(c);                  // after an awaited inline op: released immediately
  st = be.tensorStats();
  assert.equal(st.deferredFrees, 1);
  assert.equal(st.libraryTensors, 1);
  // a download (worker) in flight: the free waits for it, and the download still reads live memory
  const dl = tb.download(a);
  assert.equal(await settledNow(dl), false);
  tb.free(a);
  assert.equal(be.tensorStats().libraryTensors, 1, 'not released while the worker copy runs');
  assert.deepEqual([...await dl], [11, 22, 33, 44]);
  st = be.tensorStats();
  assert.equal(st.libraryTensors, 0);
  assert.equal(st.deferredFrees, 2);
  be.dispose();
});

test('a chain of inline ops on the stub equals hostTensors(native) bit for bit', { skip }, async () => {
  const { cuda } = await load();
  const be = (await cuda.loadCudaBackend({ weightCacheBytes: 0 }))!;
  const tb = be.tensors();
  const ht = hostTensors(new NativeBackend());
  const n = 64, T = 4, N = 16;
  const rnd = (s: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + s) * 1e3 / (i + 1));
  const mask = Uint8Array.from({ length: n }, (_, i) => (i * 7) % 3 === 0 ? 0 : 1);
  const [y0, x0, b0] = [rnd(1), rnd(2), rnd(3).subarray(0, N)];
  const dy = await tb.upload(y0), dx = await tb.upload(x0), db = await tb.upload(Float32Array.from(b0));
  const hy = ht.alloc(n), hx = ht.alloc(n);
  hy.set(y0); hx.set(x0);
  const s0 = be.opStats();
  await tb.add(dy, dx, n); await ht.add(hy, hx, n);
  await tb.addBias(dy, db, T, N); await ht.addBias(hy, Float32Array.from(b0), T, N);
  await tb.maskScale(dx, dy, mask, 1 / 0.9, n, true); await ht.maskScale(hx, hy, mask, 1 / 0.9, n, true);
  await tb.maskScale(dy, dy, mask, 1 / 0.9, n, false); await ht.maskScale(hy, hy, mask, 1 / 0.9, n, false);
  assert.equal(be.opStats().inlineOps - s0.inlineOps, 4);
  assert.deepEqual(await tb.download(dy), hy);
  assert.deepEqual(await tb.download(dx), hx);
  be.dispose();
});
