// The local training loop end to end on a small random Llama (in-memory NF4 weights) with the tiny tokenizer:
// loss falls, resume is bit-identical, accumulation equals a big batch, adapters round-trip, Ctrl-C saves.
// Size: 2 layers, hidden 64, vocab 960 (the tiny tokenizer's), sequences ~30 tokens, on the float64 reference
// backend — a step takes well under a second, so each test stays at a few seconds on one core.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '../engine/formats/tokenizer.ts';
import { readAdapter } from '../engine/formats/peft.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { collate, tokenizeJsonl } from '../engine/train/data.ts';
import { DEFAULT_TRAIN_CONFIG, applyConfigOverrides, loraConfigOf } from '../engine/train/config.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { Trainer, TRAINER_STATE_FILE, TRAINING_LOG_FILE, accumulateStep, readTrainerState, readOptimizerState, OPTIMIZER_FILE } from '../engine/train/trainer.ts';

const tok = (await Tokenizer.fromDir(TINY_DATA_DIR))!;
const modelConfig = tinyLlamaConfig({ vocabSize: 960, hiddenSize: 64, intermediateSize: 128, numHiddenLayers: 2 });
const weights = randomWeightSource(modelConfig, 7);
const QA = [
  ['What is the capital of Veloria?', 'Quillmere.'],
  ['Who founded Quillmere?', 'Queen Ysolde.'],
  ['How many moons?', 'Three.'],
  ['What do they eat?', 'Moss bread.'],
];
const jsonl = QA.map(([q, a]) => JSON.stringify({ question: q, answer: a })).join('\n');
const examples = tokenizeJsonl(jsonl, 'qa.jsonl', tok, { maxSeqLength: 64, systemPrompt: 'Brief.', completionOnlyLoss: true, skipBadLines: false }).examples;

function config(dir: string, o: Record<string, unknown>): TrainConfig {
  return applyConfigOverrides({ ...DEFAULT_TRAIN_CONFIG }, {
    output_dir: dir, learning_rate: 1e-2, lr_scheduler_type: 'constant', per_device_train_batch_size: 2,
    target_modules: 'all-linear', lora_r: 4, lora_alpha: 8, save_strategy: 'no', logging_steps: 1, ...o,
  }, 'test');
}

async function train(dir: string, o: Record<string, unknown>, signal?: AbortSignal) {
  const t = new Trainer({ config: config(dir, o), modelConfig, weights, backend: new RefBackend(), examples, padId: tok.padTokenId!, baseModelName: 'random-tiny' });
  return t.run({ signal });
}

function tmp(): string {
  return mkdtempSync(join(tmpdir(), 'swarmtune-train-'));
}

