// The tiny model dir through the project's own loaders: openModelDir (config, weights, tokenizer wrapper),
// chat rendering as the trainer does it, and a whole-model forward on the float64 reference backend.
// The model is 0.9M parameters, so one reference forward over a 30-token chat takes well under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureTinyModel, TINY_SYSTEM_PROMPT } from '../engine/tiny/index.ts';
import { readTinyDataset } from '../engine/tiny/files.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { loadStage } from '../engine/model/load.ts';
import { logits } from '../engine/model/decode.ts';
import { NO_LORA } from '../engine/model/inference.ts';
import { RefBackend } from '../engine/backends/ref.ts';

test('the tiny model dir loads through openModelDir and runs a finite forward with near-uniform logits', async () => {
  const root = mkdtempSync(join(tmpdir(), 'swarmtune-tiny-model-'));
  const md = await openModelDir(await ensureTinyModel(join(root, 'model')));
  const backend = new RefBackend();
  try {
    assert.equal(md.config.numHiddenLayers, 4);
    assert.equal(md.config.vocabSize, 960);
    const tok = md.tokenizer;
    assert.ok(tok, 'tokenizer loaded');
    assert.equal(tok.vocabSize, md.config.vocabSize);
    assert.equal(tok.bosTokenId, md.config.bosTokenId);
    assert.ok(Array.isArray(md.config.eosTokenId) && md.config.eosTokenId.includes(tok.eosTokenId!));

    const { question } = readTinyDataset()[0];
    const text = tok.applyChatTemplate([{ role: 'system', content: TINY_SYSTEM_PROMPT }, { role: 'user', content: question }], { addGenerationPrompt: true });
    assert.ok(text.endsWith('<|im_start|>assistant\n'));
    const ids = tok.encode(text);
    assert.equal(ids[0], tok.bosTokenId, 'the post-processor adds BOS');
    assert.equal(ids.filter((i) => i === tok.bosTokenId).length, 1, 'exactly one BOS (template has none)');

    const stage = await loadStage(md.weights, backend, { layerStart: 0, layerEnd: 4, lora: NO_LORA });
    const S = ids.length;
    const out = await logits(stage, Int32Array.from(ids), 1, S);
    assert.equal(out.length, S * 960);
    assert.ok(out.every(Number.isFinite));
    // lm_head std 1/sqrt(hidden) over a unit-RMS hidden state gives logits of std ~1: a random model,
    // with a cross-entropy near ln(960) + 0.5 (the loss the demo starts from, ~7.3)
    let sum = 0, sq = 0;
    for (const x of out) { sum += x; sq += x * x; }
    const std = Math.sqrt(sq / out.length - (sum / out.length) ** 2);
    assert.ok(std > 0.5 && std < 2, `logit std ${std}`);
    stage.dispose();
  } finally {
    backend.dispose();
    await md.close();
    rmSync(root, { recursive: true, force: true });
  }
});
