// GPU: the engine's Optimizer on CUDA (CudaBackend.createOptimizer → cuda/optimizer.ts over the paged AdamW)
// against the CPU AdamW over several steps, and checkpoints moving between the two. Skipped without a GPU.
// Tolerances: 32-bit state within float rounding (the kernels may contract to FMA); 8-bit codes may sit one
// step of the dynamic map apart at midpoints and drift over steps, so params are compared at 0.3 of one
// update (lr): a wrong step count or bias correction is off by about a whole update.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AdamW, createOptimizer } from '../../engine/train/optim.ts';
import type { AdamWOptions } from '../../engine/optimizer.ts';
import { assertClose, cuda, randn, rng, skip } from './helpers.ts';

const specs = [{ name: 'a', numel: 70_000 }, { name: 'b', numel: 1000 }, { name: 'c', numel: 4096 }];
const opts = (optim: AdamWOptions['optim']): AdamWOptions => ({ optim, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01 });

for (const optim of ['paged_adamw_32bit', 'paged_adamw_8bit'] as const) {
  test(`createOptimizer on CUDA (${optim}) = CPU AdamW over 6 steps; CPU and GPU checkpoints interchange`, { skip }, async () => {
    const gpu = createOptimizer(cuda!, specs, opts(optim));
    assert.match(gpu.device, /^cuda:/, 'the CUDA backend serves this optim');
    const cpu = new AdamW(specs, opts(optim));
    const r = rng(40);
    const pg = specs.map((s) => randn(r, s.numel, 0.3)), pc = pg.map((p) => p.slice());
    const lr = 1e-3;
    for (let step = 0; step < 6; step++) {
      const g = specs.map((s) => randn(r, s.numel, 0.05));
      await gpu.update(pg, g, lr);
      cpu.update(pc, g, lr);
      pg.forEach((p, i) => assertClose(`${optim} ${specs[i]!.name} step ${step + 1}`, p, pc[i]!, { atol: optim.endsWith("8bit") ? 0.3 * lr : 1e-3 * lr, rtol: 1e-6 }));
    }
    assert.equal(gpu.step, 6);
    const st = await gpu.exportState();
    assert.deepEqual(st.tensors.map((t) => [t.name, t.dtype, t.shape]), cpu.exportState().tensors.map((t) => [t.name, t.dtype, t.shape]));
    // the GPU's checkpoint continues on the CPU and the CPU's on the GPU
    const cpu2 = new AdamW(specs, opts(optim));
    cpu2.importState(st);
    const gpu2 = createOptimizer(cuda!, specs, opts(optim));
    await gpu2.importState(cpu.exportState());
    const g = specs.map((s) => randn(r, s.numel, 0.05));
    const a = pc.map((p) => p.slice()), b = pc.map((p) => p.slice());
    cpu2.update(a, g, lr);
    await gpu2.update(b, g, lr);
    a.forEach((p, i) => assertClose(`resumed ${specs[i]!.name}`, b[i]!, p, { atol: optim.endsWith("8bit") ? 0.3 * lr : 1e-3 * lr, rtol: 1e-6 }));
    gpu.dispose();
    gpu2.dispose();
  });
}

test('createOptimizer on CUDA leaves adamw_torch and a disk-spilling budget to the CPU AdamW', { skip }, () => {
  assert.ok(createOptimizer(cuda!, specs, opts('adamw_torch')) instanceof AdamW);
  // a finite residentBytes needs a spill directory (created only on the first spill: none happens here)
  const spillDir = join(tmpdir(), `swarmtune-gpu-optimizer-${process.pid}`);
  assert.ok(createOptimizer(cuda!, specs, { ...opts('paged_adamw_8bit'), residentBytes: 1 << 20, spillDir }) instanceof AdamW);
});
