// Seeded random Llama models held in memory (a WeightSource), for tests, benchmarks and the offline demo.
import type { NF4Weight, NF4WeightDQ, NF4WeightF32 } from '../formats/nf4.ts';
import { withDoubleQuant } from '../formats/nf4.ts';
import type { LlamaConfig, WeightSource } from '../types.ts';
import { layerFloatName, layerFloatTensors, linearModules } from './arch.ts';
import { isGemma } from './gemma.ts';
import { baseModuleName, linearShape } from './lora.ts';
import { Rng } from './rng.ts';

/** A small Llama config; override any field. Defaults: 2 layers, hidden 64, 4 query / 2 kv heads, vocab 97. */
export function tinyLlamaConfig(overrides: Partial<LlamaConfig> = {}): LlamaConfig {
  const hiddenSize = overrides.hiddenSize ?? 64;
  const numAttentionHeads = overrides.numAttentionHeads ?? 4;
  const cfg: LlamaConfig = {
    modelType: 'llama',
    vocabSize: 97,
    hiddenSize,
    intermediateSize: 128,
    numHiddenLayers: 2,
    numAttentionHeads,
    numKeyValueHeads: 2,
    headDim: hiddenSize / numAttentionHeads,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: 2048,
    tieWordEmbeddings: false,
    attentionBias: false,
    mlpBias: false,
    bosTokenId: null,
    eosTokenId: null,
    padTokenId: null,
    raw: {},
    ...overrides,
  };
  return cfg;
}

/** A random but valid NF4 weight: uniform random codes, absmax ≈ scale·U(0.5, 1.5) per block; with `doubleQuant`
 *  that absmax double-quantized as bitsandbytes does (the weight then holds the 8-bit form). */
export function randomNF4(rows: number, cols: number, scale: number, rng: Rng, blocksize?: number, opts?: { doubleQuant?: false }): NF4WeightF32;
export function randomNF4(rows: number, cols: number, scale: number, rng: Rng, blocksize: number, opts: { doubleQuant: true }): NF4WeightDQ;
export function randomNF4(rows: number, cols: number, scale: number, rng: Rng, blocksize?: number, opts?: { doubleQuant?: boolean }): NF4Weight;
export function randomNF4(rows: number, cols: number, scale: number, rng: Rng, blocksize = 64, opts: { doubleQuant?: boolean } = {}): NF4Weight {
  const n = rows * cols;
  const packed = new Uint8Array(Math.ceil(n / 2));
  for (let i = 0; i < packed.length; i++) packed[i] = rng.nextU32() & 0xff;
  if (n % 2 === 1) packed[packed.length - 1] = (packed[packed.length - 1] & 0xf0) | 7; // pad element decodes to 0
  const absmax = new Float32Array(Math.ceil(n / blocksize));
  for (let b = 0; b < absmax.length; b++) absmax[b] = scale * (0.5 + rng.nextFloat());
  const W: NF4WeightF32 = { packed, absmax, rows, cols, blocksize };
  return opts.doubleQuant === true ? withDoubleQuant(W) : W;
}

/** In-memory WeightSource with seeded random weights for every tensor the config implies
 *  (biases on q/k/v when attentionBias or modelType "qwen2"; Qwen3's q/k norms; lm_head unless tied); `doubleQuant`
 *  holds the linears' absmax double-quantized (the same random draws either way). */
export function randomWeightSource(cfg: LlamaConfig, seed = 0, opts: { doubleQuant?: boolean } = {}): WeightSource {
  const rng = new Rng(seed, 0x4d6f646c /* "Modl" */);
  const C = cfg.hiddenSize, V = cfg.vocabSize;
  const floats = new Map<string, Float32Array>();
  const nf4 = new Map<string, NF4Weight>();
  const qkvBias = cfg.attentionBias || cfg.modelType === 'qwen2';
  floats.set('model.embed_tokens.weight', rng.fillNormal(new Float32Array(V * C), 0, 1));
  // Gemma's norms multiply by (1 + w): its stored weights sit around 0
  const [nLo, nHi] = isGemma(cfg) ? [-0.2, 0.2] : [0.8, 1.2];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const n of layerFloatTensors(cfg)) floats.set(layerFloatName(l, n), rng.fillUniform(new Float32Array(n.length), nLo, nHi));
    for (const m of linearModules(cfg)) {
      const [out, inF] = linearShape(cfg, m);
      const name = baseModuleName(l, m);
      // ~unit-variance outputs for unit-variance inputs: the NF4 code table has mean square ≈ 0.3
      nf4.set(`${name}.weight`, randomNF4(out, inF, 1.6 / Math.sqrt(inF), rng, 64, { doubleQuant: opts.doubleQuant === true }));
      if (qkvBias && (m === 'q_proj' || m === 'k_proj' || m === 'v_proj')) {
        floats.set(`${name}.bias`, rng.fillNormal(new Float32Array(out), 0, 0.5));
      }
    }
  }
  floats.set('model.norm.weight', rng.fillUniform(new Float32Array(C), nLo, nHi));
  if (!cfg.tieWordEmbeddings) floats.set('lm_head.weight', rng.fillNormal(new Float32Array(V * C), 0, 1 / Math.sqrt(C)));
  return {
    config: cfg,
    has: (name) => floats.has(name) || nf4.has(name),
    async getFloat(name) {
      const t = floats.get(name);
      if (!t) throw new Error(`randomWeightSource: no float tensor ${name}`);
      return t;
    },
    async getNF4(name) {
      const t = nf4.get(name);
      if (!t) throw new Error(`randomWeightSource: no NF4 tensor ${name}`);
      return t;
    },
  };
}
