// No silent misloading: quantized checkpoints other than bitsandbytes NF4 are refused with one line naming the
// form, the file or tensor, and what to do; checkpoint tensors the model never reads are reported as transformers
// does; full-precision and bitsandbytes NF4 checkpoints still load.
// The fixtures are tiny (1 layer, hidden 64) but format-faithful: the tensor names, dtypes and shapes each tool
// writes (bitsandbytes Linear8bitLt/Linear4bit state dicts, AutoGPTQ/AutoAWQ packed int32, transformers' FP8 and
// llm-compressor's compressed-tensors FP8) and the quantization_config each writes into config.json, built with
// the project's own safetensors writer.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import type { TensorData } from '../engine/formats/safetensors/write.ts';
import { parseLlamaConfig, readConfig } from '../engine/formats/config.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { bnbTensors, bnbQuantizationConfig } from '../engine/formats/bnb.ts';
import { quantizeNF4 } from '../engine/formats/nf4.ts';
import { UnsupportedQuantizationError } from '../engine/formats/quant-config.ts';
import { quantizeModelDir } from '../engine/tasks/quantize.ts';
import { mergeAdapter } from '../engine/tasks/merge.ts';
import { planReport } from '../engine/tasks/plan.ts';
import { Rng } from '../engine/model/rng.ts';

const C = 64, I = 128, V = 32, H = 4, KV = 2, D = 16, GROUP = 32;
const LINEARS: Array<[string, number, number]> = [
  ['self_attn.q_proj', H * D, C], ['self_attn.k_proj', KV * D, C], ['self_attn.v_proj', KV * D, C], ['self_attn.o_proj', C, H * D],
  ['mlp.gate_proj', I, C], ['mlp.up_proj', I, C], ['mlp.down_proj', C, I],
];
const BASE_CONFIG = {
  architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: C, intermediate_size: I, num_hidden_layers: 1,
  num_attention_heads: H, num_key_value_heads: KV, vocab_size: V, rms_norm_eps: 1e-5, rope_theta: 10000.0,
  max_position_embeddings: 64, tie_word_embeddings: false, bos_token_id: 1, eos_token_id: 2,
};

/** quantization_config as each library writes it into config.json (to_dict of its transformers config class). */
const QCONFIG = {
  bnb8: {
    _load_in_4bit: false, _load_in_8bit: true, bnb_4bit_compute_dtype: 'float32', bnb_4bit_quant_storage: 'uint8', bnb_4bit_quant_type: 'fp4',
    bnb_4bit_use_double_quant: false, llm_int8_enable_fp32_cpu_offload: false, llm_int8_has_fp16_weight: false, llm_int8_skip_modules: null,
    llm_int8_threshold: 6.0, load_in_4bit: false, load_in_8bit: true, quant_method: 'bitsandbytes',
  },
  fp4: { ...bnbQuantizationConfig({ doubleQuant: true }), bnb_4bit_quant_type: 'fp4' },
  gptq: {
    bits: 4, checkpoint_format: 'gptq', damp_percent: 0.01, desc_act: false, group_size: GROUP, model_file_base_name: null,
    model_name_or_path: null, quant_method: 'gptq', static_groups: false, sym: true, true_sequential: true,
  },
  awq: { bits: 4, group_size: GROUP, modules_to_not_convert: null, quant_method: 'awq', version: 'gemm', zero_point: true },
  fp8: { activation_scheme: 'dynamic', modules_to_not_convert: null, quant_method: 'fp8', weight_block_size: [128, 128] },
  'compressed-tensors': {
    config_groups: {
      group_0: {
        input_activations: { actorder: null, block_structure: null, dynamic: true, group_size: null, num_bits: 8, observer: null, observer_kwargs: {}, strategy: 'token', symmetric: true, type: 'float' },
        output_activations: null, targets: ['Linear'],
        weights: { actorder: null, block_structure: null, dynamic: false, group_size: null, num_bits: 8, observer: 'minmax', observer_kwargs: {}, strategy: 'channel', symmetric: true, type: 'float' },
      },
    },
    format: 'float-quantized', global_compression_ratio: null, ignore: ['lm_head'], kv_cache_scheme: null,
    quant_method: 'compressed-tensors', quantization_status: 'compressed',
  },
  hqq: { quant_method: 'hqq', quant_config: { quant_config: { weight_quant_params: { axis: 1, channel_wise: true, group_size: 64, nbits: 4, optimize: true, round_zero: true, view_as_float: false } } }, skip_modules: ['lm_head'] },
  eetq: { modules_to_not_convert: ['lm_head'], quant_method: 'eetq', weights: 'int8' },
  torchao: { include_input_output_embeddings: false, modules_to_not_convert: null, quant_method: 'torchao', quant_type: { default: { _data: { group_size: 128 }, _type: 'Int4WeightOnlyConfig', _version: 1 } }, untie_embedding_weights: false },
} as const;
type Form = keyof typeof QCONFIG;

