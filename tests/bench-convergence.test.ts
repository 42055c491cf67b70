// The convergence bench's pipeline simulation is the real thing: with the f32 wire its 2-stage split
// trains exactly what the one-machine trainer's step (accumulateStep over the whole model) trains, and a
// lossy codec changes the result and its bytes by exactly the codec's layout.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NativeBackend } from '../engine/backends/native.ts';
import type { Backend } from '../engine/backend.ts';
import { loadStage } from '../engine/model/load.ts';
import { loraConfigOf } from '../engine/train/config.ts';
import { DataLoader, collate } from '../engine/train/data.ts';
import { clipGradNorm } from '../engine/train/clip.ts';
import { createOptimizer } from '../engine/train/optim.ts';
import { learningRateAt, warmupStepsFor } from '../engine/train/schedule.ts';
import { accumulateStep } from '../engine/train/trainer.ts';
import { markovTask, runCodec } from '../bench/convergence.ts';

test('convergence bench: the f32 pipeline split equals the one-stage trainer; int4 costs its layout in bytes', async () => {
  const backend = new NativeBackend({ threads: 1 });
  try {
    const steps = 4;
    const task = markovTask(steps, { vocab: 64, seqLen: 16, trainSeqs: 32, heldOutSeqs: 8 });
    const f32 = await runCodec(task, 'f32', backend);
    const int4 = await runCodec(task, 'int4', backend);
    // the reference: the whole model as one stage, the trainer's own step function
    const { cfg } = task;
    const stage = await loadStage(task.weights, backend, { layerStart: 0, layerEnd: task.llama.numHiddenLayers, lora: loraConfigOf(cfg), gradientCheckpointing: true, seed: cfg.seed });
    const opt = createOptimizer(backend as Backend, stage.params.map((p) => ({ name: p.name, numel: p.data.length })), { optim: cfg.optim, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon, weightDecay: cfg.weight_decay });
    try {
      const loader = new DataLoader(task.train, { batchSize: cfg.per_device_train_batch_size, accumulation: cfg.gradient_accumulation_steps, seed: cfg.seed, shuffle: cfg.shuffle, padId: task.padId });
      const warmup = warmupStepsFor(steps, cfg.warmup_steps, cfg.warmup_ratio);
      for (let step = 0; step < steps; step++) {
        const { grads } = await accumulateStep(stage, loader.stepMicroBatches(step), { seed: cfg.seed, step });
        clipGradNorm(grads, cfg.max_grad_norm);
        await opt.update(stage.params.map((p) => p.data), grads, learningRateAt(cfg.learning_rate, cfg.lr_scheduler_type, step, warmup, steps));
      }
      const mb = collate(task.heldOut, task.padId);
      const r = await stage.forward({ key: 'e', batch: mb.batch, seqLen: mb.seqLen, ids: mb.ids, labels: mb.labels }, { train: false });
      const ref = r.lossSum! / r.tokens!;
      // float tolerance: the split sums the same products in the same order per stage; only the
      // clip's norm over two gradient lists instead of one may round differently
      assert.ok(Math.abs(f32.eval_loss - ref) <= 1e-4 * ref, `pipeline f32 eval ${f32.eval_loss} vs one-stage trainer ${ref}`);
    } finally {
      opt.dispose();
      stage.dispose();
    }
    const C = task.llama.hiddenSize;
    assert.equal(f32.bytes_per_token_forward, 4 * C);
    assert.equal(f32.bytes_per_token_backward, 4 * C);
    // [B*S, C] with B*S*C a multiple of 64: absmax per 64 elements + half a byte per element
    assert.equal(int4.bytes_per_token_forward, C / 2 + 4 * C / 64);
    assert.notEqual(int4.eval_loss, f32.eval_loss, 'a 4-bit boundary must change training at all');
    assert.ok(Number.isFinite(int4.eval_loss));
  } finally {
    backend.dispose();
  }
});
