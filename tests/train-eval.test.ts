// Evaluation during `swarmtune train` (eval_strategy, eval_steps, per_device_eval_batch_size, eval_data) and
// load_best_model_at_end: the keys and HF's constraints, the eval schedule, eval_loss as Trainer.evaluate
// computes it (checked against the eval task on the saved checkpoint and against a float64 reference), and
// best-model selection on a run whose best evaluation is a middle step.
//
// Size: the embedded tiny model (4 layers, hidden 128) on the native CPU backend, 8 steps of 4 sequences
// and 7 eval examples in batches of 3 (3 + 3 + 1: the partial batch is where HF's per-sample weighting
// differs from a token mean); the float64 reference runs 7 short sequences once. A few seconds.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { createBackend } from '../engine/backends/registry.ts';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import type { ModelDir } from '../engine/formats/model-dir.ts';
import { readAdapter } from '../engine/formats/peft.ts';
import { evaluate } from '../engine/tasks/eval.ts';
import { referenceLogits, referenceLoss } from '../engine/model/reference.ts';
import { loraScaling } from '../engine/model/lora.ts';
import { DEFAULT_TRAIN_CONFIG, applyConfigOverrides, resolveTrainConfig, validateTrainConfig, ConfigError } from '../engine/train/config.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { dataOptionsOf, loadDataset } from '../engine/train/data.ts';
import type { TokenizedExample } from '../engine/train/data.ts';
import { Trainer, TRAINING_LOG_FILE, readTrainerState } from '../engine/train/trainer.ts';
import { BestModelTracker, checkpointsToDelete, evalInterval, evaluateLoss, shouldEvaluate } from '../engine/train/evaluation.ts';
import type { EvalMetrics } from '../engine/train/evaluation.ts';

registerBuiltinBackends();
const root = mkdtempSync(join(tmpdir(), 'swarmtune-train-eval-'));
const evalFile = join(root, 'eval.jsonl');
let modelDir = '';
let md: ModelDir;
let trainExamples: TokenizedExample[] = [];
let evalExamples: TokenizedExample[] = [];

before(async () => {
  modelDir = await ensureTinyModel(join(root, 'tiny'));
  md = await openModelDir(modelDir);
  writeFileSync(evalFile, readFileSync(TINY_DATASET_PATH, 'utf8').trim().split('\n').slice(0, 7).join('\n') + '\n');
  const opts = dataOptionsOf({ ...DEFAULT_TRAIN_CONFIG, max_seq_length: 64 });
  trainExamples = loadDataset(TINY_DATASET_PATH, md.tokenizer!, opts).examples;
  evalExamples = loadDataset(evalFile, md.tokenizer!, opts).examples;
});
after(async () => {
  await md?.close();
  rmSync(root, { recursive: true, force: true });
});

function cfgOf(o: Record<string, unknown>): TrainConfig {
  return validateTrainConfig(applyConfigOverrides({ ...DEFAULT_TRAIN_CONFIG }, {
    max_seq_length: 64, per_device_train_batch_size: 4, lora_r: 4, target_modules: 'all-linear', seed: 7,
    lr_scheduler_type: 'constant', eval_data: evalFile, eval_strategy: 'steps', eval_steps: 1,
    per_device_eval_batch_size: 3, save_strategy: 'steps', save_steps: 1, ...o,
  }, 'test'));
}

async function train(cfg: TrainConfig) {
  const backend = await createBackend('cpu');
  try {
    const t = new Trainer({ config: cfg, modelConfig: md.config, weights: md.weights, backend, examples: trainExamples, evalExamples, padId: md.tokenizer!.padTokenId ?? md.tokenizer!.eosTokenId!, baseModelName: modelDir });
    return await t.run();
  } finally {
    backend.dispose();
  }
}

