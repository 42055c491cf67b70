// Hugging Face config.json → LlamaConfig (Llama 2/3/3.1/3.2, TinyLlama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3 text), and writing config.json back.
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { LlamaConfig } from '../types.ts';
import { gemmaSpec } from '../model/gemma.ts';
import { pyJsonDumps } from './pyjson.ts';
import { checkQuantizationConfig, checkQuantConfigFiles } from './quant-config.ts';

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

const SUPPORTED_MODEL_TYPES = new Set(['llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'gemma2', 'gemma3_text']);
const GEMMA_TYPES = new Set(['gemma2', 'gemma3_text']);

/** Families transformers has that this engine does not implement yet, with what differs (so the refusal says why). */
const REFUSED_MODEL_TYPES: Record<string, string> = {
  gemma: 'Gemma', gemma3: 'Gemma-3 (multimodal)',
};
const SUPPORTED_ROPE_TYPES = new Set(['default', 'llama3', 'linear', 'dynamic', 'longrope']);

/** Per-architecture defaults of transformers' config classes, used when a key is absent. */
const DEFAULTS: Record<string, { rmsNormEps: number; ropeTheta: number; maxPositionEmbeddings: number; tieWordEmbeddings: boolean }> = {
  llama: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 2048, tieWordEmbeddings: false },
  mistral: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 4096 * 32, tieWordEmbeddings: false },
  qwen2: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 32768, tieWordEmbeddings: false },
  qwen3: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 32768, tieWordEmbeddings: false },
  phi3: { rmsNormEps: 1e-5, ropeTheta: 10000, maxPositionEmbeddings: 4096, tieWordEmbeddings: false },
  gemma2: { rmsNormEps: 1e-6, ropeTheta: 10000, maxPositionEmbeddings: 8192, tieWordEmbeddings: true },
  gemma3_text: { rmsNormEps: 1e-6, ropeTheta: 1_000_000, maxPositionEmbeddings: 131072, tieWordEmbeddings: true },
};

