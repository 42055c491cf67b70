// What a model family adds to the Llama decoder layer, derived from its config: the one place load, the random
// model, model-dir's expected keys, merge and plan ask which per-layer float tensors (norms) a family has.
import type { LlamaConfig, LoraTarget } from '../types.ts';
import { LORA_TARGETS } from '../types.ts';

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

/** Phi-3: q, k, v in one qkv_proj and gate, up in one gate_up_proj (PEFT targets the fused modules). */
export function hasFusedLinears(cfg: Pick<LlamaConfig, 'modelType'>): boolean {
  return cfg.modelType === 'phi3';
}

const PHI3_LINEARS: readonly LoraTarget[] = ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'];

/** The linear modules of one decoder layer of this family, in checkpoint order (what LoRA can target). */
export function linearModules(cfg: Pick<LlamaConfig, 'modelType'>): readonly LoraTarget[] {
  return hasFusedLinears(cfg) ? PHI3_LINEARS : LORA_TARGETS;
}

/** A fused linear's outputs in row order: qkv_proj = q (H·D rows), k (KV·D), v (KV·D) as modeling_phi3 slices
 *  them; gate_up_proj = gate (I) then up (I) (its chunk(2)). A plain linear is its one part. */
export function fusedParts(cfg: LlamaConfig, module: LoraTarget): number[] {
  const qDim = cfg.numAttentionHeads * cfg.headDim, kvDim = cfg.numKeyValueHeads * cfg.headDim;
  if (module === 'qkv_proj') return [qDim, kvDim, kvDim];
  if (module === 'gate_up_proj') return [cfg.intermediateSize, cfg.intermediateSize];
  return [];
}

/** The requested target modules as this family's linears, in its canonical order. "all-linear" is resolved to
 *  the seven Llama names before the model is read, so those seven together mean every linear of the family;
 *  otherwise every name must be one of the family's modules (PEFT refuses a target the model lacks). */
export function resolveTargets(cfg: Pick<LlamaConfig, 'modelType'>, requested: readonly string[]): LoraTarget[] {
  const family = linearModules(cfg);
  const want = new Set(requested);
  if (family !== LORA_TARGETS && LORA_TARGETS.every((m) => want.has(m)) && requested.every((m) => (LORA_TARGETS as readonly string[]).includes(m) || family.includes(m as LoraTarget))) {
    return [...family];
  }
  for (const m of want) {
    if (!family.includes(m as LoraTarget)) {
      throw new RangeError(`lora: target module "${m}" is not a linear layer of ${cfg.modelType} (its linears: ${family.join(', ')}; or all-linear)`);
    }
  }
  return family.filter((m) => want.has(m));
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
  phi3: 'Phi3ForCausalLM',
  gemma2: 'Gemma2ForCausalLM', gemma3_text: 'Gemma3ForCausalLM',
};
