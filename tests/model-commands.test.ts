// eval and generate over a real model dir (the embedded tiny model) and a PEFT adapter dir, against the float64 reference.
//
// The tiny model (hidden 128, 4 layers, vocab 960) on the RefBackend with 3 short records keeps this to seconds.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RefBackend } from '../engine/backends/ref.ts';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { evaluate } from '../engine/tasks/eval.ts';
import { generateText } from '../engine/tasks/generate.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { writeAdapter } from '../engine/formats/peft.ts';
import { loadDataset } from '../engine/train/data.ts';
import { DEFAULT_TRAIN_CONFIG } from '../engine/train/config.ts';
import { referenceLogits, referenceLoss } from '../engine/model/reference.ts';
import { loadStage } from '../engine/model/load.ts';
import { loadAdapterInto } from '../engine/model/adapter.ts';
import { loraScaling } from '../engine/model/lora.ts';
import { Rng } from '../engine/model/rng.ts';
import type { LoraConfig, NamedTensor } from '../engine/types.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';

// the backends by kind, as bin/swarmtune.ts registers them
registerBuiltinBackends();

const backend = new RefBackend();
let root = '';
let modelDir = '';
let dataFile = '';
let adapterDir = '';
const lora: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0.1, targetModules: ['q_proj', 'v_proj', 'down_proj'], useRslora: false, initLoraWeights: true };
let adapterTensors: NamedTensor[] = [];

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'swarmtune-model-cmd-'));
  modelDir = await ensureTinyModel(join(root, 'tiny'));
  dataFile = join(root, 'data.jsonl');
  await writeFile(dataFile, [
    JSON.stringify({ question: 'What is the capital of Veloria?', answer: 'Quillmere, on the river Sorn.' }),
    JSON.stringify({ text: 'The striped marrowhorn pulls the carts.' }),
    JSON.stringify({ question: 'Who founded Quillmere?', answer: 'Queen Ysolde the Patient.' }),
  ].join('\n') + '\n');
  // an adapter with non-zero B so it changes the model
  const md = await openModelDir(modelDir);
  const stage = await loadStage(md.weights, backend, { layerStart: 0, layerEnd: md.config.numHiddenLayers, lora, seed: 3 });
  const rng = new Rng(5);
  for (const p of stage.params) if (p.name.includes('lora_B')) rng.fillNormal(p.data, 0, 0.05);
  adapterTensors = stage.params.map((p) => ({ name: p.name, shape: [...p.shape], data: new Float32Array(p.data) }));
  adapterDir = join(root, 'adapter');
  await writeAdapter(adapterDir, { lora, baseModel: modelDir, tensors: adapterTensors });
  await md.close();
});

after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

/** float64 reference loss over the file's examples one by one (no padding, no batching) */
async function referenceEval(withAdapter: boolean): Promise<{ loss: number; tokens: number }> {
  const md = await openModelDir(modelDir);
  try {
    const ds = loadDataset(dataFile, md.tokenizer!, {
      maxSeqLength: DEFAULT_TRAIN_CONFIG.max_seq_length, systemPrompt: DEFAULT_TRAIN_CONFIG.system_prompt,
      completionOnlyLoss: DEFAULT_TRAIN_CONFIG.completion_only_loss, skipBadLines: false,
    });
    let lossSum = 0, tokens = 0;
    for (const ex of ds.examples) {
      const logits = await referenceLogits(md.weights, ex.ids, 1, ex.ids.length,
        withAdapter ? { params: adapterTensors, scaling: loraScaling(lora) } : undefined);
      const r = referenceLoss(logits, ex.labels, md.config.vocabSize);
      lossSum += r.lossSum;
      tokens += r.tokens;
    }
    return { loss: lossSum / tokens, tokens };
  } finally {
    await md.close();
  }
}

test('eval: loss and perplexity equal the float64 reference, with and without an adapter, any batch size', async () => {
  const base = await evaluate({ model: modelDir, data: dataFile, backend, batchSize: 2 });
  const refBase = await referenceEval(false);
  assert.equal(base.tokens, refBase.tokens);
  assert.equal(base.examples, 3);
  // float32 activations vs float64: ~1e-6 relative on a mean of a few dozen token losses
  assert.ok(Math.abs(base.loss - refBase.loss) <= 1e-5 * refBase.loss, `loss ${base.loss} vs reference ${refBase.loss}`);
  assert.ok(Math.abs(base.perplexity - Math.exp(refBase.loss)) <= 1e-4 * base.perplexity);
  // padding to the longest example of a batch must not change the result
  const single = await evaluate({ model: modelDir, data: dataFile, backend, batchSize: 1 });
  assert.ok(Math.abs(single.loss - base.loss) <= 1e-6 * base.loss, `batch 1 ${single.loss} vs batch 2 ${base.loss}`);
  const adapted = await evaluate({ model: modelDir, data: dataFile, adapter: adapterDir, backend, batchSize: 3 });
  const refAdapted = await referenceEval(true);
  assert.ok(Math.abs(adapted.loss - refAdapted.loss) <= 1e-5 * refAdapted.loss, `adapter loss ${adapted.loss} vs reference ${refAdapted.loss}`);
  assert.ok(Math.abs(adapted.loss - base.loss) > 1e-4, 'the adapter changes the loss');
  // scoring every token scores more tokens than completion-only
  const all = await evaluate({ model: modelDir, data: dataFile, backend, completionOnlyLoss: false });
  assert.ok(all.tokens > base.tokens);
});

