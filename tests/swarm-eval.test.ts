// Evaluation during a swarm run: `launch` with eval_strategy, load_best_model_at_end and report_to
// tensorboard over 2 volunteers (2 stages, f32 wire) gives the eval events `swarmtune train` gives on the
// same data and flags, writes the best checkpoint's adapter at the end, records HF's best_* fields in
// trainer_state.json, and writes a TensorBoard event file with train/* and eval/* scalars.
//
// Size: the tiny model, 3 steps of 4 micro-batches of 2, eval every step on 5 examples (batches 3 + 2);
// 3 processes (coordinator, 2 volunteers) plus one local train: well under a minute on 2 cores.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { FLAGS, adapterMap, join, launch, modelDir, run, tmp, useCluster, waitEvent } from './swarm-cluster.ts';

useCluster('swarm-eval');

test('launch with eval_strategy: eval events equal `swarmtune train`\'s, the best checkpoint\'s adapter is written, TensorBoard events are written', async () => {
  const evalFile = path.join(tmp, 'eval.jsonl');
  writeFileSync(evalFile, readFileSync(TINY_DATASET_PATH, 'utf8').trim().split('\n').slice(10, 15).join('\n') + '\n');
  // lr 1e-1 constant overshoots at step 3 (eval loss 5.70, 5.41, 7.76 in `train`): the best is step 2, a middle step
  const EVAL = ['--eval-data', evalFile, '--eval-strategy', 'steps', '--eval-steps', '1', '--per-device-eval-batch-size', '3',
    '--save-steps', '1', '--load-best-model-at-end', '--report-to', 'tensorboard', '--learning-rate', '1e-1', '--lr-scheduler-type', 'constant'];

  const localDir = path.join(tmp, 'local');
  const local = run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', '3', ...EVAL, '--output-dir', localDir, '--device', 'cpu', '--json']);
  const coord = launch('swarm', 3, 2, EVAL);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  const vols = [join(addr, 'v0'), join(addr, 'v1')];
  await waitEvent(coord, (e) => e.event === 'finished', 'finished', 180_000);
  assert.deepEqual(await Promise.all(vols.map((v) => v.exit)), [0, 0]);
  const l = await local;
  assert.equal(l.code, 0, l.stderr);

  const swarmEvals = coord.events.filter((e) => e.event === 'eval');
  const localEvals = l.stdout.split('\n').filter((x) => x.startsWith('{')).map((x) => JSON.parse(x) as Record<string, unknown>).filter((e) => e.event === 'eval');
  assert.deepEqual(swarmEvals.map((e) => e.step), [1, 2, 3]);
  assert.deepEqual(localEvals.map((e) => e.step), [1, 2, 3]);
  for (const [i, s] of swarmEvals.entries()) {
    const a = Number(s.eval_loss), b = Number(localEvals[i]!.eval_loss);
    console.log(`# step ${s.step}: swarm eval_loss ${a}, train ${b}, relative difference ${(Math.abs(a - b) / b).toExponential(2)}`);
    // the swarm's adapter equals train's to ~1e-6 relative in its update (tests/swarm-e2e); the eval loss follows
    assert.ok(Math.abs(a - b) <= 1e-5 * b, `step ${s.step}: swarm eval_loss ${a} vs train ${b}`);
    for (const k of ['eval_tokens', 'eval_samples', 'epoch']) assert.equal(s[k], localEvals[i]![k], k);
  }

  // the best step's checkpoint is the adapter written at the end, and trainer_state.json says which it is
  const swarmDir = path.join(tmp, 'swarm');
  const st = JSON.parse(readFileSync(path.join(swarmDir, 'trainer_state.json'), 'utf8')) as Record<string, unknown>;
  const series = swarmEvals.map((e) => Number(e.eval_loss));
  const bestStep = series.indexOf(Math.min(...series)) + 1;
  assert.ok(bestStep < 3, `the case needs a best step before the last: ${series.join(', ')}`);
  assert.equal(st.best_global_step, bestStep);
  assert.equal(st.best_model_checkpoint, path.join(swarmDir, `checkpoint-${bestStep}`));
  assert.equal(st.best_metric, series[bestStep - 1]);
  const final = await adapterMap(swarmDir), best = await adapterMap(path.join(swarmDir, `checkpoint-${bestStep}`));
  const last = await adapterMap(path.join(swarmDir, 'checkpoint-3'));
  for (const [name, t] of final) assert.deepEqual(t, best.get(name), name);
  assert.ok([...final].some(([name, t]) => t.some((v, j) => v !== last.get(name)![j])), 'the final adapter is not the last step\'s');
  const localState = JSON.parse(readFileSync(path.join(localDir, 'checkpoint-3', 'trainer_state.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(localState.best_global_step, bestStep, 'train picks the same best step');

  // TensorBoard: one event file under <output_dir>/runs/<date>_<host>/ holding the eval and train tags
  const runs = path.join(swarmDir, 'runs');
  const [sub] = readdirSync(runs);
  const [file] = readdirSync(path.join(runs, sub!));
  assert.match(file!, /^events\.out\.tfevents\./);
  const bytes = readFileSync(path.join(runs, sub!, file!));
  assert.ok(statSync(path.join(runs, sub!, file!)).size > 100);
  for (const tag of ['train/loss', 'train/learning_rate', 'train/grad_norm', 'eval/loss']) assert.ok(bytes.includes(Buffer.from(tag)), tag);
});