const rng = new Rng(13);
const floats = (n: number, std = 0.05) => rng.fillNormal(new Float32Array(n), 0, std);
const bytes = (n: number) => Uint8Array.from({ length: n }, () => rng.nextU32() & 0x7e); // no F8 NaN/Inf patterns
const int32 = (n: number) => new Uint8Array(Int32Array.from({ length: n }, () => rng.nextU32() | 0).buffer);

/** The full-precision tensors (embeddings, norms, lm_head) every form keeps, in `dtype`. */
function fullPrecision(dtype: 'BF16' | 'F16' | 'F32'): TensorData[] {
  return [
    { name: 'model.embed_tokens.weight', dtype, shape: [V, C], data: floats(V * C) },
    { name: 'model.layers.0.input_layernorm.weight', dtype, shape: [C], data: new Float32Array(C).fill(1) },
    { name: 'model.layers.0.post_attention_layernorm.weight', dtype, shape: [C], data: new Float32Array(C).fill(1) },
    { name: 'model.norm.weight', dtype, shape: [C], data: new Float32Array(C).fill(1) },
    { name: 'lm_head.weight', dtype, shape: [V, C], data: floats(V * C) },
  ];
}

/** The linear layers as `form` stores them. */
function linears(form: Form | 'bf16' | 'f32'): TensorData[] {
  const out: TensorData[] = [];
  for (const [m, rows, cols] of LINEARS) {
    const w = `model.layers.0.${m}.weight`, p = `model.layers.0.${m}`;
    switch (form) {
      case 'bf16': case 'f32': out.push({ name: w, dtype: form === 'bf16' ? 'BF16' : 'F32', shape: [rows, cols], data: floats(rows * cols) }); break;
      case 'bnb8': // Linear8bitLt: int8 CB as .weight, float32 row scales SCB, weight_format 0 ("row") as a uint8 scalar
        out.push({ name: w, dtype: 'I8', shape: [rows, cols], data: bytes(rows * cols) },
          { name: `${p}.SCB`, dtype: 'F32', shape: [rows], data: floats(rows) },
          { name: `${p}.weight_format`, dtype: 'U8', shape: [], data: new Uint8Array([0]) });
        break;
      case 'fp4': { // Linear4bit with quant_type fp4: same parts as NF4, FP4 code table, quant_state ...__fp4
        const fp4 = [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3].map((x) => x / 12);
        for (const t of bnbTensors(w, quantizeNF4(floats(rows * cols), rows, cols))) {
          if (t.name.endsWith('.quant_state.bitsandbytes__nf4')) {
            const js = new TextEncoder().encode(new TextDecoder().decode(t.data).replace('"nf4"', '"fp4"'));
            out.push({ name: t.name.replace(/nf4$/, 'fp4'), dtype: 'U8', shape: [js.length], data: js });
          } else if (t.name.endsWith('.quant_map')) out.push({ ...t, data: Float32Array.from(fp4) });
          else out.push(t);
        }
        break;
      }
      case 'gptq': // AutoGPTQ: qweight [in/8, out], qzeros [in/g, out/8] int32, scales [in/g, out] fp16, g_idx [in]
        out.push({ name: `${p}.qweight`, dtype: 'I32', shape: [cols / 8, rows], data: int32(cols / 8 * rows) },
          { name: `${p}.qzeros`, dtype: 'I32', shape: [cols / GROUP, rows / 8], data: int32(cols / GROUP * rows / 8) },
          { name: `${p}.scales`, dtype: 'F16', shape: [cols / GROUP, rows], data: floats(cols / GROUP * rows) },
          { name: `${p}.g_idx`, dtype: 'I32', shape: [cols], data: new Uint8Array(Int32Array.from({ length: cols }, (_, i) => Math.floor(i / GROUP)).buffer) });
        break;
      case 'awq': // AutoAWQ GEMM: qweight [in, out/8], qzeros [in/g, out/8] int32, scales [in/g, out] fp16
        out.push({ name: `${p}.qweight`, dtype: 'I32', shape: [cols, rows / 8], data: int32(cols * rows / 8) },
          { name: `${p}.qzeros`, dtype: 'I32', shape: [cols / GROUP, rows / 8], data: int32(cols / GROUP * rows / 8) },
          { name: `${p}.scales`, dtype: 'F16', shape: [cols / GROUP, rows], data: floats(cols / GROUP * rows) });
        break;
      case 'fp8': // transformers FineGrainedFP8 / DeepSeek-V3: F8_E4M3 weight, float32 scale_inv per 128×128 block
        out.push({ name: w, dtype: 'F8_E4M3', shape: [rows, cols], data: bytes(rows * cols) },
          { name: `${w}_scale_inv`, dtype: 'F32', shape: [Math.ceil(rows / 128), Math.ceil(cols / 128)], data: floats(Math.ceil(rows / 128) * Math.ceil(cols / 128)) });
        break;
      case 'compressed-tensors': // llm-compressor FP8_DYNAMIC: F8_E4M3 weight, per-channel bf16 weight_scale [out, 1]
        out.push({ name: w, dtype: 'F8_E4M3', shape: [rows, cols], data: bytes(rows * cols) },
          { name: `${w}_scale`, dtype: 'BF16', shape: [rows, 1], data: floats(rows) });
        break;
      default: // config-only forms: the weights' layout does not matter to the refusal
        out.push({ name: w, dtype: 'BF16', shape: [rows, cols], data: floats(rows * cols) });
    }
  }
  return out;
}

