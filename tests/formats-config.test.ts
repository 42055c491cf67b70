// HF config.json parsing for Llama 3.1, TinyLlama, Mistral, Qwen2 and the rope_parameters form; config.json writing.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseLlamaConfig, configNotes, ropeInvFreq, writeConfig, readConfig, configToJson } from '../engine/formats/config.ts';

// The published config.json files of these models (trimmed of keys the parser does not read).
const LLAMA31_8B = {
  architectures: ['LlamaForCausalLM'], attention_bias: false, attention_dropout: 0.0, bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009], hidden_act: 'silu', hidden_size: 4096, initializer_range: 0.02,
  intermediate_size: 14336, max_position_embeddings: 131072, mlp_bias: false, model_type: 'llama',
  num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, pretraining_tp: 1, rms_norm_eps: 1e-05,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.43.0.dev0',
  use_cache: true, vocab_size: 128256,
};
const TINYLLAMA = {
  architectures: ['LlamaForCausalLM'], bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu', hidden_size: 2048,
  initializer_range: 0.02, intermediate_size: 5632, max_position_embeddings: 2048, model_type: 'llama',
  num_attention_heads: 32, num_hidden_layers: 22, num_key_value_heads: 4, pretraining_tp: 1, rms_norm_eps: 1e-05,
  rope_scaling: null, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.35.0',
  use_cache: true, vocab_size: 32000,
};
const MISTRAL_7B_V01 = {
  architectures: ['MistralForCausalLM'], bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu', hidden_size: 4096,
  initializer_range: 0.02, intermediate_size: 14336, max_position_embeddings: 32768, model_type: 'mistral',
  num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, rms_norm_eps: 1e-05, rope_theta: 10000.0,
  sliding_window: 4096, tie_word_embeddings: false, torch_dtype: 'bfloat16', vocab_size: 32000,
};
const QWEN2_05B = {
  architectures: ['Qwen2ForCausalLM'], attention_dropout: 0.0, bos_token_id: 151643, eos_token_id: 151645,
  hidden_act: 'silu', hidden_size: 896, initializer_range: 0.02, intermediate_size: 4864, max_position_embeddings: 32768,
  max_window_layers: 24, model_type: 'qwen2', num_attention_heads: 14, num_hidden_layers: 24, num_key_value_heads: 2,
  rms_norm_eps: 1e-06, rope_theta: 1000000.0, sliding_window: 32768, tie_word_embeddings: true, torch_dtype: 'bfloat16',
  use_sliding_window: false, vocab_size: 151936,
};

