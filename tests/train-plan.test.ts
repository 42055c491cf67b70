// The memory/parameter model behind `swarmtune plan` and the coordinator's planner, against published figures:
// Llama-3.1-8B r=16 all-linear = 41,943,040 trainable (PEFT), 70B NF4 weights ≈ 35 GB, 8B QLoRA ≈ 6 GB.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { LORA_TARGETS } from '../engine/types.ts';
import {
  baseParamCount, loraParamCount, nf4LinearBytes, stageMemoryBytes, suggestBatch, trainableParamsLine,
} from '../engine/train/plan.ts';

export const LLAMA31_8B = parseLlamaConfig({
  architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: 4096, intermediate_size: 14336,
  num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 128256, rms_norm_eps: 1e-5,
  rope_theta: 500000, max_position_embeddings: 131072, tie_word_embeddings: false, bos_token_id: 128000, eos_token_id: 128001,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
});
const LLAMA2_70B = parseLlamaConfig({
  architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: 8192, intermediate_size: 28672,
  num_hidden_layers: 80, num_attention_heads: 64, num_key_value_heads: 8, vocab_size: 32000, rms_norm_eps: 1e-5,
  rope_theta: 10000, max_position_embeddings: 4096, tie_word_embeddings: false,
});
const all7 = { r: 16, targetModules: [...LORA_TARGETS] };

test('Llama-3.1-8B, r=16, 7 targets: 41,943,040 trainable; PEFT line uses the full base count', () => {
  assert.equal(loraParamCount(LLAMA31_8B, all7), 41_943_040);
  assert.equal(baseParamCount(LLAMA31_8B), 8_030_261_248); // the published 8.03B
  assert.equal(trainableParamsLine(41_943_040, 8_030_261_248 + 41_943_040),
    'trainable params: 41,943,040 || all params: 8,072,204,288 || trainable%: 0.5196');
  // per-stage counts add up to the whole
  assert.equal(loraParamCount(LLAMA31_8B, all7, 0, 10) + loraParamCount(LLAMA31_8B, all7, 10, 32), 41_943_040);
});

test('70B NF4 weights ≈ 35 GB; double quant saves ~0.373 bits/param', () => {
  const m = stageMemoryBytes(LLAMA2_70B, { layerStart: 0, layerEnd: 80, lora: all7, microBatch: 1, seqLen: 512, optim: 'paged_adamw_32bit' });
  const nf4 = m.nf4WeightsBytes + m.quantConstantsBytes;
  assert.ok(nf4 > 34e9 && nf4 < 36e9, `70B NF4 linears ${nf4 / 1e9} GB`);
  const one = nf4LinearBytes(8192 * 28672);
  const noDq = nf4LinearBytes(8192 * 28672, 64, false);
  const savedBitsPerParam = 8 * (noDq.constants - one.constants) / (8192 * 28672);
  assert.ok(Math.abs(savedBitsPerParam - 0.373) < 0.002, `DQ saves ${savedBitsPerParam} bits/param`);
});

test('8B QLoRA (r=16 all-linear, batch 1 × 512, paged optimizer) ≈ 6 GB', () => {
  const m = stageMemoryBytes(LLAMA31_8B, { layerStart: 0, layerEnd: 32, lora: all7, microBatch: 1, seqLen: 512, optim: 'paged_adamw_32bit' });
  assert.ok(m.totalBytes > 5.5e9 && m.totalBytes < 7e9, `8B QLoRA total ${m.totalBytes / 1e9} GB`);
  assert.equal(m.optimizerBytes, 0);
  assert.equal(m.optimizerHostBytes, 8 * 41_943_040);
  const m8 = stageMemoryBytes(LLAMA31_8B, { layerStart: 0, layerEnd: 32, lora: all7, microBatch: 1, seqLen: 512, optim: 'adamw_8bit' });
  assert.ok(m8.optimizerBytes > 2 * 41_943_040 && m8.optimizerBytes < 2.1 * 41_943_040, `8-bit state ${m8.optimizerBytes}`);
});

