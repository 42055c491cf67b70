// Memory and parameter model of QLoRA training for a layer range: what `swarmtune plan` prints and what the
// coordinator's planner calls per candidate stage. Assumptions are written in docs/plan.md.
import type { LlamaConfig, LoraTarget } from '../types.ts';
import { linearShape } from '../model/lora.ts';
import { fusedParts, hasGemmaNorms, layerFloatTensors, linearModules, resolveTargets } from '../model/arch.ts';
import { gemmaSpec, isGemma } from '../model/gemma.ts';
import type { OptimName } from '../optimizer.ts';
import { MIN_8BIT_SIZE, OPTIM8_BLOCKSIZE } from './optim.ts';

/** Trainable LoRA parameters of layers [layerStart, layerEnd): Σ r·(in + out) over targets. */
export function loraParamCount(cfg: LlamaConfig, lora: { r: number; targetModules: readonly LoraTarget[] }, layerStart = 0, layerEnd = cfg.numHiddenLayers): number {
  let perLayer = 0;
  for (const t of resolveTargets(cfg, lora.targetModules)) {
    const [out, inF] = linearShape(cfg, t);
    perLayer += lora.r * (inF + out);
  }
  return perLayer * (layerEnd - layerStart);
}

/** LoRA tensor sizes (A then B per target per layer), used for 8-bit eligibility (min_8bit_size). */
function loraTensorSizes(cfg: LlamaConfig, lora: { r: number; targetModules: readonly LoraTarget[] }, layers: number): number[] {
  const out: number[] = [];
  for (const t of resolveTargets(cfg, lora.targetModules)) {
    const [o, i] = linearShape(cfg, t);
    for (let l = 0; l < layers; l++) out.push(lora.r * i, o * lora.r);
  }
  return out;
}

/** Frozen base parameters of the whole model (embeddings, every linear, norms, lm_head unless tied, biases). */
export function baseParamCount(cfg: LlamaConfig): number {
  const C = cfg.hiddenSize, V = cfg.vocabSize;
  let linear = 0;
  for (const t of linearModules(cfg)) {
    const [o, i] = linearShape(cfg, t);
    linear += o * i;
  }
  const kvDim = cfg.numKeyValueHeads * cfg.headDim;
  const bias = (cfg.attentionBias ? cfg.numAttentionHeads * cfg.headDim + 2 * kvDim : 0) + (cfg.mlpBias ? 2 * cfg.intermediateSize + C : 0);
  const norms = layerFloatTensors(cfg).reduce((n, t) => n + t.length, 0);
  const perLayer = linear + norms + bias;
  return V * C + cfg.numHiddenLayers * perLayer + C + (cfg.tieWordEmbeddings ? 0 : V * C);
}

/** PEFT print_trainable_parameters (4-bit params counted at their full size, as PEFT does). */
export function trainableParamsLine(trainable: number, all: number): string {
  const fmt = (n: number): string => n.toLocaleString('en-US');
  return `trainable params: ${fmt(trainable)} || all params: ${fmt(all)} || trainable%: ${(100 * trainable / all).toFixed(4)}`;
}

export interface StageMemoryOptions {
  layerStart: number;
  layerEnd: number;
  /** embeddings live here (defaults to layerStart === 0) */
  isFirst?: boolean;
  /** final norm + lm_head + loss live here (defaults to layerEnd === L) */
  isLast?: boolean;
  lora: { r: number; targetModules: readonly LoraTarget[] };
  microBatch: number;
  seqLen: number;
  optim: OptimName;
  /** micro-batches whose stage input is held at once (pipelining); default 1 */
  inFlightMicroBatches?: number;
  /** bnb double quantization of the absmax (default true) */
  doubleQuant?: boolean;
  /** NF4 block size (default 64) */
  blocksize?: number;
  /** bytes of the compute/storage dtype of embeddings, head and activations (bf16 = 2, default) */
  floatBytes?: number;
  /** bytes per value of the embedding and lm_head as held (2 when bf16-exact, engine/model/vocab-matrix.ts);
   *  default floatBytes */
  vocabBytes?: number;
  /** default true */
  gradientCheckpointing?: boolean;
  /** vocabulary columns of logits alive at once (chunked cross-entropy); default min(vocab, 4096) */
  lossChunk?: number;
}