test('eval keys: HF names and defaults, eval_steps as steps or a fraction, HF constraints refused in one line', () => {
  const d = resolveTrainConfig({});
  assert.equal(d.eval_strategy, 'no');
  assert.equal(d.eval_steps, null);
  assert.equal(d.per_device_eval_batch_size, 8);
  assert.equal(d.load_best_model_at_end, false);
  assert.deepEqual(d.report_to, []);
  const ok = resolveTrainConfig({ flags: { eval_data: 'e.jsonl', eval_strategy: 'steps', eval_steps: '0.25', report_to: 'all' } });
  assert.equal(ok.eval_steps, 0.25);
  assert.deepEqual(ok.report_to, ['tensorboard']);
  assert.deepEqual(resolveTrainConfig({ flags: { report_to: 'none' } }).report_to, []);
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ eval_steps: '1.5' }, /--eval-steps: a value >= 1 is a number of steps and must be an integer, got 1.5/],
    [{ eval_steps: '0' }, /--eval-steps: expected a positive number/],
    [{ eval_strategy: 'always' }, /--eval-strategy: expected one of no, steps, epoch/],
    [{ report_to: 'wandb' }, /--report-to: "wandb" is not supported; swarmtune writes tensorboard/],
    [{ report_to: 'none,tensorboard' }, /"none" cannot be combined/],
    [{ eval_strategy: 'steps' }, /eval_strategy steps needs eval_data/],
    [{ load_best_model_at_end: true }, /load_best_model_at_end needs an eval_strategy/],
    [{ eval_data: 'e', eval_strategy: 'epoch', load_best_model_at_end: true }, /requires the save and eval strategy to match, but found eval_strategy epoch and save_strategy steps/],
    [{ eval_data: 'e', eval_strategy: 'steps', eval_steps: 3, save_steps: 10, load_best_model_at_end: true }, /save_steps 10, which is not a round multiple of eval_steps 3/],
    [{ metric_for_best_model: 'accuracy' }, /--metric-for-best-model: expected one of loss, eval_loss/],
  ];
  for (const [flags, re] of bad) assert.throws(() => resolveTrainConfig({ flags }), (e: Error) => e instanceof ConfigError && re.test(e.message), JSON.stringify(flags));
});

test('eval schedule: steps every eval_steps (default logging_steps, a fraction of the total rounded up), epoch at each epoch end and the last step', () => {
  const at = (o: Partial<TrainConfig>, total: number, perEpoch: number) => {
    const c = { ...DEFAULT_TRAIN_CONFIG, ...o };
    return Array.from({ length: total }, (_, i) => i + 1).filter((s) => shouldEvaluate(c, s, total, perEpoch));
  };
  assert.deepEqual(at({ eval_strategy: 'steps', eval_steps: 3 }, 10, 4), [3, 6, 9]);
  assert.deepEqual(at({ eval_strategy: 'steps', eval_steps: null, logging_steps: 4 }, 10, 4), [4, 8]);
  // ceil(10 × 0.25) = 3, as HF's math.ceil(max_steps * eval_steps)
  assert.equal(evalInterval({ eval_steps: 0.25, logging_steps: 10 }, 10), 3);
  assert.deepEqual(at({ eval_strategy: 'steps', eval_steps: 0.25 }, 10, 4), [3, 6, 9]);
  assert.deepEqual(at({ eval_strategy: 'epoch' }, 10, 4), [4, 8, 10]);
  assert.deepEqual(at({ eval_strategy: 'no', eval_steps: 1 }, 10, 4), []);
});

test('eval_loss is Trainer.evaluate\'s: the per-sample mean of batch token means (partial last batch weighted by its size)', async () => {
  // three batches of 3, 3, 1 samples with hand-picked sums: (3·(6/2) + 3·(10/4) + 1·(1/1)) / 7 = 17.5 / 7 = 2.5
  const sums = [[6, 2], [10, 4], [1, 1]];
  const ex = (n: number): TokenizedExample => ({ ids: Int32Array.of(1, 2), labels: Int32Array.of(2, -100), labelTokens: 1, line: n });
  let k = 0;
  const m = await evaluateLoss(async () => { const [lossSum, tokens] = sums[k++]!; return { lossSum, tokens }; },
    Array.from({ length: 7 }, (_, i) => ex(i + 1)), { batchSize: 3, padId: 0 });
  assert.equal(k, 3);
  assert.equal(m.eval_loss, 2.5);
  assert.equal(m.eval_tokens, 7);
  assert.equal(m.eval_samples, 7);
  // a token mean would be 17/7: the two must differ for this check to mean anything
  assert.notEqual(m.eval_loss, 17 / 7);
});