/** Parse and validate an HF config.json object. `source` (a path) prefixes every error message. */
export function parseLlamaConfig(json: unknown, source = 'config.json'): LlamaConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new ConfigError(`${source}: config must be a JSON object`);
  const raw = json as Record<string, unknown>;
  // a quantized checkpoint's codes would otherwise be read as weights: refuse every form but bitsandbytes NF4
  checkQuantizationConfig(raw.quantization_config, source);
  const bad = (key: string, want: string, got: unknown = raw[key]): never => {
    throw new ConfigError(`${source}: "${key}" must be ${want}, got ${JSON.stringify(got)}`);
  };
  const posInt = (key: string, fallback?: number): number => {
    const v = raw[key] ?? fallback;
    if (v === undefined) throw new ConfigError(`${source}: missing required key "${key}"`);
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) bad(key, 'a positive integer', v);
    return v as number;
  };
  const posNum = (key: string, fallback: number, obj: Record<string, unknown> = raw, where = key): number => {
    const v = obj[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) bad(where, 'a positive finite number', v);
    return v as number;
  };
  const bool = (key: string, fallback: boolean): boolean => {
    const v = raw[key] ?? fallback;
    if (typeof v !== 'boolean') bad(key, 'true or false', v);
    return v as boolean;
  };
  const optId = (key: string): number | null => {
    const v = raw[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) bad(key, 'a token id (non-negative integer) or null', v);
    return v as number;
  };

  const modelType = raw.model_type;
  if (typeof modelType !== 'string') throw new ConfigError(`${source}: missing "model_type" (expected one of ${[...SUPPORTED_MODEL_TYPES].join(', ')})`);
  if (REFUSED_MODEL_TYPES[modelType] !== undefined) {
    throw new ConfigError(`${source}: "model_type" ${JSON.stringify(modelType)} (${REFUSED_MODEL_TYPES[modelType]}) is not supported yet (supported: ${[...SUPPORTED_MODEL_TYPES].join(', ')})`);
  }
  if (!SUPPORTED_MODEL_TYPES.has(modelType)) {
    throw new ConfigError(`${source}: "model_type" ${JSON.stringify(modelType)} is not supported (expected one of ${[...SUPPORTED_MODEL_TYPES].join(', ')})`);
  }
  const d = DEFAULTS[modelType];

  const gemma = GEMMA_TYPES.has(modelType);
  if (gemma) {
    // Gemma's MLP reads hidden_activation (GeGLU); its configs also carry hidden_act, which modeling ignores
    const act = raw.hidden_activation ?? 'gelu_pytorch_tanh';
    if (act !== 'gelu_pytorch_tanh') bad('hidden_activation', '"gelu_pytorch_tanh" (GeGLU with the tanh GELU)', act);
  } else {
    const hiddenAct = raw.hidden_act ?? 'silu';
    if (hiddenAct !== 'silu') bad('hidden_act', '"silu" (SwiGLU MLP)', hiddenAct);
  }

  const vocabSize = posInt('vocab_size');
  const hiddenSize = posInt('hidden_size');
  const intermediateSize = posInt('intermediate_size');
  const numHiddenLayers = posInt('num_hidden_layers');
  const numAttentionHeads = posInt('num_attention_heads');
  const numKeyValueHeads = posInt('num_key_value_heads', numAttentionHeads);
  if (numAttentionHeads % numKeyValueHeads !== 0) {
    throw new ConfigError(`${source}: "num_key_value_heads" (${numKeyValueHeads}) must divide "num_attention_heads" (${numAttentionHeads}) for grouped-query attention`);
  }
  let headDim: number;
  if (raw.head_dim !== undefined && raw.head_dim !== null) {
    headDim = posInt('head_dim');
  } else if (modelType === 'qwen3') {
    headDim = 128; // Qwen3Config's default: head_dim is explicit, not hidden_size / heads
  } else if (gemma) {
    headDim = 256; // Gemma2Config / Gemma3TextConfig default
  } else {
    if (hiddenSize % numAttentionHeads !== 0) {
      throw new ConfigError(`${source}: "hidden_size" (${hiddenSize}) is not divisible by "num_attention_heads" (${numAttentionHeads}) and no "head_dim" is given`);
    }
    headDim = hiddenSize / numAttentionHeads;
  }
  if (headDim % 2 !== 0) bad('head_dim', 'even (rotary embedding pairs halves)', headDim);

  const rmsNormEps = posNum('rms_norm_eps', d.rmsNormEps);
  const maxPositionEmbeddings = posInt('max_position_embeddings', d.maxPositionEmbeddings);
  const tieWordEmbeddings = bool('tie_word_embeddings', d.tieWordEmbeddings);
  // Qwen2 always has q/k/v biases and no attention_bias key; Llama's (and Qwen3's) attention_bias also biases o_proj.
  const attentionBias = modelType === 'qwen2' ? true : bool('attention_bias', false);
  const mlpBias = bool('mlp_bias', false);

  if (modelType === 'phi3') checkPhi3(raw, source);

  // Sliding-window attention: Qwen2 only applies it when use_sliding_window is true (then per layer, which
  // this engine's full causal attention does not reproduce); Mistral applies it to every layer.
  if ((modelType === 'qwen2' || modelType === 'qwen3') && raw.use_sliding_window === true) {
    throw new ConfigError(`${source}: "use_sliding_window": true is not supported (attention is full causal); set it to false`);
  }
  const layerTypes = raw.layer_types;
  if (gemma) {
    if (layerTypes !== undefined && layerTypes !== null) {
      if (!Array.isArray(layerTypes) || layerTypes.length !== numHiddenLayers || layerTypes.some((t) => t !== 'full_attention' && t !== 'sliding_attention')) {
        bad('layer_types', `a list of ${numHiddenLayers} "full_attention" / "sliding_attention" entries`, layerTypes);
      }
    }
  } else if (Array.isArray(layerTypes) && layerTypes.some((t) => t !== 'full_attention')) {
    throw new ConfigError(`${source}: "layer_types" has ${JSON.stringify([...new Set(layerTypes.filter((t) => t !== 'full_attention'))])} layers; only full_attention is supported`);
  }

  // RoPE: the newest transformers writes rope_parameters {rope_type, rope_theta, ...}; older configs
  // use rope_theta + rope_scaling. Both may be present; rope_parameters wins.
  let ropeTheta: number;
  let scalingObj: Record<string, unknown> | null = null;
  let scalingKey = 'rope_scaling';
  const rp = raw.rope_parameters;
  if (rp !== undefined && rp !== null) {
    if (typeof rp !== 'object' || Array.isArray(rp)) bad('rope_parameters', 'an object');
    let params = rp as Record<string, unknown>;
    // per-layer-type form {"full_attention": {...}}: all our layers are full attention (Gemma also has
    // "sliding_attention", its local rope, read by engine/model/gemma.ts)
    if (params.rope_type === undefined && params.rope_theta === undefined && typeof params.full_attention === 'object' && params.full_attention !== null) {
      const other = Object.keys(params).filter((k) => k !== 'full_attention' && !(gemma && k === 'sliding_attention'));
      if (other.length) throw new ConfigError(`${source}: "rope_parameters" has layer types ${JSON.stringify(other)}; only full_attention is supported`);
      params = params.full_attention as Record<string, unknown>;
    }
    ropeTheta = posNum('rope_theta', (raw.rope_theta as number | undefined) ?? d.ropeTheta, params, 'rope_parameters.rope_theta');
    scalingObj = params;
    scalingKey = 'rope_parameters';
  } else {
    ropeTheta = posNum('rope_theta', d.ropeTheta);
    const rs = raw.rope_scaling;
    if (rs !== undefined && rs !== null) {
      if (typeof rs !== 'object' || Array.isArray(rs)) bad('rope_scaling', 'an object or null');
      scalingObj = rs as Record<string, unknown>;
    }
  }
  let ropeScaling: LlamaConfig['ropeScaling'] = null;
  if (scalingObj) {
    let ropeType = scalingObj.rope_type ?? scalingObj.type ?? 'default';
    if (ropeType === 'su') ropeType = 'longrope'; // transformers' old name for Phi-3's longrope
    if (typeof ropeType !== 'string' || !SUPPORTED_ROPE_TYPES.has(ropeType)) {
      throw new ConfigError(`${source}: "${scalingKey}.rope_type" ${JSON.stringify(ropeType)} is not supported (expected one of ${[...SUPPORTED_ROPE_TYPES].join(', ')})`);
    }
    if (ropeType === 'longrope') {
      ropeScaling = longropeScaling(raw, scalingObj, scalingKey, headDim, maxPositionEmbeddings, source);
    } else if (ropeType !== 'default') {
      const factor = posNum('factor', NaN, scalingObj, `${scalingKey}.factor`);
      ropeScaling = { ropeType, factor };
      if (ropeType === 'llama3') {
        ropeScaling.lowFreqFactor = posNum('low_freq_factor', NaN, scalingObj, `${scalingKey}.low_freq_factor`);
        ropeScaling.highFreqFactor = posNum('high_freq_factor', NaN, scalingObj, `${scalingKey}.high_freq_factor`);
        const omp = scalingObj.original_max_position_embeddings;
        if (typeof omp !== 'number' || !Number.isSafeInteger(omp) || omp <= 0) bad(`${scalingKey}.original_max_position_embeddings`, 'a positive integer', omp);
        ropeScaling.originalMaxPositionEmbeddings = omp as number;
        if (ropeScaling.highFreqFactor! <= ropeScaling.lowFreqFactor!) {
          throw new ConfigError(`${source}: "${scalingKey}.high_freq_factor" (${ropeScaling.highFreqFactor}) must exceed "low_freq_factor" (${ropeScaling.lowFreqFactor})`);
        }
      } else if (typeof scalingObj.original_max_position_embeddings === 'number') {
        ropeScaling.originalMaxPositionEmbeddings = scalingObj.original_max_position_embeddings;
      }
    }
  }

  let eosTokenId: number | number[] | null = null;
  const eos = raw.eos_token_id;
  if (Array.isArray(eos)) {
    if (!eos.every((x) => Number.isSafeInteger(x) && x >= 0)) bad('eos_token_id', 'a token id or a list of token ids', eos);
    eosTokenId = eos as number[];
  } else {
    eosTokenId = optId('eos_token_id');
  }

  const config: LlamaConfig = {
    modelType, vocabSize, hiddenSize, intermediateSize, numHiddenLayers, numAttentionHeads, numKeyValueHeads,
    headDim, rmsNormEps, ropeTheta, ropeScaling, maxPositionEmbeddings, tieWordEmbeddings, attentionBias, mlpBias,
    bosTokenId: optId('bos_token_id'), eosTokenId, padTokenId: optId('pad_token_id'), raw,
  };
  if (gemma) {
    try {
      gemmaSpec(config, source);
    } catch (e) {
      throw new ConfigError((e as Error).message);
    }
  }
  return config;
}

