// createBackend('auto'): the best backend that works, and the GPU self-check that guards it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createBackend, selfCheck, RefBackend, NativeBackend } from '../engine/backends/index.ts';
import type { Backend } from '../engine/backend.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';

// the backends by kind, as bin/swarmtune.ts registers them
registerBuiltinBackends();

test('auto gives the native CPU backend on a machine without a usable GPU', async () => {
  const notes: string[] = [];
  const be = await createBackend('auto', { note: (m) => notes.push(m) });
  try {
    assert.ok(be instanceof NativeBackend, `got ${be.name}`);
    assert.deepEqual(notes, []);
  } finally { be.dispose(); }
});

test('auto falls back to the reference backend, saying why, when the native addon cannot load', () => {
  // a fresh process: this one has the addon loaded already
  const script = `
    import { createBackend } from ${JSON.stringify(new URL('../engine/backends/index.ts', import.meta.url).href)};
    import { registerBuiltinBackends } from ${JSON.stringify(new URL('../bin/backends.ts', import.meta.url).href)};
    registerBuiltinBackends();
    const notes = [];
    const be = await createBackend('auto', { note: (m) => notes.push(m) });
    let cpu = 'ok';
    try { await createBackend('cpu'); } catch (e) { cpu = e.name + ': ' + e.message; }
    console.log(JSON.stringify({ name: be.name, notes, cpu }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    env: { ...process.env, SWARMTUNE_NATIVE_ADDON: '/nonexistent/swarmtune_native.node' }, encoding: 'utf8',
  });
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { name: string; notes: string[]; cpu: string };
  assert.equal(out.name, new RefBackend().name);
  assert.equal(out.notes.length, 1);
  assert.match(out.notes[0]!, /native CPU backend unavailable.*npm run build/);
  assert.match(out.cpu, /^NativeAddonMissingError: /);
});

test('the self-check accepts an agreeing backend and rejects a wrong, non-finite or failing one', async () => {
  const cpu = new RefBackend();
  const wrap = (f: (C: Float32Array) => void, fail = false): Backend => {
    const inner = new RefBackend();
    return new Proxy(inner, {
      get(t, p) {
        if (p !== 'gemm') return Reflect.get(t, p);
        return async (...a: Parameters<Backend['gemm']>) => {
          if (fail) throw new Error('cudaErrorIllegalAddress');
          await inner.gemm(...a);
          f(a[9]);
        };
      },
    });
  };
  assert.equal(await selfCheck(new RefBackend(), cpu), null);
  // bf16-sized rounding noise passes
  assert.equal(await selfCheck(wrap((C) => { for (let i = 0; i < C.length; i++) C[i] = C[i]! * (1 + 2 ** -8 * ((i % 3) - 1)); }), cpu), null);
  assert.match((await selfCheck(wrap((C) => { C[7] = C[7]! + 10; }), cpu))!, /disagrees .*relative error/);
  assert.match((await selfCheck(wrap((C) => { C[0] = NaN; }), cpu))!, /disagrees/);
  assert.match((await selfCheck(wrap(() => {}, true), cpu))!, /self-check GEMM failed: cudaErrorIllegalAddress/);
});

test('the device-tensor self-check runs the stage path (upload, GEMM, add, download) and rejects a wrong or failing one', async () => {
  const { selfCheckTensors } = await import('../engine/backends/index.ts');
  const { SimDevice, simDeviceBackend } = await import('./sim-device.ts');
  const cpu = new RefBackend();
  assert.equal(await selfCheckTensors(cpu, cpu), null, 'no device tensors: nothing to check');
  const good = simDeviceBackend(new RefBackend());
  assert.equal(await selfCheckTensors(good.backend, cpu), null);
  assert.equal(good.sim.live(), 0, 'the check frees what it allocates');
  const withTensors = (sim: InstanceType<typeof SimDevice>): Backend => {
    const inner = new RefBackend();
    return new Proxy(inner, { get: (t, p) => (p === 'tensors' ? () => sim : Reflect.get(t, p)) });
  };
  class WrongAdd extends SimDevice { override add(): Promise<void> { return Promise.resolve(); } }
  class FailingUpload extends SimDevice { override upload(): Promise<never> { return Promise.reject(new Error('cudaErrorLaunchFailure')); } }
  assert.match((await selfCheckTensors(withTensors(new WrongAdd(new RefBackend())), cpu))!, /device-tensor self-check disagrees/);
  assert.match((await selfCheckTensors(withTensors(new FailingUpload(new RefBackend())), cpu))!, /device-tensor self-check failed: cudaErrorLaunchFailure/);
});

test('cuda:N names a GPU; unknown kinds are refused by name; a volunteer whose auto backend is CUDA advertises the GPU', async () => {
  await assert.rejects(createBackend('cuda:1'), (e: Error) => e.name === 'BackendUnavailableError' && /CUDA backend is not available/.test(e.message));
  await assert.rejects(createBackend('gpu' as never), /unknown backend kind "gpu"; expected auto, cpu, ref, cuda or cuda:N/);
  const { probeCapabilities } = await import('../node/probe.ts');
  const cpu = new RefBackend();
  const caps = await probeCapabilities(cpu, { device: 'auto' });
  assert.equal(caps.backend, 'cpu');
  // a backend that reports itself as CUDA is probed as the GPU (here there is none, so the GPU probe fails)
  const gpuLike = new Proxy(cpu, { get: (t, p) => (p === 'name' ? 'cuda' : Reflect.get(t, p)) });
  await assert.rejects(probeCapabilities(gpuLike, { device: 'auto' }), /no usable CUDA device/);
});
