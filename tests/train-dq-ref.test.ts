// `swarmtune train` on a full-precision model dir against an independent float64 QLoRA reference, with and
// without bitsandbytes double quantization (bnb_4bit_use_double_quant): the adapter update after 3 optimizer steps
// must match the reference quantized the same way, and must NOT match the reference quantized the other way (so
// the comparison can tell the two apart).
//
// The reference shares no quantization or compute code with the engine: tests/bnb-ref.ts quantizes the checkpoint's
// float32 weights to NF4 (+ double quantization) from bitsandbytes' semantics, engine/model/reference.ts decodes them
// with its own loop and runs the float64 forward and hand-written backward of the whole model, and this file runs
// torch's AdamW and clip_grad_norm_ in float64. Shared with the engine are only the inputs: the tokenized
// micro-batch (engine tokenizer + collate) and the weight file reader.
//
// Model: 2 layers, hidden 128, intermediate 344, GQA 4/2, vocab 960 (the tiny model's tokenizer) — gate/up/down hold
// 688 NF4 blocks = 2 full nested blocks of 256 + a partial one, q/o exactly one, k/v half of one. One micro-batch of
// 4 text records per step, r=4 all-linear from an initial adapter whose B is nonzero (so lora_A has a gradient at
// step 1), adamw_torch with weight decay, clipping at 1.0. About 20-40 s on one core (the float64 reference).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { readAdapter, writeAdapter } from '../engine/formats/peft.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { Tokenizer } from '../engine/formats/tokenizer.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { linearShape } from '../engine/model/lora.ts';
import { referenceLogits, referenceLoss, referenceLossGrads } from '../engine/model/reference.ts';
import { Rng } from '../engine/model/rng.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import { tinyWeights } from '../engine/tiny/index.ts';
import { collate, loadDataset } from '../engine/train/data.ts';
import { DEFAULT_TRAIN_CONFIG } from '../engine/train/config.ts';
import { LORA_TARGETS } from '../engine/types.ts';
import type { LlamaConfig, LoraConfig, NamedTensor, WeightSource } from '../engine/types.ts';
import { bnbQuantizeNF4Ref } from './bnb-ref.ts';

const ROOT = join(import.meta.dirname, '..');
const STEPS = 3;
const LR = 1e-3, WD = 0.01, MAX_GRAD_NORM = 1.0, BETA1 = 0.9, BETA2 = 0.999, EPS = 1e-8;
const LORA: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true };
const SCALING = LORA.loraAlpha / LORA.r;
const TEXTS = [
  'The capital of Veloria is Quillmere, a city of bridges.',
  'Queen Ysolde founded Quillmere three hundred years ago.',
  'Veloria has three moons and long winters.',
  'They eat moss bread and drink pine tea.',
];

const root = mkdtempSync(join(tmpdir(), 'swarmtune-dq-ref-'));
const modelDir = join(root, 'model'), dataFile = join(root, 'data.jsonl'), initDir = join(root, 'init');

/** The tiny model's config and tokenizer with 2 layers, float32 weights from its generator. */
async function writeModel(): Promise<LlamaConfig> {
  const cfgJson = { ...JSON.parse(readFileSync(join(TINY_DATA_DIR, 'config.json'), 'utf8')), num_hidden_layers: 2 };
  const { mkdirSync } = await import('node:fs');
  mkdirSync(modelDir, { recursive: true });
  writeFileSync(join(modelDir, 'config.json'), JSON.stringify(cfgJson));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(TINY_DATA_DIR, f), join(modelDir, f));
  await writeSafetensors(join(modelDir, 'model.safetensors'), tinyWeights(cfgJson), { format: 'pt' });
  return parseLlamaConfig(cfgJson, 'config.json');
}