/** Phi-3 settings whose math this engine does not reproduce: refused with the key named. */
function checkPhi3(raw: Record<string, unknown>, source: string): void {
  const prf = raw.partial_rotary_factor;
  if (prf !== undefined && prf !== null && prf !== 1) {
    throw new ConfigError(`${source}: "partial_rotary_factor" ${JSON.stringify(prf)} is not supported (rotary embedding over the whole head_dim only, 1.0)`);
  }
  for (const k of ['resid_pdrop', 'embd_pdrop', 'attention_dropout']) {
    const v = raw[k];
    if (v !== undefined && v !== null && v !== 0) {
      throw new ConfigError(`${source}: "${k}" ${JSON.stringify(v)} is not supported (base-model dropout in training); set it to 0.0`);
    }
  }
}

/** transformers' _compute_longrope_parameters inputs: factor = max_position_embeddings / original_max_position_embeddings
 *  when the config has original_max_position_embeddings (Phi-3 keeps it top level), the default attention factor
 *  sqrt(1 + ln(factor) / ln(original)), and short/long factors of head_dim / 2 entries each. */
function longropeScaling(raw: Record<string, unknown>, sc: Record<string, unknown>, key: string, headDim: number,
  maxPos: number, source: string): NonNullable<LlamaConfig['ropeScaling']> {
  const factors = (k: string): number[] => {
    const v = sc[k];
    if (!Array.isArray(v) || v.length !== headDim / 2 || !v.every((x) => typeof x === 'number' && Number.isFinite(x) && x > 0)) {
      throw new ConfigError(`${source}: "${key}.${k}" must be a list of ${headDim / 2} positive numbers (head_dim / 2), got ${JSON.stringify(v)?.slice(0, 80)}`);
    }
    return v as number[];
  };
  const shortFactor = factors('short_factor'), longFactor = factors('long_factor');
  const omp = raw.original_max_position_embeddings ?? sc.original_max_position_embeddings;
  let original = maxPos, factor: number;
  if (omp !== undefined && omp !== null) {
    if (typeof omp !== 'number' || !Number.isSafeInteger(omp) || omp <= 0) {
      throw new ConfigError(`${source}: "original_max_position_embeddings" must be a positive integer, got ${JSON.stringify(omp)}`);
    }
    original = omp;
    factor = maxPos / omp;
  } else {
    const f = sc.factor ?? 1;
    if (typeof f !== 'number' || !(f > 0)) throw new ConfigError(`${source}: "${key}.factor" must be a positive number, got ${JSON.stringify(f)}`);
    factor = f;
  }
  let attentionFactor: number;
  const af = sc.attention_factor;
  if (af !== undefined && af !== null) {
    if (typeof af !== 'number' || !(af > 0)) throw new ConfigError(`${source}: "${key}.attention_factor" must be a positive number, got ${JSON.stringify(af)}`);
    attentionFactor = af;
  } else {
    attentionFactor = factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(original));
  }
  return { ropeType: 'longrope', factor, originalMaxPositionEmbeddings: original, shortFactor, longFactor, attentionFactor };
}