test('train with eval: eval events equal the eval task on each checkpoint and a float64 reference; load_best_model_at_end picks the middle best step', async () => {
  const out = join(root, 'run');
  // lr 2e-2 constant overshoots: the eval loss falls for 3 steps (6.15, 5.75, 5.55), jumps to 7.9 and
  // stays above 6 to step 8, so the best evaluation is a middle step by a wide margin
  const cfg = cfgOf({ output_dir: out, max_steps: 8, learning_rate: 2e-2, load_best_model_at_end: true, save_total_limit: 2 });
  const r = await train(cfg);
  assert.deepEqual(r.evals.map((e) => e.step), [1, 2, 3, 4, 5, 6, 7, 8]);
  const series = r.evals.map((e) => e.eval_loss);
  const argmin = series.indexOf(Math.min(...series)) + 1;
  assert.ok(argmin < 8, `the case needs a best step before the last: eval losses ${series.join(', ')}`);
  assert.equal(r.best.best_global_step, argmin);
  assert.equal(r.best.best_metric, series[argmin - 1]);
  assert.equal(r.best.best_model_checkpoint, join(out, `checkpoint-${argmin}`));

  // the log holds the eval events; the last checkpoint's trainer_state holds HF's best_* fields
  const log = readFileSync(join(out, TRAINING_LOG_FILE), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, number | string>);
  assert.deepEqual(log.filter((l) => l.event === 'eval').map((l) => l.eval_loss), series);
  const st = await readTrainerState(join(out, 'checkpoint-8'));
  assert.equal(st.best_model_checkpoint, r.best.best_model_checkpoint);
  assert.equal(st.best_metric, r.best.best_metric);
  assert.equal(st.log_history.filter((h) => h.event === 'eval').length, 8);

  // save_total_limit 2 keeps the best checkpoint beside the newest, as HF's rotation does
  assert.ok(existsSync(join(out, `checkpoint-${argmin}`)), 'the best checkpoint survives save_total_limit');
  assert.ok(existsSync(join(out, 'checkpoint-8')));
  for (let s = 1; s < 8; s++) if (s !== argmin) assert.ok(!existsSync(join(out, `checkpoint-${s}`)), `checkpoint-${s} pruned`);

  // the adapter written at the end is the best checkpoint's, not the last step's
  const final = await readAdapter(out, { config: md.config });
  const bestAd = await readAdapter(join(out, `checkpoint-${argmin}`), { config: md.config });
  const lastAd = await readAdapter(join(out, 'checkpoint-8'), { config: md.config });
  final.tensors.forEach((t, i) => assert.deepEqual(t.data, bestAd.tensors[i]!.data, t.name));
  assert.ok(final.tensors.some((t, i) => t.data.some((v, j) => v !== lastAd.tensors[i]!.data[j])), 'best and last adapters differ');

  // independent of the trainer's loop: the eval task reloads the checkpoint from disk; HF's formula over its batches
  for (const s of [argmin, 8]) {
    const backend = await createBackend('cpu');
    try {
      const e = await evaluate({ model: modelDir, data: evalFile, adapter: join(out, `checkpoint-${s}`), maxSeqLength: 64, batchSize: 3, fileOrder: true, backend });
      assert.deepEqual(e.batches.map((b) => b.examples), [3, 3, 1]);
      const hf = e.batches.reduce((a, b) => a + b.examples * b.lossSum / b.tokens, 0) / e.examples;
      const got = r.evals[s - 1]!.eval_loss;
      // same backend, batches, NF4 weights and adapter values (measured: identical); 1e-9 only spares a
      // reordered float64 sum
      assert.ok(Math.abs(got - hf) <= 1e-9 * hf, `step ${s}: eval_loss ${got} vs eval task ${hf}`);
      assert.equal(r.evals[s - 1]!.eval_tokens, e.tokens);
    } finally {
      backend.dispose();
    }
  }

  // one value by hand in float64: each eval example alone (no padding) through the float64 reference model
  // with the best checkpoint's adapter, grouped 3 + 3 + 1 and averaged per sample
  const scaling = loraScaling(bestAd.lora);
  const perExample: Array<{ lossSum: number; tokens: number }> = [];
  for (const ex of evalExamples) {
    const logits = await referenceLogits(md.weights, ex.ids, 1, ex.ids.length, { params: bestAd.tensors, scaling });
    perExample.push(referenceLoss(logits, ex.labels, md.config.vocabSize));
  }
  let weighted = 0;
  for (let i = 0; i < perExample.length; i += 3) {
    const g = perExample.slice(i, i + 3);
    weighted += g.length * g.reduce((a, b) => a + b.lossSum, 0) / g.reduce((a, b) => a + b.tokens, 0);
  }
  const ref64 = weighted / perExample.length;
  // float32 kernels against float64 math over 4 layers and a 960-way softmax (measured 1.9e-8 relative)
  assert.ok(Math.abs(r.best.best_metric! - ref64) <= 1e-6 * ref64, `best eval_loss ${r.best.best_metric} vs float64 ${ref64}`);
});