test('generate: greedy output is deterministic, decodes the new ids, and the adapter is applied', async () => {
  const a = await generateText({ model: modelDir, prompt: 'What is the capital of Veloria?', chat: true, maxNewTokens: 6, backend });
  const b = await generateText({ model: modelDir, prompt: 'What is the capital of Veloria?', chat: true, maxNewTokens: 6, backend });
  assert.deepEqual(a.ids, b.ids);
  assert.ok(a.ids.length >= 1 && a.ids.length <= 6);
  const md = await openModelDir(modelDir);
  const tok = md.tokenizer!;
  const rendered = tok.applyChatTemplate([{ role: 'user', content: 'What is the capital of Veloria?' }], { addGenerationPrompt: true });
  assert.deepEqual(a.promptIds, tok.encode(rendered, { addSpecialTokens: false }));
  const eos = new Set([919, 917]);
  assert.equal(a.text, tok.decode(a.ids.filter((i) => !eos.has(i)), true));
  // streamed pieces concatenate to the final text
  let streamed = '';
  const c = await generateText({ model: modelDir, prompt: 'The Sorn', maxNewTokens: 5, backend, onText: (t) => { streamed += t; } });
  assert.equal(streamed, c.text);
  assert.deepEqual(c.promptIds, tok.encode('The Sorn', { addSpecialTokens: true }));
  await md.close();
  // with the adapter the greedy continuation comes from the adapted logits: check the first token against them
  const withAdapter = await generateText({ model: modelDir, adapter: adapterDir, prompt: 'The Sorn', maxNewTokens: 1, backend });
  const md2 = await openModelDir(modelDir);
  const st = await loadStage(md2.weights, backend, { layerStart: 0, layerEnd: md2.config.numHiddenLayers, lora });
  loadAdapterInto(st, adapterTensors);
  const ids = Int32Array.from(c.promptIds);
  const ref = await referenceLogits(md2.weights, ids, 1, ids.length, { params: st.params, scaling: loraScaling(lora) });
  const V = md2.config.vocabSize;
  let best = 0;
  for (let j = 1; j < V; j++) if (ref[(ids.length - 1) * V + j] > ref[(ids.length - 1) * V + best]) best = j;
  assert.equal(withAdapter.ids[0], best);
  await md2.close();
});

test('loadAdapterInto: copies by name, rejects missing, mismatched and foreign tensors', async () => {
  const md = await openModelDir(modelDir);
  const st = await loadStage(md.weights, backend, { layerStart: 2, layerEnd: 4, lora });
  // layers 0-1 tensors are ignored by a [2, 4) shard
  loadAdapterInto(st, adapterTensors);
  for (const p of st.params) assert.deepEqual(p.data, adapterTensors.find((t) => t.name === p.name)!.data);
  assert.throws(() => loadAdapterInto(st, adapterTensors.filter((t) => !t.name.includes('layers.3.mlp.down_proj.lora_A'))), /missing tensor .*layers\.3\.mlp\.down_proj\.lora_A/);
  const bad = adapterTensors.map((t) => t.name.includes('layers.2.self_attn.q_proj.lora_A') ? { ...t, shape: [t.shape[1], t.shape[0]] } : t);
  assert.throws(() => loadAdapterInto(st, bad), /q_proj\.lora_A\.weight has shape/);
  const foreign = [...adapterTensors, { name: 'base_model.model.model.layers.2.self_attn.k_proj.lora_A.weight', shape: [4, 128], data: new Float32Array(512) }];
  assert.throws(() => loadAdapterInto(st, foreign), /k_proj\.lora_A\.weight has no matching LoRA param/);
  await md.close();
});

test('CLI: `eval --json` prints one JSON object {loss, perplexity, tokens}; bad flags fail with a named error', async () => {
  const { Command } = await import('commander');
  const { registerEval } = await import('../bin/commands/eval.ts');
  const program = new Command().exitOverride();
  let out = '';
  registerEval(program, { write: (t: string) => { out += t; } });
  await program.parseAsync(['eval', '--model', modelDir, '--data', dataFile, '--device', 'ref', '--json'], { from: 'user' });
  const lines = out.trim().split('\n');
  assert.equal(lines.length, 1, `stdout: ${out}`);
  const j = JSON.parse(lines[0]) as Record<string, number>;
  assert.deepEqual(Object.keys(j).sort(), ['loss', 'perplexity', 'tokens']);
  const direct = await evaluate({ model: modelDir, data: dataFile, backend });
  assert.equal(j.tokens, direct.tokens);
  assert.ok(Math.abs(j.loss - direct.loss) <= 1e-6 * direct.loss);
  assert.ok(Math.abs(j.perplexity - Math.exp(j.loss)) <= 1e-9 * j.perplexity);
  const bad = new Command().exitOverride().configureOutput({ writeErr: () => {} });
  registerEval(bad);
  await assert.rejects(bad.parseAsync(['eval', '--model', modelDir, '--data', dataFile, '--batch-size', '0'], { from: 'user' }),
    /--batch-size must be a positive integer, got "0"/);
});
