// Independent float64 whole-model forward (plain loops, own NF4 decode) that tests hold the Stage against.
//
// Deliberately shares no compute code with stage.ts or any backend: only the rope inverse frequencies
// (tested on their own) and the WeightSource. Slow: meant for models with a few thousand parameters per layer.
import type { NF4Weight } from '../formats/nf4.ts';
import type { LoraTarget, NamedTensor, WeightSource } from '../types.ts';
import { ropeInvFreq } from './rope.ts';

// bitsandbytes NF4 code table (facts §1), index = 4-bit code
const NF4_LUT = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
].map(Math.fround);

/** Block b's absmax: float32 as stored, or bitsandbytes double quantization decoded as bitsandbytes does it
 *  (dequantize_blockwise: float32 code·nested_absmax; then absmax += offset in float32). */
function blockAbsmax(w: NF4Weight, b: number): number {
  const a = w.absmax;
  if (a instanceof Float32Array) return a[b];
  const scaled = Math.fround(a.code[a.codes[b]] * a.nestedAbsmax[Math.floor(b / a.nestedBlocksize)]);
  return Math.fround(scaled + a.offset);
}

/** NF4 weight → float64 [rows*cols] (flat blocks, element 2j in the high nibble) */
export function dequantNF4F64(w: NF4Weight): Float64Array {
  const n = w.rows * w.cols;
  const out = new Float64Array(n);
  let block = -1, absmax = 0;
  for (let i = 0; i < n; i++) {
    const byte = w.packed[i >> 1];
    const code = (i & 1) === 0 ? byte >> 4 : byte & 0xf;
    const b = Math.floor(i / w.blocksize);
    if (b !== block) { block = b; absmax = blockAbsmax(w, b); }
    out[i] = NF4_LUT[code] * absmax;
  }
  return out;
}

export interface ReferenceLora {
  /** LoRA tensors by PEFT name (a stage's params) */
  params: NamedTensor[];
  scaling: number;
}

/** y[T, out] = x[T, in] · Wᵀ (float64) */
function linear(x: Float64Array, T: number, W: Float64Array, out: number, inF: number): Float64Array {
  const y = new Float64Array(T * out);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < out; j++) {
      let acc = 0;
      for (let i = 0; i < inF; i++) acc += x[t * inF + i] * W[j * inF + i];
      y[t * out + j] = acc;
    }
  }
  return y;
}

function rmsnorm(x: Float64Array, T: number, C: number, w: Float32Array, eps: number): Float64Array {
  const y = new Float64Array(T * C);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let c = 0; c < C; c++) ss += x[t * C + c] ** 2;
    const r = 1 / Math.sqrt(ss / C + eps);
    for (let c = 0; c < C; c++) y[t * C + c] = x[t * C + c] * r * w[c];
  }
  return y;
}

