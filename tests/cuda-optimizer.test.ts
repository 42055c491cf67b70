// CudaOptimizer (cuda/optimizer.ts): the CUDA paged AdamW behind the engine's Optimizer interface. Without a
// GPU this checks everything but the kernels, against a stand-in paged optimizer whose tensors are the CPU
// AdamW's (one per tensor): hyperparameters and the 1-based step reach every tensor, the state converts to
// and from the CPU AdamW's checkpoint format byte for byte, a bad state is refused before anything is
// written, and which optims the GPU serves. tests/gpu/optimizer.gpu.ts runs the same against the real kernels.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { AdamW } from '../engine/train/optim.ts';
import type { AdamWOptions, OptimizerState, StateTensor } from '../engine/optimizer.ts';
import { CudaOptimizer, cudaOptimizerBits } from '../cuda/optimizer.ts';
import type { PagedAdamWLike } from '../cuda/optimizer.ts';
import { Rng } from '../engine/model/rng.ts';

type State = { m: Float32Array; v: Float32Array } | { state1: Uint8Array; state2: Uint8Array; absmax1: Float32Array; absmax2: Float32Array };

/** CudaPagedAdamW's contract over CPU AdamWs: one per tensor, the step number checked on every call */
class StandInPaged implements PagedAdamWLike {
  readonly tensors: AdamW[] = [];
  destroyed = false;
  private readonly opts: AdamWOptions;
  constructor(opts: AdamWOptions) { this.opts = opts; }
  add(n: number): number {
    this.tensors.push(new AdamW([{ name: 't', numel: n }], this.opts));
    return this.tensors.length - 1;
  }
  async step(id: number, p: Float32Array, g: Float32Array, hp: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number }): Promise<void> {
    const a = this.tensors[id]!;
    // like the kernel, the stand-in keeps no step count: the bias corrections use the step it is given
    a.step = hp.step - 1;
    assert.deepEqual([hp.beta1, hp.beta2, hp.eps, hp.weightDecay], [this.opts.beta1, this.opts.beta2, this.opts.eps, this.opts.weightDecay]);
    a.update([p], [g], hp.lr);
  }
  readState(id: number): State {
    const st = this.tensors[id]!.exportState();
    const t = (s: string) => st.tensors.find((x) => x.name === `t.${s}`)!.data;
    if (st.tensors.length === 2) return { m: t('exp_avg') as Float32Array, v: t('exp_avg_sq') as Float32Array };
    return { state1: t('state1') as Uint8Array, state2: t('state2') as Uint8Array, absmax1: t('absmax1') as Float32Array, absmax2: t('absmax2') as Float32Array };
  }
  writeState(id: number, st: State): void {
    const a = this.tensors[id]!;
    const tensors: StateTensor[] = 'm' in st
      ? [{ name: 't.exp_avg', dtype: 'F32' as const, shape: [st.m.length], data: st.m }, { name: 't.exp_avg_sq', dtype: 'F32' as const, shape: [st.v.length], data: st.v }]
      : [{ name: 't.state1', dtype: 'U8' as const, shape: [st.state1.length], data: st.state1 }, { name: 't.state2', dtype: 'U8' as const, shape: [st.state2.length], data: st.state2 },
        { name: 't.absmax1', dtype: 'F32' as const, shape: [st.absmax1.length], data: st.absmax1 }, { name: 't.absmax2', dtype: 'F32' as const, shape: [st.absmax2.length], data: st.absmax2 }];
    a.importState({ optim: a.optim, step: a.step, tensors });
  }
  destroy(): void { this.destroyed = true; }
}

const specs = [{ name: 'a', numel: 5000 }, { name: 'b', numel: 300 }, { name: 'c', numel: 8192 + 17 }];
const opts = (optim: AdamWOptions['optim']): AdamWOptions => ({ optim, beta1: 0.9, beta2: 0.995, eps: 1e-6, weightDecay: 0.01 });

function tensorsFor(seed: number): Float32Array[] {
  const rng = new Rng(seed);
  return specs.map((s) => rng.fillNormal(new Float32Array(s.numel), 0, 0.5));
}

