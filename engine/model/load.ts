// Building a stage from a model's weights (a model dir, a bitsandbytes dir, shard blobs): layers
// [layerStart, layerEnd), the embedding or the loss head where the stage has them, and its LoRA params.
import type { Backend } from '../backend.ts';
import { tensorsOf } from '../backend.ts';
import type { NF4Weight } from '../formats/nf4.ts';
import { checkNF4Absmax } from '../formats/nf4.ts';
import type { NF4Weight as NF4W } from '../formats/nf4.ts';
import { nf4Rows } from '../formats/nf4.ts';
import type { LayerLinear, LoraTarget, NamedTensor, Stage, StageOptions, WeightSource } from '../types.ts';
import type { Decodable } from './decode.ts';
import { StageDecoding } from './decode.ts';
import { LossHead } from './head.ts';
import { fusedParts, hasQkNorm, linearModules, resolveTargets } from './arch.ts';
import { hasGemmaNorms } from './arch.ts';
import { gemmaSpec, isGemma, plusOne } from './gemma.ts';
import { DecoderLayer, slidingWindowOf } from './layer.ts';
import type { LayerWeights } from './layer.ts';
import { LoraLinear, baseModuleName, initLoraA, linearShape, loraParamName, loraScaling, orderedTargets, validateLoraConfig } from './lora.ts';
import type { LoraAdapterSlot } from './lora.ts';
import { RopeCache } from './rope.ts';
import { LlamaStage } from './stage.ts';
import { VocabMatrix } from './vocab-matrix.ts';

const DEFAULT_LOSS_CHUNK = 4096;
const DEFAULT_SEED = 42;

function checkNF4(name: string, w: NF4Weight, rows: number, cols: number): NF4Weight {
  if (w.rows !== rows || w.cols !== cols) {
    throw new RangeError(`${name}: expected NF4 weight [${rows}, ${cols}], got [${w.rows}, ${w.cols}]`);
  }
  const n = rows * cols;
  if (w.packed.length !== Math.ceil(n / 2)) throw new RangeError(`${name}: packed length ${w.packed.length} != ceil(${n}/2)`);
  try {
    checkNF4Absmax(w, name);
  } catch (e) {
    throw new RangeError((e as Error).message);
  }
  return w;
}

async function getFloatChecked(source: WeightSource, name: string, length: number): Promise<Float32Array> {
  if (!source.has(name)) throw new Error(`weights: missing tensor ${name}`);
  const t = await source.getFloat(name);
  if (t.length !== length) throw new RangeError(`${name}: expected ${length} float values, got ${t.length}`);
  return t;
}

/** An embedding or lm_head [V, C]: streamed from the source into bf16 where it can (no float32 copy of the
 *  whole matrix at any time), else read whole and packed. */
async function vocabMatrixOf(source: WeightSource, name: string, V: number, C: number, embedScale = 1): Promise<VocabMatrix> {
  if (!source.has(name)) throw new Error(`weights: missing tensor ${name}`);
  const r = source.floatReader?.(name) ?? null;
  if (r === null) return VocabMatrix.create(await getFloatChecked(source, name, V * C), V, C, embedScale);
  if (r.elements !== V * C) throw new RangeError(`${name}: expected ${V * C} float values, got ${r.elements}`);
  return VocabMatrix.fromReader((start, out) => r.read(start, out), V, C, embedScale);
}

/** Llama-shaped checkpoints whose math differs in ways this stage would silently get wrong. */
function checkArchitecture(source: WeightSource, layer: number): void {
  const t = source.config.modelType;
  if (!isGemma(source.config) && /^(gemma|phi(?!3$)|falcon|gpt|olmo|cohere|deepseek_v)/i.test(t)) {
    throw new Error(`model_type "${t}" is not a Llama-family architecture this engine implements (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text)`);
  }
  if (hasQkNorm(source.config)) return;
  for (const n of ['q_norm', 'k_norm']) {
    const name = `model.layers.${layer}.self_attn.${n}.weight`;
    if (source.has(name)) throw new Error(`${name}: per-head q/k RMSNorm (Qwen3-style, model_type "${t}") is not supported`);
  }
}

/** The layer roles a linear module plays: itself, or for a fused one (Phi-3) its row parts, q/k/v of qkv_proj
 *  and gate/up of gate_up_proj, sharing the module's adapter. */
function linearRoles(cfg: Stage['config'], l: number, m: LoraTarget, w: NF4W, bias: Float32Array | null,
  slot: LoraAdapterSlot | null): Partial<Record<LayerLinear, LoraLinear>> {
  const parts = fusedParts(cfg, m);
  if (parts.length === 0) return { [m]: new LoraLinear(l, m, w, bias, slot) };
  const roles: LayerLinear[] = m === 'qkv_proj' ? ['q_proj', 'k_proj', 'v_proj'] : ['gate_proj', 'up_proj'];
  const out: Partial<Record<LayerLinear, LoraLinear>> = {};
  let row = 0;
  parts.forEach((rows, i) => {
    const part = nf4Rows(w, row, row + rows);
    out[roles[i]] = new LoraLinear(l, m, part, bias ? bias.slice(row, row + rows) : null, slot, row);
    row += rows;
  });
  return out;
}

/** Load layers [layerStart, layerEnd) of the source's model and create this stage's LoRA params. Whole-model
 *  stages also decode (Decodable: logits, createDecoder); the others refuse to. */