/** An initial adapter with B ≠ 0 (PEFT init would make every lora_A gradient 0 at the first step). */
function initAdapter(cfg: LlamaConfig): NamedTensor[] {
  const rng = new Rng(5, 77);
  const out: NamedTensor[] = [];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const m of LORA_TARGETS) {
      const [o, i] = linearShape(cfg, m);
      const base = `base_model.model.model.layers.${l}.${['gate_proj', 'up_proj', 'down_proj'].includes(m) ? 'mlp' : 'self_attn'}.${m}`;
      out.push({ name: `${base}.lora_A.weight`, shape: [LORA.r, i], data: rng.fillUniform(new Float32Array(LORA.r * i), -1 / Math.sqrt(i), 1 / Math.sqrt(i)) });
      out.push({ name: `${base}.lora_B.weight`, shape: [o, LORA.r], data: rng.fillNormal(new Float32Array(o * LORA.r), 0, 0.05) });
    }
  }
  return out;
}

/** The reference's weights: the checkpoint's float32 tensors, linears quantized by tests/bnb-ref.ts. */
async function referenceWeights(cfg: LlamaConfig, doubleQuant: boolean): Promise<WeightSource> {
  const f = await SafetensorsFile.open(join(modelDir, 'model.safetensors'));
  const floats = new Map<string, Float32Array>(), nf4 = new Map<string, NF4Weight>();
  try {
    for (const name of f.names()) {
      const data = await f.readFloat32(name);
      const shape = f.info(name).shape;
      if (/_proj\.weight$/.test(name)) nf4.set(name, bnbQuantizeNF4Ref(data, shape[0]!, shape[1]!, { compressStatistics: doubleQuant }));
      else floats.set(name, data);
    }
  } finally {
    await f.close();
  }
  return {
    config: cfg, has: (n) => floats.has(n) || nf4.has(n),
    getFloat: async (n) => floats.get(n) ?? assert.fail(`no float tensor ${n}`),
    getNF4: async (n) => nf4.get(n) ?? assert.fail(`no NF4 tensor ${n}`),
  };
}

/** 3 steps of float64 training: HF loss normalization, torch clip_grad_norm_, torch AdamW (decay first). */
async function referenceTrain(src: WeightSource, init: NamedTensor[], mb: { ids: Int32Array; labels: Int32Array; batch: number; seqLen: number }) {
  const params = init.map((t) => ({ name: t.name, data: Float64Array.from(t.data) }));
  const m = params.map((p) => new Float64Array(p.data.length)), v = params.map((p) => new Float64Array(p.data.length));
  const losses: number[] = [];
  for (let step = 1; step <= STEPS; step++) {
    const r = await referenceLossGrads(src, mb.ids, mb.labels, mb.batch, mb.seqLen, { params, scaling: SCALING });
    losses.push(r.lossSum / r.tokens);
    const g = params.map((p) => Float64Array.from(r.grads.get(p.name)!, (x) => x / r.tokens));
    let sq = 0;
    for (const a of g) for (const x of a) sq += x * x;
    const coef = MAX_GRAD_NORM / (Math.sqrt(sq) + 1e-6);
    if (coef < 1) for (const a of g) for (let i = 0; i < a.length; i++) a[i] *= coef;
    const bc1 = 1 - BETA1 ** step, bc2 = 1 - BETA2 ** step;
    params.forEach((p, k) => {
      for (let i = 0; i < p.data.length; i++) {
        p.data[i] *= 1 - LR * WD;
        m[k]![i] = BETA1 * m[k]![i]! + (1 - BETA1) * g[k]![i]!;
        v[k]![i] = BETA2 * v[k]![i]! + (1 - BETA2) * g[k]![i]! ** 2;
        p.data[i] -= (LR / bc1) * m[k]![i]! / (Math.sqrt(v[k]![i]!) / Math.sqrt(bc2) + EPS);
      }
    });
  }
  return { params, losses };
}