test('best-model tracking is HF\'s: strict improvement, greater_is_better, a resumed state; rotation keeps the best', () => {
  const m = (v: number): EvalMetrics => ({ eval_loss: v, eval_runtime: 0, eval_samples_per_second: 0, eval_steps_per_second: 0, eval_tokens: 1, eval_samples: 1 });
  const off = new BestModelTracker({ metric_for_best_model: null, greater_is_better: null, load_best_model_at_end: false });
  assert.equal(off.offer(1, m(3), 'c1'), false);
  assert.equal(off.state.best_metric, null);
  const t = new BestModelTracker({ metric_for_best_model: null, greater_is_better: null, load_best_model_at_end: true });
  assert.equal(t.metric, 'eval_loss');
  assert.equal(t.offer(1, m(3), 'c1'), true);
  assert.equal(t.offer(2, m(2), 'c2'), true);
  assert.equal(t.offer(3, m(2), 'c3'), false); // a tie is not better
  assert.equal(t.offer(4, m(2.5), 'c4'), false);
  assert.deepEqual(t.state, { best_metric: 2, best_global_step: 2, best_model_checkpoint: 'c2' });
  const g = new BestModelTracker({ metric_for_best_model: 'eval_loss', greater_is_better: true, load_best_model_at_end: false }, { best_metric: 2, best_global_step: 2, best_model_checkpoint: 'c2' });
  assert.equal(g.offer(3, m(1), 'c3'), false);
  assert.equal(g.offer(4, m(5), 'c4'), true);
  const all = ['c1', 'c2', 'c3', 'c4', 'c5'];
  assert.deepEqual(checkpointsToDelete(all, 2, null), ['c1', 'c2', 'c3']);
  // HF moves the best to second-newest before deleting the oldest: [c1, c3, c4, c2, c5]
  assert.deepEqual(checkpointsToDelete(all, 2, 'c2'), ['c1', 'c3', 'c4']);
  assert.deepEqual(checkpointsToDelete(all, 3, 'c2'), ['c1', 'c3']);
  assert.deepEqual(checkpointsToDelete(all, 1, 'c2'), ['c1', 'c3', 'c4']); // HF keeps two when the best is not the newest
  assert.deepEqual(checkpointsToDelete(all, 1, 'c5'), ['c1', 'c2', 'c3', 'c4']);
});

test('a resumed run keeps its best: best_* come back from trainer_state.json and the final adapter is read from the best checkpoint dir', async () => {
  const out = join(root, 'resumed');
  const o = { output_dir: out, learning_rate: 2e-2, load_best_model_at_end: true, save_total_limit: 2 };
  const first = await train(cfgOf({ ...o, max_steps: 4 }));
  assert.equal(first.best.best_global_step, 3, `eval losses ${first.evals.map((e) => e.eval_loss).join(', ')}`);
  const second = await train(cfgOf({ ...o, max_steps: 8, resume_from_checkpoint: 'latest' }));
  assert.deepEqual(second.evals.map((e) => e.step), [5, 6, 7, 8]);
  // steps 5-8 do not beat step 3 (the same trajectory as the 8-step run above: resume is bit-identical)
  assert.equal(second.best.best_global_step, 3);
  assert.equal(second.best.best_model_checkpoint, join(out, 'checkpoint-3'));
  assert.ok(existsSync(join(out, 'checkpoint-3')), 'kept under save_total_limit across the resume');
  const final = await readAdapter(out, { config: md.config });
  const best = await readAdapter(join(out, 'checkpoint-3'), { config: md.config });
  final.tensors.forEach((t, i) => assert.deepEqual(t.data, best.tensors[i]!.data, t.name));
});