export async function loadStage(source: WeightSource, backend: Backend, opts: StageOptions): Promise<Stage & Decodable> {
  const cfg = source.config;
  const nL = cfg.numHiddenLayers;
  const { layerStart, layerEnd } = opts;
  if (!Number.isInteger(layerStart) || !Number.isInteger(layerEnd) || layerStart < 0 || layerEnd > nL || layerStart >= layerEnd) {
    throw new RangeError(`loadStage: layer range [${layerStart}, ${layerEnd}) is not a non-empty sub-range of [0, ${nL})`);
  }
  if (cfg.numAttentionHeads % cfg.numKeyValueHeads !== 0) {
    throw new RangeError(`loadStage: num_attention_heads ${cfg.numAttentionHeads} is not a multiple of num_key_value_heads ${cfg.numKeyValueHeads}`);
  }
  validateLoraConfig(opts.lora);
  checkArchitecture(source, layerStart);
  const lossChunk = opts.lossChunk ?? DEFAULT_LOSS_CHUNK;
  if (!Number.isInteger(lossChunk) || lossChunk <= 0) throw new RangeError(`loadStage: lossChunk must be a positive integer, got ${lossChunk}`);
  const seed = opts.seed ?? DEFAULT_SEED;
  const C = cfg.hiddenSize, V = cfg.vocabSize;
  const targets = new Set(resolveTargets(cfg, orderedTargets(opts.lora)));
  const r = opts.lora.r;
  const scaling = loraScaling(opts.lora);
  const params: NamedTensor[] = [];
  const weights: LayerWeights[] = [];
  const qkNorm = hasQkNorm(cfg);
  const gemma = isGemma(cfg) ? gemmaSpec(cfg) : null;
  // Gemma's RMSNorm multiplies by (1 + w) in float32: the op gets that weight
  const norm = async (name: string, n: number) => {
    const w = await getFloatChecked(source, name, n);
    return gemma ? plusOne(w) : w;
  };
  const fourNorms = hasGemmaNorms(cfg);
  for (let l = layerStart; l < layerEnd; l++) {
    const lin = {} as Record<LayerLinear, LoraLinear>;
    for (const m of linearModules(cfg)) {
      const [out, inF] = linearShape(cfg, m);
      const name = baseModuleName(l, m);
      if (!source.has(`${name}.weight`)) throw new Error(`weights: missing tensor ${name}.weight`);
      const w = checkNF4(`${name}.weight`, await source.getNF4(`${name}.weight`), out, inF);
      const bias = source.has(`${name}.bias`) ? await getFloatChecked(source, `${name}.bias`, out) : null;
      let slot: LoraAdapterSlot | null = null;
      if (targets.has(m)) {
        const A: NamedTensor = { name: loraParamName(l, m, 'A'), shape: [r, inF], data: new Float32Array(r * inF) };
        const B: NamedTensor = { name: loraParamName(l, m, 'B'), shape: [out, r], data: new Float32Array(out * r) };
        initLoraA(A.data, r, inF, opts.lora.initLoraWeights, seed, l, m);
        slot = { A, B, aIndex: params.length, bIndex: params.length + 1, r, scaling, dropout: opts.lora.loraDropout };
        params.push(A, B);
      }
      Object.assign(lin, linearRoles(cfg, l, m, w, bias, slot));
    }
    const p = `model.layers.${l}`;
    weights.push({
      inputNorm: await norm(`${p}.input_layernorm.weight`, C),
      // Gemma's post_attention_layernorm normalizes the attention output; its pre-MLP norm is pre_feedforward_layernorm
      postNorm: await norm(`${p}.${fourNorms ? 'pre_feedforward_layernorm' : 'post_attention_layernorm'}.weight`, C),
      postAttnNorm: fourNorms ? await norm(`${p}.post_attention_layernorm.weight`, C) : null,
      postFfnNorm: fourNorms ? await norm(`${p}.post_feedforward_layernorm.weight`, C) : null,
      qNorm: qkNorm ? await norm(`${p}.self_attn.q_norm.weight`, cfg.headDim) : null,
      kNorm: qkNorm ? await norm(`${p}.self_attn.k_norm.weight`, cfg.headDim) : null,
      q: lin.q_proj, k: lin.k_proj, v: lin.v_proj, o: lin.o_proj,
      gate: lin.gate_proj, up: lin.up_proj, down: lin.down_proj,
    });
  }
  const isFirst = layerStart === 0, isLast = layerEnd === nL;
  const embedName = 'model.embed_tokens.weight';
  let embed: VocabMatrix | null = null;
  if (isFirst || (isLast && cfg.tieWordEmbeddings)) embed = await vocabMatrixOf(source, embedName, V, C, gemma?.embedScale ?? 1);
  let head: LossHead | null = null;
  if (isLast) {
    const finalNorm = await norm('model.norm.weight', C);
    const lmHead = cfg.tieWordEmbeddings ? embed! : await vocabMatrixOf(source, 'lm_head.weight', V, C);
    head = new LossHead(cfg, finalNorm, lmHead, lossChunk, gemma?.finalSoftcap ?? 0);
  }
  const rope = new RopeCache(cfg);
  // Gemma: sliding-window layers are computed as such (attention's window); Gemma-3's use the local rope
  const localRope = gemma?.localRopeConfig ? new RopeCache(gemma.localRopeConfig) : null;
  const slidingWindow = gemma ? null : slidingWindowOf(cfg);
  const layers = weights.map((w, i) => {
    const l = layerStart + i;
    if (!gemma) return new DecoderLayer(w, cfg, rope, slidingWindow);
    return new DecoderLayer(w, cfg, gemma.localRope[l] ? localRope! : rope, null, { attention: gemma.attention[l], geglu: true });
  });
  const tensors = tensorsOf(backend);
  const parts = { config: cfg, layerStart, layerEnd, params, backend, tensors, layers, embed: isFirst ? embed : null, head };
  return new LlamaStage<unknown>({
    ...parts, gradientCheckpointing: opts.gradientCheckpointing ?? true, decoding: new StageDecoding(parts),
  });
}