/** Things about a config the engine handles approximately, to print to the user. */
export function configNotes(cfg: LlamaConfig): string[] {
  const notes: string[] = [];
  const sw = cfg.raw.sliding_window;
  if (cfg.modelType === 'mistral' && typeof sw === 'number' && sw < cfg.maxPositionEmbeddings) {
    notes.push(`sliding_window ${sw} is ignored: attention is full causal, which is identical for sequences up to ${sw} tokens`);
  }
  const tp = cfg.raw.pretraining_tp;
  if (typeof tp === 'number' && tp > 1) notes.push(`pretraining_tp ${tp} only slices matmuls in transformers; results are the same`);
  return notes;
}

/** Inverse-frequency table of RoPE (length headDim/2), with llama3 / linear scaling applied as transformers does. */
export function ropeInvFreq(cfg: LlamaConfig): Float64Array {
  const half = cfg.headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / cfg.ropeTheta ** ((2 * i) / cfg.headDim);
  const s = cfg.ropeScaling;
  if (!s) return inv;
  if (s.ropeType === 'linear') {
    for (let i = 0; i < half; i++) inv[i] /= s.factor;
  } else if (s.ropeType === 'llama3') {
    const oldCtx = s.originalMaxPositionEmbeddings!;
    const lowW = oldCtx / s.lowFreqFactor!;
    const highW = oldCtx / s.highFreqFactor!;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / inv[i];
      if (wavelen > lowW) inv[i] = inv[i] / s.factor;
      else if (wavelen >= highW) {
        const sm = (oldCtx / wavelen - s.lowFreqFactor!) / (s.highFreqFactor! - s.lowFreqFactor!);
        inv[i] = (1 - sm) * inv[i] / s.factor + sm * inv[i];
      }
    }
  }
  // "dynamic" NTK scaling only changes inv_freq beyond max_position_embeddings at inference time
  return inv;
}

