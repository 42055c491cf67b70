// What Gemma-2 and Gemma-3 text (model_type gemma2, gemma3_text) change in the Llama decoder, from the config's
// raw keys with the defaults of transformers' Gemma2Config / Gemma3TextConfig (modeling_gemma2.py, modeling_gemma3.py):
//
//   x = embed_tokens[ids] · sqrt(hidden)  (the normalizer in the embedding's dtype: float32 here)
//   RMSNorm(x) = x / sqrt(mean(x²) + eps) · (1 + w), computed in float32
//   per layer: h = input_layernorm(x); q, k, v = proj(h); [Gemma-3: q_norm, k_norm per head]; rope (Gemma-3: local base
//     rope_local_base_freq on sliding layers, rope_theta + rope_scaling on global ones)
//     scores = q·kᵀ · query_pre_attn_scalar^-0.5; [Gemma-2: softcap·tanh(scores/softcap)]; sliding layers see the last
//     sliding_window keys; x = x + post_attention_layernorm(o_proj(attention))
//     x = x + post_feedforward_layernorm(down(gelu_tanh(gate(h2)) · up(h2))), h2 = pre_feedforward_layernorm(x)
//   logits = lm_head(norm(x)) [softcap·tanh(logits/softcap) with final_logit_softcapping]; embeddings tied by default
import type { AttentionOptions } from '../backend.ts';
import type { LlamaConfig } from '../types.ts';

export class GemmaConfigError extends Error {
  override readonly name = 'GemmaConfigError';
}

export function isGemma(cfg: Pick<LlamaConfig, 'modelType'>): boolean {
  return cfg.modelType === 'gemma2' || cfg.modelType === 'gemma3_text';
}

/** Gemma-3 normalizes q and k per head (like Qwen3, with (1 + w)) */
export function gemmaHasQkNorm(cfg: Pick<LlamaConfig, 'modelType'>): boolean {
  return cfg.modelType === 'gemma3_text';
}

export interface GemmaSpec {
  /** float32(sqrt(hidden_size)), multiplied into the embedding rows */
  embedScale: number;
  /** the attention options of each layer (scale, soft-cap, sliding window where the layer is sliding) */
  attention: AttentionOptions[];
  /** per layer: uses the local rope (Gemma-3 sliding layers) */
  localRope: boolean[];
  /** Gemma-3's rope for sliding layers (rope_local_base_freq, no scaling); null for Gemma-2 */
  localRopeConfig: Pick<LlamaConfig, 'headDim' | 'ropeTheta' | 'ropeScaling' | 'maxPositionEmbeddings'> | null;
  /** final_logit_softcapping, 0 when none */
  finalSoftcap: number;
}

/** a raw key: the value, the class default when absent, null when the config sets it to null */
function optNum(raw: Record<string, unknown>, key: string, fallback: number | null, source: string): number | null {
  const v = raw[key] === undefined ? fallback : raw[key];
  if (v === null) return null;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) throw new GemmaConfigError(`${source}: "${key}" must be a positive number or null, got ${JSON.stringify(v)}`);
  return v;
}

/** sliding or not per layer: layer_types when given, else the family's pattern */
export function gemmaSlidingLayers(cfg: LlamaConfig): boolean[] {
  const raw = cfg.raw, L = cfg.numHiddenLayers;
  if (Array.isArray(raw.layer_types)) return raw.layer_types.map((t) => t === 'sliding_attention');
  // Gemma-2: every other layer, starting with layer 0; Gemma-3: all but every sliding_window_pattern-th
  const pattern = cfg.modelType === 'gemma2' ? 2 : (typeof raw.sliding_window_pattern === 'number' ? raw.sliding_window_pattern : 6);
  return Array.from({ length: L }, (_, i) => (i + 1) % pattern !== 0);
}

export function gemmaSpec(cfg: LlamaConfig, source = 'config.json'): GemmaSpec {
  const raw = cfg.raw;
  const g2 = cfg.modelType === 'gemma2';
  const qpas = optNum(raw, 'query_pre_attn_scalar', 256, source) ?? 256;
  const attnCap = optNum(raw, 'attn_logit_softcapping', g2 ? 50 : null, source);
  const finalCap = optNum(raw, 'final_logit_softcapping', g2 ? 30 : null, source);
  const window = optNum(raw, 'sliding_window', 4096, source);
  if (window !== null && !Number.isSafeInteger(window)) throw new GemmaConfigError(`${source}: "sliding_window" must be an integer, got ${window}`);
  const sliding = gemmaSlidingLayers(cfg);
  const scale = qpas ** -0.5;
  const attention = sliding.map((s): AttentionOptions => ({ scale, softcap: attnCap ?? 0, window: s && window !== null ? window : 0 }));
  let localRopeConfig: GemmaSpec['localRopeConfig'] = null;
  if (!g2) {
    let base = optNum(raw, 'rope_local_base_freq', 10000, source) ?? 10000;
    const rp = raw.rope_parameters as Record<string, unknown> | null | undefined;
    const local = rp && typeof rp === 'object' ? rp.sliding_attention as Record<string, unknown> | undefined : undefined;
    if (local && typeof local === 'object') {
      if ((local.rope_type ?? 'default') !== 'default') {
        throw new GemmaConfigError(`${source}: "rope_parameters.sliding_attention.rope_type" ${JSON.stringify(local.rope_type)} is not supported (Gemma-3's local rope is "default")`);
      }
      if (typeof local.rope_theta === 'number') base = local.rope_theta;
    }
    localRopeConfig = { headDim: cfg.headDim, ropeTheta: base, ropeScaling: null, maxPositionEmbeddings: cfg.maxPositionEmbeddings };
  }
  return {
    embedScale: Math.fround(Math.sqrt(cfg.hiddenSize)),
    attention,
    localRope: sliding.map((s) => s && !g2),
    localRopeConfig,
    finalSoftcap: finalCap ?? 0,
  };
}

/** Gemma's RMSNorm weight as the plain one the rmsnorm op multiplies by: float32(1 + w), as HF computes it */
export function plusOne(w: Float32Array): Float32Array {
  const out = new Float32Array(w.length);
  for (let i = 0; i < w.length; i++) out[i] = 1 + w[i];
  return out;
}