/** HF rotate_half rope on x[T, nH, D] in place, position of token t = t % S */
function rope(x: Float64Array, T: number, S: number, nH: number, D: number, inv: Float64Array): void {
  const half = D / 2;
  for (let t = 0; t < T; t++) {
    const p = t % S;
    for (let h = 0; h < nH; h++) {
      const o = (t * nH + h) * D;
      for (let i = 0; i < half; i++) {
        const a = p * inv[i];
        const c = Math.cos(a), s = Math.sin(a);
        const x1 = x[o + i], x2 = x[o + i + half];
        x[o + i] = x1 * c - x2 * s;
        x[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
}

/** Logits [B*S, V] in float64 of the whole model, LoRA applied without dropout. */
export async function referenceLogits(source: WeightSource, ids: Int32Array, B: number, S: number,
  lora?: ReferenceLora): Promise<Float64Array> {
  const cfg = source.config;
  const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
  const V = cfg.vocabSize, eps = cfg.rmsNormEps;
  const T = B * S;
  const inv = ropeInvFreq(cfg);
  const loraByName = new Map((lora?.params ?? []).map((p) => [p.name, p.data]));

  const proj = async (x: Float64Array, layer: number, module: LoraTarget, group: string, out: number, inF: number) => {
    const base = `model.layers.${layer}.${group}.${module}`;
    const W = dequantNF4F64(await source.getNF4(`${base}.weight`));
    const y = linear(x, T, W, out, inF);
    if (source.has(`${base}.bias`)) {
      const b = await source.getFloat(`${base}.bias`);
      for (let t = 0; t < T; t++) for (let j = 0; j < out; j++) y[t * out + j] += b[j];
    }
    const A = loraByName.get(`base_model.model.${base}.lora_A.weight`);
    const Bm = loraByName.get(`base_model.model.${base}.lora_B.weight`);
    if (A && Bm && lora) {
      const r = A.length / inF;
      const ax = linear(x, T, Float64Array.from(A), r, inF);
      const bax = linear(ax, T, Float64Array.from(Bm), out, r);
      for (let i = 0; i < y.length; i++) y[i] += lora.scaling * bax[i];
    }
    return y;
  };

  const embed = await source.getFloat('model.embed_tokens.weight');
  let x = new Float64Array(T * C);
  for (let t = 0; t < T; t++) {
    if (ids[t] < 0 || ids[t] >= V) throw new RangeError(`referenceLogits: ids[${t}] = ${ids[t]} outside [0, ${V})`);
    for (let c = 0; c < C; c++) x[t * C + c] = embed[ids[t] * C + c];
  }
  const group = H / KV;
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    const h1 = rmsnorm(x, T, C, await source.getFloat(`model.layers.${l}.input_layernorm.weight`), eps);
    const q = await proj(h1, l, 'q_proj', 'self_attn', H * D, C);
    const k = await proj(h1, l, 'k_proj', 'self_attn', KV * D, C);
    const v = await proj(h1, l, 'v_proj', 'self_attn', KV * D, C);
    rope(q, T, S, H, D, inv);
    rope(k, T, S, KV, D, inv);
    const att = new Float64Array(T * H * D);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / group);
        for (let i = 0; i < S; i++) {
          const ti = b * S + i;
          const sc = new Float64Array(i + 1);
          let mx = -Infinity;
          for (let j = 0; j <= i; j++) {
            const tj = b * S + j;
            let d = 0;
            for (let e = 0; e < D; e++) d += q[(ti * H + h) * D + e] * k[(tj * KV + kh) * D + e];
            sc[j] = d / Math.sqrt(D);
            mx = Math.max(mx, sc[j]);
          }
          let sum = 0;
          for (let j = 0; j <= i; j++) { sc[j] = Math.exp(sc[j] - mx); sum += sc[j]; }
          for (let j = 0; j <= i; j++) {
            const tj = b * S + j;
            for (let e = 0; e < D; e++) att[(ti * H + h) * D + e] += (sc[j] / sum) * v[(tj * KV + kh) * D + e];
          }
        }
      }
    }
    const o = await proj(att, l, 'o_proj', 'self_attn', C, H * D);
    for (let i = 0; i < x.length; i++) x[i] += o[i];
    const h2 = rmsnorm(x, T, C, await source.getFloat(`model.layers.${l}.post_attention_layernorm.weight`), eps);
    const I = cfg.intermediateSize;
    const g = await proj(h2, l, 'gate_proj', 'mlp', I, C);
    const u = await proj(h2, l, 'up_proj', 'mlp', I, C);
    const a = new Float64Array(T * I);
    for (let i = 0; i < a.length; i++) a[i] = (g[i] / (1 + Math.exp(-g[i]))) * u[i];
    const m = await proj(a, l, 'down_proj', 'mlp', C, I);
    const nx = new Float64Array(T * C);
    for (let i = 0; i < nx.length; i++) nx[i] = x[i] + m[i];
    x = nx;
  }
  const hN = rmsnorm(x, T, C, await source.getFloat('model.norm.weight'), eps);
  const head = cfg.tieWordEmbeddings ? embed : await source.getFloat('lm_head.weight');
  return linear(hN, T, Float64Array.from(head), V, C);
}

/** Σ token cross-entropy over labels ≠ -100, and their count (float64) */
export function referenceLoss(logits: Float64Array, labels: Int32Array, V: number): { lossSum: number; tokens: number } {
  let lossSum = 0, tokens = 0;
  for (let t = 0; t < labels.length; t++) {
    const l = labels[t];
    if (l === -100) continue;
    let mx = -Infinity;
    for (let j = 0; j < V; j++) mx = Math.max(mx, logits[t * V + j]);
    let s = 0;
    for (let j = 0; j < V; j++) s += Math.exp(logits[t * V + j] - mx);
    lossSum += mx + Math.log(s) - logits[t * V + l];
    tokens++;
  }
  return { lossSum, tokens };
}