async function writeModel(dir: string, tensors: TensorData[], config: Record<string, unknown>): Promise<string> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  await writeSafetensors(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  return dir;
}

async function writeForm(dir: string, form: Form, withConfig = true): Promise<string> {
  const fp = form === 'fp8' || form === 'compressed-tensors' || form === 'fp4' ? 'BF16' : 'F16';
  const config: Record<string, unknown> = { ...BASE_CONFIG, torch_dtype: fp === 'BF16' ? 'bfloat16' : 'float16' };
  if (withConfig) config.quantization_config = QCONFIG[form];
  return writeModel(dir, [...fullPrecision(fp), ...linears(form)], config);
}

/** An assert.rejects/throws validator: UnsupportedQuantizationError, one line, matching every pattern. */
function refused(...patterns: RegExp[]): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof UnsupportedQuantizationError, `expected UnsupportedQuantizationError, got ${(e as Error)?.name}: ${(e as Error)?.message}`);
    assert.ok(!e.message.includes('\n'), `message is not one line: ${e.message}`);
    for (const p of patterns) assert.match(e.message, p);
    return true;
  };
}

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'quantized-test-'));
  try { await fn(dir); } finally { await rm(dir, { recursive: true, force: true }); }
}

const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
const DEQUANT = /dequantize|use the bf16\/fp16/;