export interface StageMemory {
  nf4WeightsBytes: number;
  quantConstantsBytes: number;
  embeddingsBytes: number;
  lmHeadBytes: number;
  normsBytes: number;
  loraWeightsBytes: number;
  loraGradsBytes: number;
  /** optimizer state on the device (0 when paged: it lives in host/disk pages) */
  optimizerBytes: number;
  /** optimizer state in host pages (paged optimizers) */
  optimizerHostBytes: number;
  activationsBytes: number;
  workspaceBytes: number;
  /** everything on the device */
  totalBytes: number;
  trainableParams: number;
}

/** NF4 bytes of one linear as a stage holds it (engine/formats/nf4.ts nf4ConstantsBytes): packed codes, and the
 *  quantization constants — f32 absmax per block, or with double quant a u8 code per block, an f32 nested absmax
 *  per 256 blocks, the 256-entry f32 map (one per weight on a GPU; CPU stages share one copy) and the f32 offset.
 *  The 16-entry NF4 table is a constant of the kernels, never held per weight. 4 + 8/64 + 32/(64·256) ≈ 4.127 bits
 *  per parameter with double quant, 4.5 without (blocksize 64). */
export function nf4LinearBytes(numel: number, blocksize = 64, doubleQuant = true): { packed: number; constants: number } {
  const blocks = Math.ceil(numel / blocksize);
  const packed = Math.ceil(numel / 2);
  const constants = doubleQuant
    ? blocks + 4 * Math.ceil(blocks / 256) + 4 * 256 + 4
    : 4 * blocks;
  return { packed, constants };
}

