// PEFT adapter dirs: adapter_config.json byte layout as PEFT writes it, F32 tensors with PEFT keys, validation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeAdapter, readAdapter, parseLoraKey } from '../engine/formats/peft.ts';
import { loraParamName as loraKey } from '../engine/model/lora.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import type { LoraConfig, NamedTensor } from '../engine/types.ts';

// tiny dims: hidden 8, 2 heads of 4, 1 kv head, intermediate 12 — enough for distinct in/out per module
const CFG = parseLlamaConfig({ model_type: 'llama', vocab_size: 10, hidden_size: 8, intermediate_size: 12, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1 });
const LORA: LoraConfig = { r: 2, loraAlpha: 16, loraDropout: 0.05, targetModules: ['v_proj', 'q_proj', 'down_proj'], useRslora: false, initLoraWeights: true };
const DIMS: Record<string, [number, number]> = { q_proj: [8, 8], v_proj: [4, 8], down_proj: [8, 12] };

function tensors(): NamedTensor[] {
  const out: NamedTensor[] = [];
  let k = 0;
  for (const layer of [1, 0]) {
    for (const m of ['down_proj', 'q_proj', 'v_proj'] as const) {
      const [o, i] = DIMS[m];
      out.push({ name: loraKey(layer, m, 'B'), shape: [o, 2], data: Float32Array.from({ length: o * 2 }, () => k++ * 0.5) });
      out.push({ name: loraKey(layer, m, 'A'), shape: [2, i], data: Float32Array.from({ length: 2 * i }, () => -k++ * 0.25) });
    }
  }
  return out;
}

test('adapter_config.json is written like PEFT (sorted keys, indent 2, typical fields)', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'peft-test-'));
  try {
    await writeAdapter(dir, { lora: LORA, baseModel: 'meta-llama/Llama-3.1-8B', tensors: tensors() });
    const text = await readFile(join(dir, 'adapter_config.json'), 'utf8');
    assert.equal(text, `{
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 2,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "down_proj",
    "q_proj",
    "v_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}`);
    const f = await SafetensorsFile.open(join(dir, 'adapter_model.safetensors'));
    assert.deepEqual(f.metadata, { format: 'pt' });
    assert.equal(f.info('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight').dtype, 'F32');
    assert.deepEqual(f.info('base_model.model.model.layers.1.mlp.down_proj.lora_B.weight').shape, [8, 2]);
    await f.close();
    const zeroDrop = { ...LORA, loraDropout: 0, useRslora: true, initLoraWeights: 'gaussian' as const };
    await writeAdapter(join(dir, 'b'), { lora: zeroDrop, baseModel: 'x', tensors: tensors() });
    const t2 = await readFile(join(dir, 'b', 'adapter_config.json'), 'utf8');
    assert.match(t2, /"lora_dropout": 0\.0,/);
    assert.match(t2, /"use_rslora": true/);
    assert.match(t2, /"init_lora_weights": "gaussian"/);
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('adapter round trip: config fields, tensors in stage order, values identical', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'peft-test-'));
  try {
    const ts = tensors();
    await writeAdapter(dir, { lora: LORA, baseModel: 'base', tensors: ts });
    const a = await readAdapter(dir, { config: CFG });
    assert.deepEqual(a.lora, { ...LORA, targetModules: ['q_proj', 'v_proj', 'down_proj'] });
    assert.equal(a.baseModel, 'base');
    assert.deepEqual(a.tensors.map((t) => { const k = parseLoraKey(t.name)!; return `${k.layer}.${k.module}.${k.which}`; }),
      ['0.q_proj.A', '0.q_proj.B', '0.v_proj.A', '0.v_proj.B', '0.down_proj.A', '0.down_proj.B',
        '1.q_proj.A', '1.q_proj.B', '1.v_proj.A', '1.v_proj.B', '1.down_proj.A', '1.down_proj.B']);
    for (const t of ts) {
      const back = a.tensors.find((x) => x.name === t.name)!;
      assert.deepEqual(back.shape, t.shape);
      assert.deepEqual(back.data, t.data);
    }
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('adapter validation: bad names, shapes, missing pairs, unsupported config', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'peft-test-'));
  try {
    const ts = tensors();
    await assert.rejects(writeAdapter(dir, { lora: LORA, baseModel: 'b', tensors: [...ts, { name: 'base_model.model.lm_head.lora_A.weight', shape: [2, 8], data: new Float32Array(16) }] }), /is not a PEFT LoRA key/);
    await assert.rejects(writeAdapter(dir, { lora: LORA, baseModel: 'b', tensors: ts.map((t) => t.name.endsWith('0.self_attn.q_proj.lora_A.weight') ? { ...t, shape: [8, 2] } : t) }), /q_proj.lora_A.weight has shape \[8, 2\], expected \[r=2, in\]/);
    await assert.rejects(writeAdapter(dir, { lora: LORA, baseModel: 'b', tensors: ts.filter((t) => !t.name.endsWith('layers.1.mlp.down_proj.lora_B.weight')) }), /layers.1.mlp.down_proj.lora_A.weight has no matching .*down_proj.lora_B.weight/);
    await assert.rejects(writeAdapter(dir, { lora: { ...LORA, targetModules: ['q_proj', 'v_proj'] }, baseModel: 'b', tensors: ts }), /targets down_proj, which is not in target_modules/);
    await writeAdapter(dir, { lora: LORA, baseModel: 'b', tensors: ts });
    // in/out sizes checked against the model config
    const wrongCfg = parseLlamaConfig({ ...CFG.raw, intermediate_size: 16 });
    await assert.rejects(readAdapter(dir, { config: wrongCfg }), /down_proj.lora_A.weight has shape \[2, 12\], expected \[2, 16\]/);
    const cfgPath = join(dir, 'adapter_config.json');
    const good = JSON.parse(await readFile(cfgPath, 'utf8'));
    for (const [patch, re] of [
      [{ use_dora: true }, /"use_dora" is not supported/],
      [{ peft_type: 'IA3' }, /"peft_type" must be "LORA"/],
      [{ target_modules: '.*proj' }, /regex strings are not supported/],
      [{ rank_pattern: { q_proj: 4 } }, /"rank_pattern" must be empty/],
      [{ r: 4 }, /lora_A.weight has shape \[2, .*\], expected \[r=4, in\]/],
    ] as const) {
      await writeFile(cfgPath, JSON.stringify({ ...good, ...patch }));
      await assert.rejects(readAdapter(dir), (e: Error) => e.name === 'AdapterError' && (re as RegExp).test(e.message), JSON.stringify(patch));
    }
    await assert.rejects(readAdapter(join(dir, 'nope')), /nope: no adapter_config.json/);
  } finally {
    await rm(dir, { recursive: true });
  }
});
