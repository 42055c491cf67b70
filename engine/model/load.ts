// Building a stage from a model's weights (a model dir, a bitsandbytes dir, shard blobs): layers
// [layerStart, layerEnd), the embedding or the loss head where the stage has them, and its LoRA params.
import type { Backend } from '../backend.ts';
import { tensorsOf } from '../backend.ts';
import type { NF4Weight } from '../formats/nf4.ts';
import { checkNF4Absmax } from '../formats/nf4.ts';
import type { LoraTarget, NamedTensor, Stage, StageOptions, WeightSource } from '../types.ts';
import { LORA_TARGETS } from '../types.ts';
import type { Decodable } from './decode.ts';
import { StageDecoding } from './decode.ts';
import { LossHead } from './head.ts';
import { hasQkNorm } from './arch.ts';
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

/** Llama-shaped checkpoints whose math differs in ways this stage would silently get wrong. */
function checkArchitecture(source: WeightSource, layer: number): void {
  const t = source.config.modelType;
  if (/^(gemma|phi|falcon|gpt|olmo|cohere|deepseek_v)/i.test(t)) {
    throw new Error(`model_type "${t}" is not a Llama-family architecture this engine implements (llama, mistral, qwen2, qwen3)`);
  }
  if (hasQkNorm(source.config)) return;
  for (const n of ['q_norm', 'k_norm']) {
    const name = `model.layers.${layer}.self_attn.${n}.weight`;
    if (source.has(name)) throw new Error(`${name}: per-head q/k RMSNorm (Qwen3-style, model_type "${t}") is not supported`);
  }
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
  const targets = new Set(orderedTargets(opts.lora));
  const r = opts.lora.r;
  const scaling = loraScaling(opts.lora);
  const params: NamedTensor[] = [];
  const weights: LayerWeights[] = [];
  const qkNorm = hasQkNorm(cfg);
  for (let l = layerStart; l < layerEnd; l++) {
    const lin = {} as Record<LoraTarget, LoraLinear>;
    for (const m of LORA_TARGETS) {
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
      lin[m] = new LoraLinear(l, m, w, bias, slot);
    }
    weights.push({
      inputNorm: await getFloatChecked(source, `model.layers.${l}.input_layernorm.weight`, C),
      postNorm: await getFloatChecked(source, `model.layers.${l}.post_attention_layernorm.weight`, C),
      qNorm: qkNorm ? await getFloatChecked(source, `model.layers.${l}.self_attn.q_norm.weight`, cfg.headDim) : null,
      kNorm: qkNorm ? await getFloatChecked(source, `model.layers.${l}.self_attn.k_norm.weight`, cfg.headDim) : null,
      q: lin.q_proj, k: lin.k_proj, v: lin.v_proj, o: lin.o_proj,
      gate: lin.gate_proj, up: lin.up_proj, down: lin.down_proj,
    });
  }
  const isFirst = layerStart === 0, isLast = layerEnd === nL;
  const embedName = 'model.embed_tokens.weight';
  let embed: VocabMatrix | null = null;
  if (isFirst || (isLast && cfg.tieWordEmbeddings)) embed = await VocabMatrix.create(await getFloatChecked(source, embedName, V * C), V, C);
  let head: LossHead | null = null;
  if (isLast) {
    const finalNorm = await getFloatChecked(source, 'model.norm.weight', C);
    const lmHead = cfg.tieWordEmbeddings ? embed! : await VocabMatrix.create(await getFloatChecked(source, 'lm_head.weight', V * C), V, C);
    head = new LossHead(cfg, finalNorm, lmHead, lossChunk);
  }
  const rope = new RopeCache(cfg);
  const slidingWindow = slidingWindowOf(cfg);
  const layers = weights.map((w) => new DecoderLayer(w, cfg, rope, slidingWindow));
  const tensors = tensorsOf(backend);
  const parts = { config: cfg, layerStart, layerEnd, params, backend, tensors, layers, embed: isFirst ? embed : null, head };
  return new LlamaStage<unknown>({
    ...parts, gradientCheckpointing: opts.gradientCheckpointing ?? true, decoding: new StageDecoding(parts),
  });
}
