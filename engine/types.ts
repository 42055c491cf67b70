// Shared engine contracts: model config, LoRA config, weight sources and the Stage API that the
// trainer and the swarm call. Implementations live in engine/model/, engine/formats/ and node/.
import type { NF4Weight } from './formats/nf4.ts';

/** A Llama-family config normalized from HF config.json (engine/formats/config.ts parses it). */
export interface LlamaConfig {
  modelType: string;            // "llama" | "mistral" | "qwen2" ...
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  /** null, or llama3 / linear / dynamic scaling as in HF rope_scaling / rope_parameters */
  ropeScaling: null | {
    ropeType: string; factor: number;
    lowFreqFactor?: number; highFreqFactor?: number; originalMaxPositionEmbeddings?: number;
    /** longrope (Phi-3): per-frequency divisors of inv_freq within / beyond original_max_position_embeddings,
     *  and the cos/sin scale (attention_factor) */
    shortFactor?: number[]; longFactor?: number[]; attentionFactor?: number;
  };
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry a bias (Qwen2) */
  attentionBias: boolean;
  mlpBias: boolean;
  bosTokenId: number | null;
  eosTokenId: number | number[] | null;
  padTokenId: number | null;
  /** the raw JSON, kept so writers can round-trip it */
  raw: Record<string, unknown>;
}

/** The seven linears of a Llama-family layer ("all-linear" before the model is known). */
export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
/** Every linear module name a family may have: the Llama seven, then Phi-3's fused qkv_proj and gate_up_proj
 *  (engine/model/arch.ts linearModules says which a model has). The index keys LoRA init and dropout streams. */
export const ALL_TARGETS = [...LORA_TARGETS, 'qkv_proj', 'gate_up_proj'] as const;
export type LoraTarget = typeof ALL_TARGETS[number];
/** A role in the decoder layer's math (a fused module's parts play the roles of the Llama linears they hold). */
export type LayerLinear = typeof LORA_TARGETS[number];

/** PEFT LoraConfig semantics (facts §4). */
export interface LoraConfig {
  r: number;
  loraAlpha: number;
  loraDropout: number;
  targetModules: LoraTarget[];
  useRslora: boolean;
  /** true (kaiming-uniform A, zero B) | "gaussian" (A ~ N(0, 1/r)) */
  initLoraWeights: true | 'gaussian';
}

/** Where a stage's frozen base weights come from: a local HF model dir, a bitsandbytes
 *  prequantized dir, or content-addressed shard blobs fetched over the swarm.
 *  Names are HF tensor names ("model.layers.3.self_attn.q_proj.weight"). */
export interface WeightSource {
  readonly config: LlamaConfig;
  has(name: string): boolean;
  /** a full-precision tensor (embeddings, norms, lm_head, biases) as float32 */
  getFloat(name: string): Promise<Float32Array>;
  /** a linear weight as NF4; a full-precision source quantizes it on the fly (blocksize 64) */
  getNF4(name: string): Promise<NF4Weight>;
  /** a float32 tensor left on disk, read by element range (`out.length` values from element `start`): the
   *  loader streams an embedding or lm_head through it into bf16 without ever holding it whole in float32;
   *  undefined / null: use getFloat */
  floatReader?(name: string): FloatReader | null;
}

export interface FloatReader {
  elements: number;
  read(start: number, out: Float32Array): Promise<void>;
}

/** One trainable LoRA tensor, named with its PEFT key, e.g.
 *  "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" ([r, in]) / "...lora_B.weight" ([out, r]). */
export interface NamedTensor {
  name: string;
  shape: number[];
  data: Float32Array;
}

export interface StageOptions {
  /** first layer (inclusive) and last layer (exclusive); [0, L) is the whole model */
  layerStart: number;
  layerEnd: number;
  lora: LoraConfig;
  /** recompute each layer's forward during backward (default true) */
  gradientCheckpointing?: boolean;
  /** seed for LoRA A init (PEFT kaiming-uniform) so every replica and the trainer agree */
  seed?: number;
  /** vocabulary chunk for chunked cross-entropy (default 4096) */
  lossChunk?: number;
}

/** Input of one micro-batch to a stage: token ids on the first stage, hidden states otherwise. */
export interface StageInput {
  /** micro-batch key; the swarm uses `${step}:${mb}:${attempt}` */
  key: string;
  batch: number;          // B
  seqLen: number;         // S (right padded)
  ids?: Int32Array;       // [B*S] on the first stage
  hidden?: Float32Array;  // [B*S, C] elsewhere
  /** [B*S] next-token targets already shifted (label of position i predicts token i+1), -100 ignored;
   *  needed on the last stage */
  labels?: Int32Array;
  /** seed for LoRA dropout masks of this micro-batch (same seed ⇒ same masks in recompute) */
  dropoutSeed?: number;
  /** packing (TRL padding_free): batch 1 and the lengths of the examples concatenated in the row, summing to
   *  seqLen; positions restart and attention stays inside each example */
  segments?: Int32Array;
}

export interface StageForwardResult {
  /** [B*S, C] hidden state for the next stage (absent on the last stage) */
  hidden?: Float32Array;
  /** last stage: sum of token cross-entropies over non-ignored labels, and their count */
  lossSum?: number;
  tokens?: number;
}

export interface Stage {
  readonly config: LlamaConfig;
  readonly layerStart: number;
  readonly layerEnd: number;
  readonly isFirst: boolean;
  readonly isLast: boolean;
  /** trainable LoRA tensors of this stage in a fixed order (layer, module, A then B) */
  readonly params: NamedTensor[];
  /** zero-filled gradient buffers aligned with params */
  newGrads(): Float32Array[];
  /** Run forward; keeps the stage input under input.key until backward or release. */
  forward(input: StageInput, opts?: { train?: boolean }): Promise<StageForwardResult>;
  /** Backward for a kept key. Non-last stages pass gradOut [B*S, C]; the last stage passes
   *  lossScale (d loss / d token-loss, e.g. 1 / tokens of the optimizer step).
   *  LoRA grads ACCUMULATE into `grads` (aligned with params). Returns the input gradient
   *  [B*S, C] (absent on the first stage). Releases the key. */
  backward(key: string, grads: Float32Array[], args: { gradOut?: Float32Array; lossScale?: number }): Promise<{ gradIn?: Float32Array }>;
  /** drop a kept input (failed/aborted micro-batch) */
  release(key: string): void;
  /** drop every kept micro-batch and refuse further use */
  dispose(): void;
}