/** Device memory of one pipeline stage (or the whole model as [0, L)) during QLoRA training. */
export function stageMemoryBytes(cfg: LlamaConfig, o: StageMemoryOptions): StageMemory {
  const L = cfg.numHiddenLayers;
  if (!(Number.isInteger(o.layerStart) && Number.isInteger(o.layerEnd) && o.layerStart >= 0 && o.layerEnd <= L && o.layerStart < o.layerEnd)) {
    throw new RangeError(`stageMemoryBytes: bad layer range [${o.layerStart}, ${o.layerEnd}) for ${L} layers`);
  }
  const layers = o.layerEnd - o.layerStart;
  const isFirst = o.isFirst ?? o.layerStart === 0;
  const isLast = o.isLast ?? o.layerEnd === L;
  const fb = o.floatBytes ?? 2;
  const bs = o.blocksize ?? 64;
  const dq = o.doubleQuant ?? true;
  const C = cfg.hiddenSize, V = cfg.vocabSize, I = cfg.intermediateSize;
  const qDim = cfg.numAttentionHeads * cfg.headDim, kvDim = cfg.numKeyValueHeads * cfg.headDim;

  let packed = 0, constants = 0, largestLinear = 0;
  for (const t of linearModules(cfg)) {
    const [out, inF] = linearShape(cfg, t);
    const b = nf4LinearBytes(out * inF, bs, dq);
    packed += b.packed * layers;
    constants += b.constants * layers;
    // a fused linear (Phi-3) is computed part by part (engine/model/load.ts)
    const parts = fusedParts(cfg, t);
    largestLinear = Math.max(largestLinear, (parts.length ? Math.max(...parts) : out) * inF);
  }
  const vb = o.vocabBytes ?? fb;
  const embeddingsBytes = isFirst ? V * C * vb : 0;
  // a tied head reuses the embedding; a last stage that is not also first must hold its own copy
  const lmHeadBytes = isLast && (!cfg.tieWordEmbeddings || !isFirst) ? V * C * vb : 0;
  // prepare_model_for_kbit_training casts norms to fp32 (Qwen3's q/k norms included)
  const layerNorms = layerFloatTensors(cfg).reduce((n, t) => n + t.length, 0);
  const normsBytes = 4 * (layerNorms * layers + (isLast ? C : 0));

  const trainableParams = loraParamCount(cfg, o.lora, o.layerStart, o.layerEnd);
  const loraWeightsBytes = 4 * trainableParams;
  const loraGradsBytes = 4 * trainableParams;
  let optimState = 0;
  const eightBit = o.optim === 'adamw_8bit' || o.optim === 'paged_adamw_8bit';
  for (const n of loraTensorSizes(cfg, o.lora, layers)) {
    optimState += eightBit && n >= MIN_8BIT_SIZE ? 2 * n + 8 * Math.ceil(n / OPTIM8_BLOCKSIZE) : 8 * n;
  }
  const paged = o.optim.startsWith('paged_');

  const T = o.microBatch * o.seqLen;
  const inFlight = o.inFlightMicroBatches ?? 1;
  const ckpt = o.gradientCheckpointing ?? true;
  const r = o.lora.r, nTargets = resolveTargets(cfg, o.lora.targetModules).length;
  // one layer's forward activations: x, h1, q, att, x2, h2 (C or H·D wide), k, v, gate, up, act, the LoRA
  // rank-r intermediates, and the attention log-sum-exp (memory-efficient attention: no S×S scores)
  // (Gemma also keeps o_proj's and down_proj's outputs before its post-attention / post-feedforward norms)
  const gemmaActs = hasGemmaNorms(cfg) ? 2 * C : 0;
  const layerActs = T * fb * (4 * C + gemmaActs + 2 * qDim + 2 * kvDim + 3 * I + r * nTargets) + 4 * T * cfg.numAttentionHeads;
  // backward of a layer holds its recomputed activations plus gradients of the same order
  const layerWorking = 2 * layerActs;
  const keptPerMicroBatch = ckpt ? layers * T * C * fb : layers * layerActs;
  const lossChunk = Math.min(V, o.lossChunk ?? 4096);
  // final-logit soft-capping (Gemma-2) keeps the capped chunk beside the raw one in backward
  const capChunks = isGemma(cfg) && gemmaSpec(cfg).finalSoftcap > 0 ? 2 : 1;
  const lossBytes = isLast ? capChunks * T * lossChunk * 4 + T * C * 4 : 0;
  const activationsBytes = inFlight * keptPerMicroBatch + layerWorking + lossBytes;
  // the largest linear dequantized to the compute dtype for its matmul
  const workspaceBytes = largestLinear * fb;

  const optimizerBytes = paged ? 0 : optimState;
  const total = packed + constants + embeddingsBytes + lmHeadBytes + normsBytes + loraWeightsBytes + loraGradsBytes
    + optimizerBytes + activationsBytes + workspaceBytes;
  return {
    nf4WeightsBytes: packed, quantConstantsBytes: constants, embeddingsBytes, lmHeadBytes, normsBytes,
    loraWeightsBytes, loraGradsBytes, optimizerBytes, optimizerHostBytes: paged ? optimState : 0,
    activationsBytes, workspaceBytes, totalBytes: total, trainableParams,
  };
}

export interface PlanSuggestion {
  microBatch: number;
  gradientAccumulationSteps: number;
  memory: StageMemory;
  fits: boolean;
}

/** Largest power-of-two micro-batch (≤ targetBatch) that fits memoryBytes, and the accumulation that keeps
 *  the effective batch at targetBatch. */
export function suggestBatch(cfg: LlamaConfig, base: Omit<StageMemoryOptions, 'microBatch'>, memoryBytes: number, targetBatch = 16): PlanSuggestion {
  let best = 1;
  for (let mb = 1; mb <= targetBatch; mb *= 2) {
    if (stageMemoryBytes(cfg, { ...base, microBatch: mb }).totalBytes <= memoryBytes) best = mb;
    else break;
  }
  const memory = stageMemoryBytes(cfg, { ...base, microBatch: best });
  return { microBatch: best, gradientAccumulationSteps: Math.max(1, Math.ceil(targetBatch / best)), memory, fits: memory.totalBytes <= memoryBytes };
}