test('each quantized form with its config.json quantization_config is refused in one line naming the form and the file', async () => {
  await withTmp(async (root) => {
    const expect: Array<[Form, RegExp]> = [
      ['bnb8', /bitsandbytes 8-bit \(LLM\.int8, load_in_8bit\).*model\.dequantize\(\)/],
      ['fp4', /bitsandbytes 4-bit "fp4" \(bnb_4bit_quant_type; only "nf4" is supported\).*model\.dequantize\(\)/],
      ['gptq', /GPTQ 4-bit \(quant_method "gptq"\).*use the bf16\/fp16 model it was quantized from/],
      ['awq', /AWQ 4-bit \(quant_method "awq"\).*use the bf16\/fp16 model it was quantized from/],
      ['fp8', /FP8 \(quant_method "fp8"\).*dequantize it to bf16 first/],
      ['compressed-tensors', /compressed-tensors \(llm-compressor\) \(quant_method "compressed-tensors"\)/],
      ['hqq', /HQQ \(quant_method "hqq"\)/],
      ['eetq', /EETQ int8 \(quant_method "eetq"\)/],
      ['torchao', /torchao \(quant_method "torchao"\)/],
    ];
    for (const [form, re] of expect) {
      const dir = await writeForm(join(root, form), form);
      const cfg = esc(join(dir, 'config.json'));
      const check = refused(new RegExp(`^${cfg}: quantization_config is `), re, /swarmtune loads only full-precision \(BF16\/F16\/F32\) or bitsandbytes NF4 checkpoints/, DEQUANT);
      await assert.rejects(openModelDir(dir), check, form);
      await assert.rejects(readConfig(dir), check, form);
    }
  });
});