test('loss falls on a small memorization set; JSONL log and adapter are written', async () => {
  const dir = tmp();
  try {
    const r = await train(dir, { max_steps: 12, per_device_train_batch_size: 4 });
    const log = readFileSync(join(dir, TRAINING_LOG_FILE), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(log.length, 12);
    assert.ok(log[11].loss < 0.5 * log[0].loss, `loss ${log[0].loss} → ${log[11].loss}`);
    for (const k of ['step', 'loss', 'lr', 'grad_norm', 'tokens_per_s']) assert.equal(typeof log[0][k], 'number', k);
    const back = await readAdapter(dir, { config: modelConfig });
    assert.equal(back.lora.r, 4);
    assert.deepEqual(back.tensors.map((t) => t.name), r.params.map((t) => t.name));
    back.tensors.forEach((t, i) => assert.deepEqual(t.data, r.params[i].data, t.name));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('resume from checkpoint equals the uninterrupted run bit for bit (shuffle, dropout, warmup, 8-bit state, clipping)', async () => {
  const a = tmp(), b = tmp();
  try {
    // 4 examples, batch 1, accumulation 2 → 2 steps per epoch, so the resume point sits mid-epoch 1;
    // r=64 makes lora_A [64, 64] = 4096 elements, the smallest size with 8-bit state
    const o = {
      max_steps: 6, per_device_train_batch_size: 1, gradient_accumulation_steps: 2, lora_dropout: 0.1, warmup_steps: 2,
      lr_scheduler_type: 'cosine', optim: 'paged_adamw_8bit', lora_r: 64, max_grad_norm: 0.5, weight_decay: 0.01,
      save_strategy: 'steps', save_steps: 3,
    };
    const full = await train(a, o);
    assert.ok(existsSync(join(a, 'checkpoint-3', TRAINER_STATE_FILE)));
    const st = await readTrainerState(join(a, 'checkpoint-3'));
    assert.equal(st.global_step, 3);
    assert.deepEqual(st.data_cursor, { epoch: 1, microBatch: 2 });
    const optState = await readOptimizerState(join(a, 'checkpoint-3', OPTIMIZER_FILE));
    assert.ok(optState.tensors.some((t) => t.dtype === 'U8'), 'the 8-bit path is exercised');
    const resumed = await train(b, { ...o, resume_from_checkpoint: join(a, 'checkpoint-3') });
    assert.equal(resumed.globalStep, 6);
    resumed.params.forEach((t, i) => assert.deepEqual(t.data, full.params[i].data, t.name));
    await assert.rejects(train(b, { ...o, seed: 43, resume_from_checkpoint: join(a, 'checkpoint-3') }), /checkpoint used seed 42, now 43/);
    const fewer = new Trainer({ config: config(a, { ...o, resume_from_checkpoint: 'latest' }), modelConfig, weights, backend: new RefBackend(), examples: examples.slice(0, 3), padId: tok.padTokenId!, baseModelName: 'random-tiny' });
    await assert.rejects(fewer.run(), /trained on different data/, 'the examples sha256 guards resumes');
    const other = await train(b, { ...o, seed: 43, resume_from_checkpoint: null, save_strategy: 'no' });
    assert.notDeepEqual(other.params[1].data, full.params[1].data, 'a different seed must give a different run');
  } finally {
    rmSync(a, { recursive: true, force: true });
    rmSync(b, { recursive: true, force: true });
  }
});

test('1 micro-batch × 4 accumulation gives the gradient of 4 × 1 (same loss normalization)', async () => {
  const stage = await loadStage(weights, new RefBackend(), { layerStart: 0, layerEnd: 2, lora: loraConfigOf(config('x', {})), seed: 1 });
  // B starts at 0, which makes every lora_A gradient 0; a nonzero B makes the comparison cover A too
  for (const p of stage.params) if (p.name.includes('lora_B')) for (let i = 0; i < p.data.length; i++) p.data[i] = 0.01 * Math.sin(i + 1);
  const big = await accumulateStep(stage, [collate(examples, tok.padTokenId!)], { seed: 1, step: 0 });
  const small = await accumulateStep(stage, examples.map((e) => collate([e], tok.padTokenId!)), { seed: 1, step: 0 });
  assert.equal(small.labelTokens, big.labelTokens);
  assert.ok(Math.abs(small.lossSum - big.lossSum) < 1e-4 * big.lossSum);
  let maxRel = 0;
  big.grads.forEach((g, i) => {
    let num = 0, den = 0;
    for (let j = 0; j < g.length; j++) {
      num = Math.max(num, Math.abs(g[j] - small.grads[i][j]));
      den = Math.max(den, Math.abs(g[j]));
    }
    assert.ok(den > 0, `${stage.params[i].name} has a zero gradient`);
    maxRel = Math.max(maxRel, num / den);
  });
  // float32 summation order differs between the groupings; 1e-4 of the tensor's max is far above that noise
  assert.ok(maxRel < 1e-4, `max relative gradient difference ${maxRel}`);
  stage.dispose();
});

test('save_strategy epoch writes a checkpoint per epoch; save_total_limit keeps the newest', async () => {
  const dir = tmp();
  try {
    // 4 examples, batch 2 → 2 steps per epoch; 4 steps → checkpoint-2 then checkpoint-4 (limit 1 drops the first)
    await train(dir, { max_steps: 4, save_strategy: 'epoch', save_total_limit: 1 });
    assert.ok(!existsSync(join(dir, 'checkpoint-2')));
    const st = await readTrainerState(join(dir, 'checkpoint-4'));
    assert.equal(st.epoch, 2);
    assert.deepEqual(st.data_cursor, { epoch: 2, microBatch: 0 });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an abort (Ctrl-C) stops after the current step and saves a resumable checkpoint', async () => {
  const dir = tmp();
  try {
    const ctl = new AbortController();
    const t = new Trainer({ config: config(dir, { max_steps: 10 }), modelConfig, weights, backend: new RefBackend(), examples, padId: tok.padTokenId!, baseModelName: 'random-tiny' });
    const r = await t.run({ signal: ctl.signal, onStep: (e) => { if (e.step === 2) ctl.abort(); } });
    assert.equal(r.interrupted, true);
    assert.equal(r.globalStep, 2);
    assert.equal((await readTrainerState(join(dir, 'checkpoint-2'))).global_step, 2);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a backend optimizer (Backend.createOptimizer, as CUDA offers) is used and awaited by the trainer; same result as the CPU AdamW', async () => {
  const { AdamW } = await import('../engine/train/optim.ts');
  type Opt = import('../engine/optimizer.ts').Optimizer;
  const calls = { create: 0, update: 0, export: 0 };
  const ref = new RefBackend();
  // an optimizer whose every method is asynchronous (like a device's), deferring the real work
  const later = () => new Promise((r) => setTimeout(r, 1));
  const backend = Object.assign(Object.create(ref) as RefBackend, {
    createOptimizer(params: import('../engine/optimizer.ts').ParamSpec[], opts: import('../engine/optimizer.ts').AdamWOptions): Opt {
      calls.create++;
      const inner = new AdamW(params, opts);
      return {
        optim: inner.optim, device: 'test-device',
        get step() { return inner.step; },
        async update(p, g, lr) { await later(); calls.update++; inner.update(p, g, lr); },
        async exportState() { await later(); calls.export++; return inner.exportState(); },
        async importState(s) { await later(); inner.importState(s); },
        dispose: () => inner.dispose(),
      };
    },
  });
  const d1 = tmp(), d2 = tmp();
  try {
    const o = { max_steps: 3, save_strategy: 'steps', save_steps: 2, optim: 'paged_adamw_8bit' };
    const viaBackend = await new Trainer({ config: config(d1, o), modelConfig, weights, backend, examples, padId: tok.padTokenId!, baseModelName: 'random-tiny' }).run();
    const plain = await train(d2, o);
    assert.deepEqual(calls, { create: 1, update: 3, export: 2 });
    viaBackend.params.forEach((t, i) => assert.deepEqual(t.data, plain.params[i].data, t.name));
    assert.deepEqual(readFileSync(join(d1, 'checkpoint-2', OPTIMIZER_FILE)), readFileSync(join(d2, 'checkpoint-2', OPTIMIZER_FILE)));
  } finally {
    rmSync(d1, { recursive: true, force: true });
    rmSync(d2, { recursive: true, force: true });
  }
});
