// The coordinator's evaluator (coordinator/eval.ts) across a coordinator restart: the evaluations and the
// best step come back from <output_dir>/trainer_state.json (only those at or before the resumed step), and
// with load_best_model_at_end the adapter written at the end is read from the best checkpoint dir.
// No model is loaded: nothing here evaluates. Milliseconds.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RunEvaluator } from '../coordinator/eval.ts';
import { writeAdapter } from '../engine/formats/peft.ts';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';
import { DEFAULT_TRAIN_CONFIG, applyConfigOverrides } from '../engine/train/config.ts';
import type { LoraConfig, NamedTensor, WeightSource } from '../engine/types.ts';

const root = mkdtempSync(join(tmpdir(), 'swarmtune-coord-eval-'));
after(() => rmSync(root, { recursive: true, force: true }));

test('restore after a restart and load the best adapter from its checkpoint dir', async () => {
  const llama = tinyLlamaConfig({ vocabSize: 64, hiddenSize: 32, intermediateSize: 64, numHiddenLayers: 1 });
  const lora: LoraConfig = { r: 2, loraAlpha: 4, loraDropout: 0, targetModules: ['q_proj'], useRslora: false, initLoraWeights: true };
  const t = (name: string, shape: number[], v: number): NamedTensor => ({ name, shape, data: new Float32Array(shape[0]! * shape[1]!).fill(v) });
  const tensors = (v: number) => [
    t('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', [2, 32], v),
    t('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', [32, 2], -v),
  ];
  await writeAdapter(join(root, 'checkpoint-2'), { lora, baseModel: 'm', tensors: tensors(0.5) });
  const ev = (step: number, loss: number) => ({ event: 'eval', step, epoch: step / 4, eval_loss: loss, eval_runtime: 0, eval_samples_per_second: 0, eval_steps_per_second: 0, eval_tokens: 3, eval_samples: 1 });
  // a state written at step 4 whose best is step 2; the restart resumes at step 3 (step 4 was not committed)
  writeFileSync(join(root, 'trainer_state.json'), JSON.stringify({ global_step: 4, best_metric: 1.5, best_global_step: 2, best_model_checkpoint: join(root, 'checkpoint-2'), log_history: [ev(2, 1.5), ev(4, 1.2)] }));
  const train = applyConfigOverrides({ ...DEFAULT_TRAIN_CONFIG }, { eval_data: 'e', eval_strategy: 'steps', eval_steps: 2, save_steps: 2, load_best_model_at_end: true }, 'test');
  const logs: string[] = [];
  const e = new RunEvaluator({
    train, llama, weights: {} as WeightSource, lora, examples: [{ ids: Int32Array.of(1, 2), labels: Int32Array.of(2, -100), labelTokens: 1, line: 1 }], padId: 0,
    totalSteps: 8, stepsPerEpoch: 4, outputDir: root, adapter: () => tensors(9), tensorboard: null, emit: () => {}, log: (m) => logs.push(m),
  });
  await e.restore(3);
  assert.deepEqual(e.evals.map((x) => x.step), [2]);
  assert.deepEqual(e.best.state, { best_metric: 1.5, best_global_step: 2, best_model_checkpoint: join(root, 'checkpoint-2') });
  const final = await e.finalAdapter(tensors(9));
  assert.deepEqual(final.map((x) => x.name), tensors(9).map((x) => x.name));
  final.forEach((x, i) => assert.deepEqual(x.data, tensors(0.5)[i]!.data));
  assert.ok(logs.some((l) => l.includes(`loading best model from ${join(root, 'checkpoint-2')} (score: 1.5)`)));
  // steps that are not evaluated do nothing (and need no model)
  await e.afterCommit(3);
  assert.equal(e.evals.length, 1);
  e.close();
});