test('quantization_config variants: bnb without a quant type is FP4, non-uint8 storage, unknown methods, malformed', () => {
  const cfg = (qc: unknown) => ({ ...BASE_CONFIG, quantization_config: qc });
  const nf4 = bnbQuantizationConfig({ doubleQuant: true });
  assert.doesNotThrow(() => parseLlamaConfig(cfg(nf4), 'm/config.json'));
  assert.doesNotThrow(() => parseLlamaConfig(cfg(null), 'm/config.json'));
  // transformers' BitsAndBytesConfig defaults bnb_4bit_quant_type to "fp4"
  const { bnb_4bit_quant_type: _, ...noType } = nf4;
  assert.throws(() => parseLlamaConfig(cfg(noType), 'm/config.json'), refused(/^m\/config\.json: quantization_config is bitsandbytes 4-bit "fp4"/));
  // configs from before quant_method existed
  assert.throws(() => parseLlamaConfig(cfg({ load_in_8bit: true, llm_int8_threshold: 6.0 }), 'm/config.json'), refused(/bitsandbytes 8-bit \(LLM\.int8/));
  assert.doesNotThrow(() => parseLlamaConfig(cfg({ load_in_4bit: true, bnb_4bit_quant_type: 'nf4' }), 'm/config.json'));
  assert.throws(() => parseLlamaConfig(cfg({ ...nf4, bnb_4bit_quant_storage: 'bfloat16' }), 'm/config.json'),
    refused(/bitsandbytes NF4 packed into "bfloat16" tensors \(bnb_4bit_quant_storage; only "uint8" is supported\)/));
  assert.throws(() => parseLlamaConfig(cfg({ quant_method: 'bitsandbytes', load_in_4bit: false, load_in_8bit: false }), 'm/config.json'),
    refused(/neither load_in_4bit nor load_in_8bit/));
  assert.throws(() => parseLlamaConfig(cfg({ quant_method: 'fancy_new_method', bits: 3 }), 'm/config.json'), refused(/quantization_config is quant_method "fancy_new_method"; /, DEQUANT));
  assert.throws(() => parseLlamaConfig(cfg({ bits: 4 }), 'm/config.json'), refused(/"quantization_config" has no quant_method \(\["bits"\]\)/));
  assert.throws(() => parseLlamaConfig(cfg('gptq'), 'm/config.json'), refused(/"quantization_config" must be an object/));
});

test('GPTQ quantize_config.json and AutoAWQ quant_config.json beside a config.json without quantization_config are refused', async () => {
  await withTmp(async (root) => {
    const gptq = await writeForm(join(root, 'gptq'), 'gptq', false);
    // AutoGPTQ's quantize_config.json (no quant_method in older releases)
    await writeFile(join(gptq, 'quantize_config.json'), JSON.stringify({ bits: 4, group_size: GROUP, damp_percent: 0.01, desc_act: false, static_groups: false, sym: true, true_sequential: true, model_name_or_path: null, model_file_base_name: 'model' }));
    const check = refused(new RegExp(`^${esc(join(gptq, 'quantize_config.json'))}: this checkpoint is GPTQ 4-bit \\(quantize_config\\.json is present\\)`), DEQUANT);
    await assert.rejects(openModelDir(gptq), check);
    await assert.rejects(quantizeModelDir(gptq, join(root, 'gptq-nf4')), check);
    assert.equal(existsSync(join(root, 'gptq-nf4')), false, 'quantize wrote an output dir for a refused checkpoint');
    const awq = await writeForm(join(root, 'awq'), 'awq', false);
    await writeFile(join(awq, 'quant_config.json'), JSON.stringify({ zero_point: true, q_group_size: GROUP, w_bit: 4, version: 'GEMM' }));
    await assert.rejects(openModelDir(awq), refused(new RegExp(`^${esc(join(awq, 'quant_config.json'))}: this checkpoint is AWQ 4-bit \\(quant_config\\.json is present\\)`)));
  });
});

test('without any quantization config, the tensors of each form are refused by name', async () => {
  await withTmp(async (root) => {
    const expect: Array<[Form, string, RegExp]> = [
      ['bnb8', 'model.layers.0.mlp.down_proj.SCB', /is of the bitsandbytes 8-bit \(LLM\.int8: int8 weight \+ SCB row scales\) format/],
      ['fp4', 'model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__fp4', /is of the bitsandbytes 4-bit FP4 \(only NF4 is supported\) format/],
      ['gptq', 'model.layers.0.mlp.down_proj.g_idx', /is of the GPTQ\/AWQ \(int32-packed qweight\/qzeros with scales\) format/],
      ['awq', 'model.layers.0.mlp.down_proj.qweight', /is of the GPTQ\/AWQ/],
      ['fp8', 'model.layers.0.mlp.down_proj.weight_scale_inv', /is of the FP8 \(F8_E4M3 weight with block weight_scale_inv\) format/],
      ['compressed-tensors', 'model.layers.0.mlp.down_proj.weight_scale', /is of the FP8\/int8 compressed-tensors/],
    ];
    for (const [form, tensor, re] of expect) {
      const dir = await writeForm(join(root, form), form, false);
      // names are checked in the checkpoint's (sorted) order: down_proj is the first module of each form
      await assert.rejects(openModelDir(dir), refused(new RegExp(`^${esc(dir)}: tensor ${esc(tensor)} `), re, DEQUANT), form);
    }
  });
});

test('a model weight stored as codes (I8, U8, I32, F8_E4M3, F8_E5M2) is refused naming the tensor and its dtype', async () => {
  await withTmp(async (root) => {
    const cases: Array<[string, TensorData, RegExp]> = [
      ['i8', { name: 'model.layers.0.self_attn.q_proj.weight', dtype: 'I8', shape: [H * D, C], data: bytes(H * D * C) }, /int8 codes/],
      ['u8', { name: 'model.layers.0.mlp.up_proj.weight', dtype: 'U8', shape: [I, C], data: bytes(I * C) }, /uint8 codes \(a quantized weight without its quantization state\?\)/],
      ['i32', { name: 'model.layers.0.mlp.gate_proj.weight', dtype: 'I32', shape: [I / 8, C], data: int32(I / 8 * C) }, /int32 words/],
      ['e4m3', { name: 'model.embed_tokens.weight', dtype: 'F8_E4M3', shape: [V, C], data: bytes(V * C) }, /FP8 values, which mean nothing without their scale tensors/],
      ['e5m2', { name: 'model.layers.0.self_attn.o_proj.weight', dtype: 'F8_E5M2', shape: [C, H * D], data: bytes(C * H * D) }, /FP8 values/],
      ['bias', { name: 'model.layers.0.self_attn.q_proj.bias', dtype: 'I8', shape: [H * D], data: bytes(H * D) }, /int8 codes/],
    ];
    for (const [tag, bad, re] of cases) {
      const tensors = [...fullPrecision('BF16'), ...linears('bf16')].filter((t) => t.name !== bad.name);
      const dir = await writeModel(join(root, tag), [...tensors, bad], { ...BASE_CONFIG, torch_dtype: 'bfloat16' });
      await assert.rejects(openModelDir(dir), refused(new RegExp(`^${esc(dir)}: tensor ${esc(bad.name)} has dtype ${bad.dtype}: `), re, DEQUANT), tag);
    }
  });
});

test('checkpoint tensors the model never reads are reported in one line, as transformers does', async () => {
  await withTmp(async (root) => {
    const extra: TensorData[] = [
      { name: 'model.vision_tower.proj.weight', dtype: 'BF16', shape: [4, C], data: floats(4 * C) },
      { name: 'lm_head.bias', dtype: 'BF16', shape: [V], data: floats(V) },
      // a non-persistent buffer older exports wrote: transformers ignores it, so do we
      { name: 'model.layers.0.self_attn.rotary_emb.inv_freq', dtype: 'F32', shape: [D / 2], data: floats(D / 2) },
      // not part of this 1-layer model
      { name: 'model.layers.1.input_layernorm.weight', dtype: 'BF16', shape: [C], data: floats(C) },
    ];
    const dir = await writeModel(join(root, 'extra'), [...fullPrecision('BF16'), ...linears('bf16'), ...extra], { ...BASE_CONFIG, torch_dtype: 'bfloat16' });
    const lines: string[] = [];
    const md = await openModelDir(dir, { warn: (l) => lines.push(l) });
    try {
      assert.deepEqual(lines, [`Some weights of the model checkpoint at ${dir} were not used when initializing LlamaForCausalLM: ['lm_head.bias', 'model.layers.1.input_layernorm.weight', 'model.vision_tower.proj.weight']`]);
      assert.deepEqual(md.unusedTensors, ['lm_head.bias', 'model.layers.1.input_layernorm.weight', 'model.vision_tower.proj.weight']);
      assert.equal((await md.weights.getFloat('model.norm.weight')).length, C, 'the checkpoint still loads');
    } finally {
      await md.close();
    }
    // a long list stops after 20 names and says how many more
    const many = Array.from({ length: 25 }, (_, i): TensorData => ({ name: `model.extra.${String(i).padStart(2, '0')}.weight`, dtype: 'BF16', shape: [C], data: floats(C) }));
    const manyDir = await writeModel(join(root, 'many'), [...fullPrecision('BF16'), ...linears('bf16'), ...many], { ...BASE_CONFIG, torch_dtype: 'bfloat16' });
    const manyLines: string[] = [];
    await (await openModelDir(manyDir, { warn: (l) => manyLines.push(l) })).close();
    assert.equal(manyLines.length, 1);
    assert.ok(manyLines[0].endsWith(`'model.extra.18.weight', 'model.extra.19.weight', ... (5 more)]`), manyLines[0]);
    // without a callback the line goes to stderr with a "warning: " prefix
    const child = spawnSync(process.execPath, ['--input-type=module', '-e',
      `const { openModelDir } = await import(${JSON.stringify(new URL('../engine/formats/model-dir.ts', import.meta.url).href)}); await (await openModelDir(${JSON.stringify(dir)})).close();`], { encoding: 'utf8' });
    assert.equal(child.status, 0, child.stderr);
    assert.equal(child.stderr, `warning: ${lines[0]}\n`);
  });
});

test('supported checkpoints still load without a warning: bf16, fp32, tied embeddings, bitsandbytes NF4 (with and without double quant)', async () => {
  await withTmp(async (root) => {
    const bf16 = await writeModel(join(root, 'bf16'), [...fullPrecision('BF16'), ...linears('bf16')], { ...BASE_CONFIG, torch_dtype: 'bfloat16' });
    const f32 = await writeModel(join(root, 'f32'), [...fullPrecision('F32'), ...linears('f32')], { ...BASE_CONFIG, torch_dtype: 'float32' });
    // tie_word_embeddings with an lm_head.weight in the file: transformers ties it and reports nothing
    const tied = await writeModel(join(root, 'tied'), [...fullPrecision('BF16'), ...linears('bf16')], { ...BASE_CONFIG, tie_word_embeddings: true });
    await quantizeModelDir(bf16, join(root, 'nf4'));
    await quantizeModelDir(bf16, join(root, 'nf4-plain'), { doubleQuant: false });
    for (const [dir, prequantized] of [[bf16, false], [f32, false], [tied, false], [join(root, 'nf4'), true], [join(root, 'nf4-plain'), true]] as const) {
      const lines: string[] = [];
      const md = await openModelDir(dir, { warn: (l) => lines.push(l) });
      try {
        assert.deepEqual(lines, [], dir);
        assert.equal(md.prequantized, prequantized, dir);
        const W = await md.weights.getNF4('model.layers.0.mlp.down_proj.weight');
        assert.deepEqual([W.rows, W.cols], [C, I]);
        assert.equal((await md.weights.getFloat('model.embed_tokens.weight')).length, V * C);
        if (prequantized) {
          const cfg = md.config.raw.quantization_config as Record<string, unknown>;
          assert.equal(cfg.bnb_4bit_quant_type, 'nf4');
        }
      } finally {
        await md.close();
      }
    }
  });
});

test('plan, quantize and merge refuse a GPTQ checkpoint and write nothing', async () => {
  await withTmp(async (root) => {
    const dir = await writeForm(join(root, 'gptq'), 'gptq');
    const check = refused(/config\.json: quantization_config is GPTQ 4-bit/);
    await assert.rejects(planReport({ model: dir }), check);
    await assert.rejects(quantizeModelDir(dir, join(root, 'q')), check);
    await assert.rejects(mergeAdapter({ model: dir, adapter: join(root, 'adapter'), out: join(root, 'merged') }), check);
    assert.equal(existsSync(join(root, 'q')), false);
    assert.equal(existsSync(join(root, 'merged')), false);
  });
});

test('swarmtune train on a GPTQ checkpoint: one clean line, exit 2 (bad input), no output dir', async () => {
  await withTmp(async (root) => {
    const dir = await writeForm(join(root, 'gptq'), 'gptq');
    const data = join(root, 'data.jsonl');
    await writeFile(data, '{"text": "hello"}\n');
    const out = join(root, 'out');
    const bin = new URL('../bin/swarmtune.ts', import.meta.url).pathname;
    const r = spawnSync(process.execPath, [bin, 'train', '--model', dir, '--data', data, '--output-dir', out, '--max-steps', '1'],
      { encoding: 'utf8', env: { ...process.env, SWARMTUNE_NO_CUDA: '1' } });
    assert.equal(r.status, 2, `exit ${r.status}; stderr: ${r.stderr}`);
    assert.equal(r.stdout, '');
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    assert.equal(lines.length, 1, `expected one line on stderr, got:\n${r.stderr}`);
    assert.match(lines[0], new RegExp(`^swarmtune train: ${esc(join(dir, 'config.json'))}: quantization_config is GPTQ 4-bit \\(quant_method "gptq"\\); swarmtune loads only full-precision \\(BF16/F16/F32\\) or bitsandbytes NF4 checkpoints — use the bf16/fp16 model it was quantized from`));
    assert.equal(existsSync(out), false, 'train wrote its output dir for a refused checkpoint');
  });
});