test('stages: first holds embeddings, last holds the head; middle holds neither; memory grows with batch', () => {
  const base = { lora: all7, microBatch: 1, seqLen: 512, optim: 'adamw_torch' as const };
  const first = stageMemoryBytes(LLAMA31_8B, { ...base, layerStart: 0, layerEnd: 8 });
  const mid = stageMemoryBytes(LLAMA31_8B, { ...base, layerStart: 8, layerEnd: 16 });
  const last = stageMemoryBytes(LLAMA31_8B, { ...base, layerStart: 24, layerEnd: 32 });
  assert.equal(first.embeddingsBytes, 128256 * 4096 * 2);
  assert.equal(first.lmHeadBytes, 0);
  assert.equal(mid.embeddingsBytes + mid.lmHeadBytes, 0);
  assert.equal(last.lmHeadBytes, 128256 * 4096 * 2);
  const big = stageMemoryBytes(LLAMA31_8B, { ...base, layerStart: 8, layerEnd: 16, microBatch: 4 });
  assert.ok(big.activationsBytes > 3 * mid.activationsBytes);
  const s = suggestBatch(LLAMA31_8B, { ...base, layerStart: 0, layerEnd: 32 }, 24 * 2 ** 30, 16);
  assert.ok(s.fits && s.microBatch >= 4 && s.microBatch * s.gradientAccumulationSteps >= 16, JSON.stringify(s));
  assert.equal(suggestBatch(LLAMA31_8B, { ...base, layerStart: 0, layerEnd: 32 }, 2 ** 30).fits, false);
});

test('planReport (swarmtune plan) reads a config.json and suggests micro-batch × accumulation for a GPU size', async () => {
  const { mkdtempSync, rmSync, writeFileSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const { planReport } = await import('../engine/tasks/plan.ts');
  const dir = mkdtempSync(join(tmpdir(), 'swarmtune-plan-'));
  try {
    writeFileSync(join(dir, 'config.json'), JSON.stringify(LLAMA31_8B.raw));
    const p = await planReport({ model: dir, gpuMemory: '24GiB', loraR: '16' });
    assert.equal(p.trainable_params, 41_943_040);
    assert.match(p.trainable_line, /^trainable params: 41,943,040 \|\| all params: 8,072,204,288/);
    assert.ok(p.memory_without_double_quant_bytes > p.memory.totalBytes);
    assert.ok(p.suggestion && p.suggestion.fits && p.suggestion.per_device_train_batch_size * p.suggestion.gradient_accumulation_steps === 16);
    const small = await planReport({ model: join(dir, 'config.json'), gpuMemory: '8GiB', maxSeqLength: '2048' });
    assert.ok(small.suggestion!.per_device_train_batch_size < p.suggestion.per_device_train_batch_size);
    await assert.rejects(planReport({ model: dir, loraR: 'x' }), /--lora-r must be a positive integer/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('vocabBytes: a float32 CPU stage with a bf16-exact embedding and head counts them at 2 bytes per value, everything else at floatBytes', () => {
  const base = { lora: all7, microBatch: 1, seqLen: 2048, optim: 'adamw_torch' as const, floatBytes: 4 };
  for (const [a, b] of [[0, 16], [16, 32]] as const) {
    const f32 = stageMemoryBytes(LLAMA31_8B, { ...base, layerStart: a, layerEnd: b });
    const bf16 = stageMemoryBytes(LLAMA31_8B, { ...base, layerStart: a, layerEnd: b, vocabBytes: 2 });
    assert.equal(f32.embeddingsBytes + f32.lmHeadBytes, 128256 * 4096 * 4);
    assert.equal(bf16.embeddingsBytes + bf16.lmHeadBytes, 128256 * 4096 * 2);
    assert.equal(f32.totalBytes - bf16.totalBytes, 128256 * 4096 * 2);
    assert.equal(bf16.activationsBytes, f32.activationsBytes);
  }
});
