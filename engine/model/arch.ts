// What a model family adds to the Llama decoder layer, derived from its config: the one place load, the random
// model, model-dir's expected keys, merge and plan ask which per-layer float tensors (norms) a family has.
import type { LlamaConfig } from '../types.ts';

/** A per-layer full-precision tensor (a norm weight) by its HF name suffix under model.layers.N. */
export interface LayerFloatTensor {
  /** e.g. "input_layernorm" or "self_attn.q_norm" (the key is model.layers.N.<suffix>.weight) */
  suffix: string;
  length: number;
}

/** Qwen3 (and Gemma-3, with (1 + w)): RMSNorm over each head's head_dim on q and k, after the projection and before RoPE. */
export function hasQkNorm(cfg: Pick<LlamaConfig, 'modelType'>): boolean {
  return cfg.modelType === 'qwen3' || cfg.modelType === 'gemma3_text';
}

/** Gemma-2/3: a norm after attention and one before and after the MLP (4 per layer) */
export function hasGemmaNorms(cfg: Pick<LlamaConfig, 'modelType'>): boolean {
  return cfg.modelType === 'gemma2' || cfg.modelType === 'gemma3_text';
}

/** The norm weights of one decoder layer, in the order the checkpoints list them. */
export function layerFloatTensors(cfg: LlamaConfig): LayerFloatTensor[] {
  const C = cfg.hiddenSize, D = cfg.headDim;
  const out: LayerFloatTensor[] = [
    { suffix: 'input_layernorm', length: C },
    { suffix: 'post_attention_layernorm', length: C },
  ];
  if (hasGemmaNorms(cfg)) out.push({ suffix: 'pre_feedforward_layernorm', length: C }, { suffix: 'post_feedforward_layernorm', length: C });
  if (hasQkNorm(cfg)) out.push({ suffix: 'self_attn.q_norm', length: D }, { suffix: 'self_attn.k_norm', length: D });
  return out;
}

/** HF key of a layer float tensor */
export function layerFloatName(layer: number, t: LayerFloatTensor): string {
  return `model.layers.${layer}.${t.suffix}.weight`;
}

/** transformers' CausalLM class of a model type (what a warning names when config.json lists no architectures). */
export const MODEL_CLASS: Readonly<Record<string, string>> = {
  llama: 'LlamaForCausalLM', mistral: 'MistralForCausalLM', qwen2: 'Qwen2ForCausalLM', qwen3: 'Qwen3ForCausalLM',
  gemma2: 'Gemma2ForCausalLM', gemma3_text: 'Gemma3ForCausalLM',
};