/** `swarmtune train` as a user runs it (a child process), 3 steps; the adapter and the logged losses. */
function engineTrain(doubleQuant: boolean): { dir: string; losses: number[] } {
  const dir = join(root, doubleQuant ? 'out-dq' : 'out-plain');
  const r = spawnSync(process.execPath, [join(ROOT, 'bin/swarmtune.ts'), 'train', '--model', modelDir, '--data', dataFile,
    '--output-dir', dir, '--init-adapter', initDir, '--max-steps', String(STEPS), '--per-device-train-batch-size', '4',
    '--learning-rate', String(LR), '--lr-scheduler-type', 'constant', '--weight-decay', String(WD), '--max-grad-norm', String(MAX_GRAD_NORM),
    '--optim', 'adamw_torch', '--no-shuffle', '--save-strategy', 'no', '--logging-steps', '1', '--device', 'cpu',
    ...(doubleQuant ? [] : ['--no-bnb-4bit-use-double-quant'])], { encoding: 'utf8', timeout: 240_000 });
  assert.equal(r.status, 0, `swarmtune train failed:\n${r.stdout}\n${r.stderr}`);
  const losses = readFileSync(join(dir, 'training_log.jsonl'), 'utf8').trim().split('\n').map((l) => (JSON.parse(l) as { loss: number }).loss);
  return { dir, losses };
}

/** ‖Δa − Δb‖ / ‖Δb‖ over all tensors, Δ = final − init */
function relUpdateDiff(a: ReadonlyArray<{ name: string; data: ArrayLike<number> }>, b: ReadonlyArray<{ name: string; data: ArrayLike<number> }>, init: NamedTensor[]): number {
  let num = 0, den = 0;
  init.forEach((t, k) => {
    const x = a.find((p) => p.name === t.name)!, y = b.find((p) => p.name === t.name)!;
    assert.ok(x && y, `missing ${t.name}`);
    for (let i = 0; i < t.data.length; i++) {
      const da = x.data[i]! - t.data[i]!, db = y.data[i]! - t.data[i]!;
      num += (da - db) ** 2;
      den += db ** 2;
    }
    void k;
  });
  return Math.sqrt(num / den);
}

let cfg: LlamaConfig;
before(async () => {
  cfg = await writeModel();
  writeFileSync(dataFile, TEXTS.map((text) => JSON.stringify({ text })).join('\n') + '\n');
});
after(() => rmSync(root, { recursive: true, force: true }));

test('the float64 reference backward is the gradient of its forward (central differences on LoRA entries)', async () => {
  const src = await referenceWeights(cfg, true);
  const tok = (await Tokenizer.fromDir(modelDir))!;
  const ex = loadDataset(dataFile, tok, { maxSeqLength: 1024, systemPrompt: DEFAULT_TRAIN_CONFIG.system_prompt, completionOnlyLoss: true, skipBadLines: false }).examples;
  const mb = collate(ex.slice(0, 2), tok.padTokenId!);
  const params = initAdapter(cfg).map((t) => ({ name: t.name, data: Float64Array.from(t.data) }));
  const r = await referenceLossGrads(src, mb.ids, mb.labels, mb.batch, mb.seqLen, { params, scaling: SCALING });
  // the loss of the gradient pass equals the existing forward reference's
  const logits = await referenceLogits(src, mb.ids, mb.batch, mb.seqLen, { params, scaling: SCALING });
  const plain = referenceLoss(logits, mb.labels, cfg.vocabSize);
  assert.ok(Math.abs(r.lossSum - plain.lossSum) < 1e-9 * plain.lossSum, `${r.lossSum} vs ${plain.lossSum}`);
  const lossAt = async () => referenceLoss(await referenceLogits(src, mb.ids, mb.batch, mb.seqLen, { params, scaling: SCALING }), mb.labels, cfg.vocabSize).lossSum;
  // one entry of A and B in a layer-0 attention target, a layer-1 MLP target and the last layer's down_proj
  for (const [name, i] of [['base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight', 37], ['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', 101],
    ['base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight', 300], ['base_model.model.model.layers.1.mlp.down_proj.lora_B.weight', 250],
    ['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight', 7]] as const) {
    const p = params.find((x) => x.name === name)!;
    const h = 1e-4, x0 = p.data[i]!;
    p.data[i] = x0 + h;
    const up = await lossAt();
    p.data[i] = x0 - h;
    const down = await lossAt();
    p.data[i] = x0;
    const fd = (up - down) / (2 * h), an = r.grads.get(name)![i]!;
    assert.ok(Math.abs(fd - an) <= 1e-6 * Math.max(1, Math.abs(an)), `${name}[${i}]: analytic ${an}, finite difference ${fd}`);
  }
});