/** Keys whose values transformers writes as Python floats even when integral (e.g. "rope_theta": 500000.0). */
export const CONFIG_FLOAT_KEYS: ReadonlySet<string> = new Set([
  'rms_norm_eps', 'rope_theta', 'initializer_range', 'attention_dropout', 'factor', 'low_freq_factor',
  'high_freq_factor', 'llm_int8_threshold', 'partial_rotary_factor', 'mlp_dropout', 'hidden_dropout',
  'final_logit_softcapping', 'attn_logit_softcapping', 'rope_local_base_freq',
]);

/** config.json text as transformers writes it (indent 2, sorted keys, trailing newline). */
export function configToJson(raw: Record<string, unknown>): string {
  return pyJsonDumps(raw, { indent: 2, sortKeys: true, floatKeys: CONFIG_FLOAT_KEYS }) + '\n';
}

/** Write <dir>/config.json from a parsed config (its raw JSON) or a raw object, with optional overrides. */
export async function writeConfig(dir: string, config: LlamaConfig | Record<string, unknown>, overrides: Record<string, unknown> = {}): Promise<void> {
  const raw = ('raw' in config && 'hiddenSize' in config) ? (config as LlamaConfig).raw : config as Record<string, unknown>;
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), configToJson({ ...raw, ...overrides }));
}

/** Read and parse <dir>/config.json (and refuse a GPTQ/AWQ quantize_config.json beside it); the error names
 *  the dir when it is missing. */
export async function readConfig(dir: string): Promise<LlamaConfig> {
  const path = join(dir, 'config.json');
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new ConfigError(`${dir}: no config.json (is this a Hugging Face model directory?)`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`${path}: invalid JSON: ${(e as Error).message}`);
  }
  const config = parseLlamaConfig(json, path);
  await checkQuantConfigFiles(dir);
  return config;
}