for (const optim of ['paged_adamw_32bit', 'adamw_8bit', 'paged_adamw_8bit'] as const) {
  test(`CudaOptimizer (${optim}) drives the paged optimizer like the CPU AdamW; state round-trips in its checkpoint format`, async () => {
    const cpu = new AdamW(specs, opts(optim));
    const paged = new StandInPaged(opts(optim));
    const bits = cudaOptimizerBits(opts(optim))!;
    const gpu = new CudaOptimizer(paged, bits, specs, opts(optim));
    const pc = tensorsFor(1), pg = tensorsFor(1);
    for (let step = 0; step < 4; step++) {
      const g = tensorsFor(100 + step);
      if (step === 2) g[0]![7] = NaN; // bnb skips a non-finite element
      cpu.update(pc, g, 1e-2 * (step + 1));
      await gpu.update(pg, g, 1e-2 * (step + 1));
    }
    assert.equal(gpu.step, 4);
    pc.forEach((p, i) => assert.deepEqual(pg[i], p, specs[i]!.name));
    const exported = gpu.exportState();
    assert.deepEqual(exported, cpu.exportState(), 'same names, dtypes, shapes and bytes as the CPU AdamW');
    // a CPU checkpoint continues on the GPU optimizer (and the other way) with the same result
    const resumed = new CudaOptimizer(new StandInPaged(opts(optim)), bits, specs, opts(optim));
    resumed.importState(cpu.exportState());
    assert.equal(resumed.step, 4);
    const cpu2 = new AdamW(specs, opts(optim));
    cpu2.importState(exported);
    const g = tensorsFor(999);
    const a = pc.map((p) => new Float32Array(p)), b = pc.map((p) => new Float32Array(p));
    await resumed.update(a, g, 3e-3);
    cpu2.update(b, g, 3e-3);
    a.forEach((p, i) => assert.deepEqual(p, b[i], specs[i]!.name));
    gpu.dispose();
    assert.ok(paged.destroyed);
    await assert.rejects(gpu.update(pg, g, 1), /disposed/);
  });
}

test('CudaOptimizer refuses a bad state before writing anything, and bad arguments by name', async () => {
  const gpu = new CudaOptimizer(new StandInPaged(opts('paged_adamw_8bit')), 8, specs, opts('paged_adamw_8bit'));
  const good = gpu.exportState();
  const bad: OptimizerState = { ...good, tensors: good.tensors.filter((t) => t.name !== 'c.absmax2') };
  bad.tensors = bad.tensors.map((t) => t.name === 'a.state1' ? { ...t, data: new Uint8Array(t.data.length).fill(7) } : t);
  assert.throws(() => gpu.importState(bad), /missing optimizer tensor c\.absmax2/);
  assert.deepEqual(gpu.exportState(), good, 'nothing written');
  assert.throws(() => gpu.importState({ ...good, optim: 'adamw_torch' }), /optim adamw_torch/);
  await assert.rejects(gpu.update([new Float32Array(1)], [new Float32Array(1)], 1), /expected 3 params/);
  await assert.rejects(gpu.update(tensorsFor(1), tensorsFor(2), NaN), /lr must be finite/);
  assert.throws(() => new CudaOptimizer(new StandInPaged(opts('adamw_8bit')), 8, [{ name: 'x', numel: 0 }], opts('adamw_8bit')), /bad numel/);
});

test('which optims the CUDA optimizer serves (the rest stay on the CPU AdamW)', () => {
  assert.equal(cudaOptimizerBits({ optim: 'paged_adamw_32bit' }), 32);
  assert.equal(cudaOptimizerBits({ optim: 'adamw_8bit' }), 8);
  assert.equal(cudaOptimizerBits({ optim: 'paged_adamw_8bit', residentBytes: Infinity }), 8);
  assert.equal(cudaOptimizerBits({ optim: 'adamw_torch' }), null, 'torch order of operations: CPU only');
  assert.equal(cudaOptimizerBits({ optim: 'paged_adamw_8bit', residentBytes: 1 << 20 }), null, 'a finite host budget spills to disk: CPU AdamW');
});