test('swarmtune train matches the independent NF4 (+double quant) reference after 3 steps; the two quantizations are told apart', async () => {
  const init = initAdapter(cfg);
  await writeAdapter(initDir, { lora: LORA, baseModel: modelDir, tensors: init });
  const tok = (await Tokenizer.fromDir(modelDir))!;
  const ex = loadDataset(dataFile, tok, { maxSeqLength: 1024, systemPrompt: DEFAULT_TRAIN_CONFIG.system_prompt, completionOnlyLoss: true, skipBadLines: false }).examples;
  assert.equal(ex.length, 4);
  const mb = collate(ex, tok.padTokenId!);

  // the state the engine holds is bitsandbytes' state, byte for byte (the reference quantizer is independent)
  for (const doubleQuant of [true, false]) {
    const md = await openModelDir(modelDir, { doubleQuant });
    const ref = await referenceWeights(cfg, doubleQuant);
    try {
      for (const name of ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight', 'model.layers.1.mlp.down_proj.weight']) {
        assert.deepEqual(await md.weights.getNF4(name), await ref.getNF4(name), `${name} (double quant ${doubleQuant})`);
      }
    } finally {
      await md.close();
    }
  }

  const ref = { dq: await referenceTrain(await referenceWeights(cfg, true), init, mb), plain: await referenceTrain(await referenceWeights(cfg, false), init, mb) };
  const eng = { dq: engineTrain(true), plain: engineTrain(false) };
  const adapter = { dq: (await readAdapter(eng.dq.dir)).tensors, plain: (await readAdapter(eng.plain.dir)).tensors };
  const d = {
    dq: relUpdateDiff(adapter.dq, ref.dq.params, init),
    plain: relUpdateDiff(adapter.plain, ref.plain.params, init),
    dqVsPlainRef: relUpdateDiff(adapter.dq, ref.plain.params, init),
    plainVsDqRef: relUpdateDiff(adapter.plain, ref.dq.params, init),
    refs: relUpdateDiff(ref.dq.params, ref.plain.params, init),
  };
  console.log(`# adapter update after ${STEPS} steps, ‖Δ_train − Δ_ref‖/‖Δ_ref‖: double quant ${d.dq.toExponential(2)}, plain ${d.plain.toExponential(2)}; ` +
    `train(DQ) vs plain reference ${d.dqVsPlainRef.toExponential(2)}, train(plain) vs DQ reference ${d.plainVsDqRef.toExponential(2)}, references apart ${d.refs.toExponential(2)}`);
  console.log(`# losses: train DQ ${eng.dq.losses.map((x) => x.toFixed(6)).join(' ')}, reference DQ ${ref.dq.losses.map((x) => x.toFixed(6)).join(' ')}`);
  // float32 engine against float64 reference: float32 rounding of GEMM sums and of AdamW's state, amplified where
  // AdamW divides a small gradient by its own square root; 1e-3 is the bar (measured: see docs/trainer.md)
  assert.ok(d.dq <= 1e-3, `double quant: update differs by ${d.dq} relative`);
  assert.ok(d.plain <= 1e-3, `plain: update differs by ${d.plain} relative`);
  // the comparison has the power to tell the two quantizations apart
  assert.ok(d.dqVsPlainRef > 3 * d.dq && d.plainVsDqRef > 3 * d.plain, JSON.stringify(d));
  for (let s = 0; s < STEPS; s++) {
    assert.ok(Math.abs(eng.dq.losses[s]! - ref.dq.losses[s]!) <= 1e-5 * ref.dq.losses[s]!, `step ${s + 1} loss ${eng.dq.losses[s]} vs ${ref.dq.losses[s]}`);
    assert.ok(Math.abs(eng.plain.losses[s]! - ref.plain.losses[s]!) <= 1e-5 * ref.plain.losses[s]!, `step ${s + 1} loss (plain) ${eng.plain.losses[s]} vs ${ref.plain.losses[s]}`);
  }
});