test('Llama-3.1-8B: GQA, llama3 rope scaling, eos list', () => {
  const c = parseLlamaConfig(LLAMA31_8B);
  assert.equal(c.modelType, 'llama');
  assert.equal(c.hiddenSize, 4096);
  assert.equal(c.numKeyValueHeads, 8);
  assert.equal(c.headDim, 128);
  assert.equal(c.ropeTheta, 500000);
  assert.equal(c.rmsNormEps, 1e-5);
  assert.deepEqual(c.ropeScaling, { ropeType: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
  assert.deepEqual(c.eosTokenId, [128001, 128008, 128009]);
  assert.equal(c.bosTokenId, 128000);
  assert.equal(c.padTokenId, null);
  assert.equal(c.tieWordEmbeddings, false);
  assert.equal(c.attentionBias, false);
  // llama3 scaling: highest frequency (wavelen 2π < 8192/4) unchanged, lowest (wavelen > 8192) divided by 8
  const inv = ropeInvFreq(c);
  assert.equal(inv.length, 64);
  assert.equal(inv[0], 1);
  const plain = 1 / 500000 ** (126 / 128);
  assert.ok(Math.abs(inv[63] - plain / 8) < 1e-15 * plain);
  // a mid band frequency is interpolated strictly between inv/8 and inv
  const i = 30, base = 1 / 500000 ** (2 * i / 128), wl = 2 * Math.PI / base;
  assert.ok(wl > 2048 && wl < 8192, 'index 30 is in the smooth band');
  assert.ok(inv[i] > base / 8 && inv[i] < base);
});

test('TinyLlama and Qwen2 (q/k/v bias, tied embeddings, no sliding window)', () => {
  const t = parseLlamaConfig(TINYLLAMA);
  assert.equal(t.numKeyValueHeads, 4);
  assert.equal(t.headDim, 64);
  assert.equal(t.ropeTheta, 10000);
  assert.equal(t.ropeScaling, null);
  assert.equal(t.eosTokenId, 2);
  const q = parseLlamaConfig(QWEN2_05B);
  assert.equal(q.modelType, 'qwen2');
  assert.equal(q.headDim, 64);
  assert.equal(q.attentionBias, true);
  assert.equal(q.tieWordEmbeddings, true);
  assert.equal(q.ropeTheta, 1e6);
  assert.equal(q.rmsNormEps, 1e-6);
  assert.throws(() => parseLlamaConfig({ ...QWEN2_05B, use_sliding_window: true }, 'q/config.json'), /q\/config.json: "use_sliding_window": true is not supported/);
});

test('Mistral: sliding_window accepted with a note', () => {
  const m = parseLlamaConfig(MISTRAL_7B_V01);
  assert.equal(m.modelType, 'mistral');
  assert.deepEqual(configNotes(m), ['sliding_window 4096 is ignored: attention is full causal, which is identical for sequences up to 4096 tokens']);
  assert.deepEqual(configNotes(parseLlamaConfig({ ...MISTRAL_7B_V01, sliding_window: null })), []);
});

test('rope_parameters form (newest transformers) and defaults', () => {
  const { rope_scaling: _s, rope_theta: _t, ...rest } = LLAMA31_8B;
  const c = parseLlamaConfig({ ...rest, rope_parameters: { rope_type: 'llama3', rope_theta: 500000.0, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 } });
  assert.equal(c.ropeTheta, 500000);
  assert.equal(c.ropeScaling?.ropeType, 'llama3');
  assert.equal(c.ropeScaling?.originalMaxPositionEmbeddings, 8192);
  const d = parseLlamaConfig({ ...rest, rope_parameters: { rope_type: 'default', rope_theta: 10000.0 } });
  assert.equal(d.ropeScaling, null);
  assert.equal(d.ropeTheta, 10000);
  const perLayer = parseLlamaConfig({ ...rest, rope_parameters: { full_attention: { rope_type: 'linear', rope_theta: 1e4, factor: 2 } } });
  assert.deepEqual(perLayer.ropeScaling, { ropeType: 'linear', factor: 2 });
  assert.throws(() => parseLlamaConfig({ ...rest, rope_parameters: { rope_type: 'yarn', rope_theta: 1e4, factor: 4 } }), /"rope_parameters.rope_type" "yarn" is not supported/);
  const explicitHead = parseLlamaConfig({ ...TINYLLAMA, head_dim: 128 });
  assert.equal(explicitHead.headDim, 128);
});

test('validation errors name the bad key', () => {
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ ...TINYLLAMA, num_key_value_heads: 5 }, /"num_key_value_heads" \(5\) must divide "num_attention_heads" \(32\)/],
    [{ ...TINYLLAMA, vocab_size: undefined }, /missing required key "vocab_size"/],
    [{ ...TINYLLAMA, hidden_size: 2047 }, /"hidden_size" \(2047\) is not divisible by "num_attention_heads"/],
    [{ ...TINYLLAMA, rms_norm_eps: -1 }, /"rms_norm_eps" must be a positive finite number, got -1/],
    [{ ...TINYLLAMA, model_type: 'gpt2' }, /"model_type" "gpt2" is not supported/],
    [{ ...TINYLLAMA, hidden_act: 'gelu' }, /"hidden_act" must be "silu"/],
    [{ ...TINYLLAMA, tie_word_embeddings: 'yes' }, /"tie_word_embeddings" must be true or false/],
    [{ ...LLAMA31_8B, rope_scaling: { rope_type: 'llama3', factor: 8 } }, /"rope_scaling.low_freq_factor" must be a positive finite number/],
    [{ ...TINYLLAMA, eos_token_id: [2, -1] }, /"eos_token_id" must be a token id or a list/],
  ];
  for (const [json, re] of cases) assert.throws(() => parseLlamaConfig(json, 'm/config.json'), (e: Error) => e.name === 'ConfigError' && re.test(e.message) && e.message.startsWith('m/config.json'));
});

test('writeConfig writes transformers-style JSON that parses back identically', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'cfg-test-'));
  try {
    await writeConfig(dir, parseLlamaConfig(LLAMA31_8B), { torch_dtype: 'bfloat16' });
    const text = await readFile(join(dir, 'config.json'), 'utf8');
    assert.match(text, /^\{\n  "architectures": \[\n    "LlamaForCausalLM"\n  \],\n  "attention_bias": false,/);
    assert.match(text, /"rope_theta": 500000\.0,/);
    assert.match(text, /"rms_norm_eps": 1e-05,/);
    assert.match(text, /"factor": 8\.0,/);
    assert.match(text, /"original_max_position_embeddings": 8192,/);
    assert.ok(text.endsWith('}\n'));
    const back = await readConfig(dir);
    assert.deepEqual(back.raw, JSON.parse(configToJson(LLAMA31_8B)));
    assert.equal(back.headDim, 128);
    await assert.rejects(readConfig(join(dir, 'nope')), /nope: no config.json/);
  } finally {
    await rm(dir, { recursive: true });
  }
});
