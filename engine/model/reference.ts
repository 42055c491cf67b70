// Independent float64 whole-model forward (plain loops, own NF4 decode) that tests hold the Stage against.
//
// Deliberately shares no compute code with stage.ts or any backend: only the rope inverse frequencies
// (tested on their own) and the WeightSource. Slow: meant for models with a few thousand parameters per layer.
import type { NF4Weight } from '../formats/nf4.ts';
import type { LayerLinear, LoraTarget, NamedTensor, WeightSource } from '../types.ts';
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
  /** LoRA tensors by PEFT name (a stage's params; float32 or float64 values) */
  params: ReadonlyArray<Pick<NamedTensor, 'name'> & { data: ArrayLike<number> }>;
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

/** HF rotate_half rope on x[T, nH, D] in place, position of token t = t % S; `direction` -1 rotates by
 *  the negative angle, the transposed rotation, which is rope's gradient. */
function rope(x: Float64Array, T: number, S: number, nH: number, D: number, inv: Float64Array, direction: 1 | -1 = 1): void {
  const half = D / 2;
  for (let t = 0; t < T; t++) {
    const p = t % S;
    for (let h = 0; h < nH; h++) {
      const o = (t * nH + h) * D;
      for (let i = 0; i < half; i++) {
        const a = p * inv[i];
        const c = Math.cos(a), s = direction * Math.sin(a);
        const x1 = x[o + i], x2 = x[o + i + half];
        x[o + i] = x1 * c - x2 * s;
        x[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
}

/** This reference models the Llama linears and rope tables without longrope's cos/sin scale: Phi-3 is
 *  checked against tests/hf-reference.ts instead. */
function refuseUnmodelled(cfg: WeightSource['config']): void {
  if (cfg.modelType === 'phi3' || cfg.ropeScaling?.ropeType === 'longrope') {
    throw new Error(`reference: ${cfg.modelType} (fused linears / longrope) is not modelled by engine/model/reference.ts`);
  }
}

/** Logits [B*S, V] in float64 of the whole model, LoRA applied without dropout. */
export async function referenceLogits(source: WeightSource, ids: Int32Array, B: number, S: number,
  lora?: ReferenceLora): Promise<Float64Array> {
  const cfg = source.config;
  refuseUnmodelled(cfg);
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

/** dx[T, in] = dy[T, out] · W (float64) */
function linearBackwardInput(dy: Float64Array, T: number, W: Float64Array, out: number, inF: number): Float64Array {
  const dx = new Float64Array(T * inF);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < out; j++) {
      const g = dy[t * out + j];
      if (g === 0) continue;
      for (let i = 0; i < inF; i++) dx[t * inF + i] += g * W[j * inF + i];
    }
  }
  return dx;
}

/** dW[out, in] += dyᵀ · x (float64) */
function linearBackwardWeight(dW: Float64Array, dy: Float64Array, x: Float64Array, T: number, out: number, inF: number): void {
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < out; j++) {
      const g = dy[t * out + j];
      if (g === 0) continue;
      for (let i = 0; i < inF; i++) dW[j * inF + i] += g * x[t * inF + i];
    }
  }
}

/** dx of y = x·r·w with r = 1/sqrt(mean(x²) + eps) (w frozen): dx = r·w·dy − x·r³/C·Σ_c dy_c·w_c·x_c */
function rmsnormBackward(dy: Float64Array, x: Float64Array, T: number, C: number, w: Float32Array, eps: number): Float64Array {
  const dx = new Float64Array(T * C);
  for (let t = 0; t < T; t++) {
    let ss = 0, dot = 0;
    for (let c = 0; c < C; c++) {
      ss += x[t * C + c] ** 2;
      dot += dy[t * C + c] * w[c] * x[t * C + c];
    }
    const r = 1 / Math.sqrt(ss / C + eps);
    for (let c = 0; c < C; c++) dx[t * C + c] = r * w[c] * dy[t * C + c] - x[t * C + c] * r * r * r * dot / C;
  }
  return dx;
}


export interface ReferenceLossGrads {
  /** Σ token cross-entropy over labels ≠ -100 */
  lossSum: number;
  tokens: number;
  /** d lossSum / d param for every LoRA tensor of `lora.params`, by PEFT name */
  grads: Map<string, Float64Array>;
}

/** Loss and LoRA gradients of the whole model in float64 (plain loops; no dropout): the forward of
 *  referenceLogits with every activation kept, then a hand-written backward — softmax cross-entropy, the head,
 *  RMSNorm, the linears with their LoRA branch (dB += s·dyᵀ·(x·Aᵀ), dA += s·(dy·B)ᵀ·x), SwiGLU, causal GQA
 *  attention and RoPE. Frozen weights get no gradient. Slow: meant for models of a few hundred thousand
 *  parameters (tests/train-dq-ref.test.ts checks it by finite differences). */
export async function referenceLossGrads(source: WeightSource, ids: Int32Array, labels: Int32Array, B: number, S: number,
  lora: ReferenceLora): Promise<ReferenceLossGrads> {
  const cfg = source.config;
  const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
  const V = cfg.vocabSize, eps = cfg.rmsNormEps, I = cfg.intermediateSize;
  const T = B * S, group = H / KV;
  refuseUnmodelled(cfg);
  if (ids.length !== T || labels.length !== T) throw new RangeError(`referenceLossGrads: ids/labels must have B*S = ${T} entries`);
  const inv = ropeInvFreq(cfg);
  const params = new Map(lora.params.map((p) => [p.name, p.data]));
  const grads = new Map(lora.params.map((p) => [p.name, new Float64Array(p.data.length)]));
  const weights = new Map<string, Float64Array>();
  const weight = async (name: string) => {
    let w = weights.get(name);
    if (!w) { w = dequantNF4F64(await source.getNF4(name)); weights.set(name, w); }
    return w;
  };

  interface ProjSaved { x: Float64Array; ax: Float64Array | null }
  const projName = (l: number, group2: string, module: LoraTarget) => `model.layers.${l}.${group2}.${module}`;
  const proj = async (x: Float64Array, base: string, out: number, inF: number): Promise<{ y: Float64Array; saved: ProjSaved }> => {
    const y = linear(x, T, await weight(`${base}.weight`), out, inF);
    if (source.has(`${base}.bias`)) {
      const b = await source.getFloat(`${base}.bias`);
      for (let t = 0; t < T; t++) for (let j = 0; j < out; j++) y[t * out + j] += b[j];
    }
    const A = params.get(`base_model.model.${base}.lora_A.weight`), Bm = params.get(`base_model.model.${base}.lora_B.weight`);
    let ax: Float64Array | null = null;
    if (A && Bm) {
      const r = A.length / inF;
      ax = linear(x, T, Float64Array.from(A), r, inF);
      const bax = linear(ax, T, Float64Array.from(Bm), out, r);
      for (let i = 0; i < y.length; i++) y[i] += lora.scaling * bax[i];
    }
    return { y, saved: { x, ax } };
  };
  // dx of one projection; accumulates its LoRA gradients
  const projBackward = async (dy: Float64Array, base: string, saved: ProjSaved, out: number, inF: number): Promise<Float64Array> => {
    const dx = linearBackwardInput(dy, T, await weight(`${base}.weight`), out, inF);
    const nameA = `base_model.model.${base}.lora_A.weight`, nameB = `base_model.model.${base}.lora_B.weight`;
    const A = params.get(nameA), Bm = params.get(nameB);
    if (A && Bm && saved.ax) {
      const r = A.length / inF, s = lora.scaling;
      const sdy = Float64Array.from(dy, (g) => g * s);
      linearBackwardWeight(grads.get(nameB)!, sdy, saved.ax, T, out, r);   // dB += s·dyᵀ·(x·Aᵀ)
      const dax = linearBackwardInput(sdy, T, Float64Array.from(Bm), out, r); // s·dy·B
      linearBackwardWeight(grads.get(nameA)!, dax, saved.x, T, r, inF);     // dA += (s·dy·B)ᵀ·x
      const dxl = linearBackwardInput(dax, T, Float64Array.from(A), r, inF);
      for (let i = 0; i < dx.length; i++) dx[i] += dxl[i];
    }
    return dx;
  };

  const embed = await source.getFloat('model.embed_tokens.weight');
  let x = new Float64Array(T * C);
  for (let t = 0; t < T; t++) {
    if (ids[t] < 0 || ids[t] >= V) throw new RangeError(`referenceLossGrads: ids[${t}] = ${ids[t]} outside [0, ${V})`);
    for (let c = 0; c < C; c++) x[t * C + c] = embed[ids[t] * C + c];
  }
  interface LayerSaved {
    xIn: Float64Array; x2: Float64Array; q: Float64Array; k: Float64Array; v: Float64Array; P: Float64Array[];
    g: Float64Array; u: Float64Array; saved: Record<LayerLinear, ProjSaved>;
  }
  const layers: LayerSaved[] = [];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    const w1 = await source.getFloat(`model.layers.${l}.input_layernorm.weight`);
    const h1 = rmsnorm(x, T, C, w1, eps);
    const qp = await proj(h1, projName(l, 'self_attn', 'q_proj'), H * D, C);
    const kp = await proj(h1, projName(l, 'self_attn', 'k_proj'), KV * D, C);
    const vp = await proj(h1, projName(l, 'self_attn', 'v_proj'), KV * D, C);
    const q = qp.y, k = kp.y, v = vp.y;
    rope(q, T, S, H, D, inv);
    rope(k, T, S, KV, D, inv);
    const att = new Float64Array(T * H * D);
    const P: Float64Array[] = [];  // per (b, h): S×S lower-triangular probabilities
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / group);
        const p = new Float64Array(S * S);
        for (let i = 0; i < S; i++) {
          const ti = b * S + i;
          let mx = -Infinity;
          for (let j = 0; j <= i; j++) {
            const tj = b * S + j;
            let d = 0;
            for (let e = 0; e < D; e++) d += q[(ti * H + h) * D + e] * k[(tj * KV + kh) * D + e];
            p[i * S + j] = d / Math.sqrt(D);
            mx = Math.max(mx, p[i * S + j]);
          }
          let sum = 0;
          for (let j = 0; j <= i; j++) { p[i * S + j] = Math.exp(p[i * S + j] - mx); sum += p[i * S + j]; }
          for (let j = 0; j <= i; j++) {
            p[i * S + j] /= sum;
            const tj = b * S + j;
            for (let e = 0; e < D; e++) att[(ti * H + h) * D + e] += p[i * S + j] * v[(tj * KV + kh) * D + e];
          }
        }
        P.push(p);
      }
    }
    const op = await proj(att, projName(l, 'self_attn', 'o_proj'), C, H * D);
    const x2 = new Float64Array(T * C);
    for (let i = 0; i < x2.length; i++) x2[i] = x[i] + op.y[i];
    const h2 = rmsnorm(x2, T, C, await source.getFloat(`model.layers.${l}.post_attention_layernorm.weight`), eps);
    const gp = await proj(h2, projName(l, 'mlp', 'gate_proj'), I, C);
    const up = await proj(h2, projName(l, 'mlp', 'up_proj'), I, C);
    const g = gp.y, u = up.y;
    const a = new Float64Array(T * I);
    for (let i = 0; i < a.length; i++) a[i] = (g[i] / (1 + Math.exp(-g[i]))) * u[i];
    const mp = await proj(a, projName(l, 'mlp', 'down_proj'), C, I);
    const nx = new Float64Array(T * C);
    for (let i = 0; i < nx.length; i++) nx[i] = x2[i] + mp.y[i];
    layers.push({ xIn: x, x2, q, k, v, P, g, u,
      saved: { q_proj: qp.saved, k_proj: kp.saved, v_proj: vp.saved, o_proj: op.saved, gate_proj: gp.saved, up_proj: up.saved, down_proj: mp.saved } });
    x = nx;
  }
  const wN = await source.getFloat('model.norm.weight');
  const hN = rmsnorm(x, T, C, wN, eps);
  const head = Float64Array.from(cfg.tieWordEmbeddings ? embed : await source.getFloat('lm_head.weight'));
  const logits = linear(hN, T, head, V, C);
  const { lossSum, tokens } = referenceLoss(logits, labels, V);
  // d lossSum / d logits = softmax − onehot on labeled tokens
  const dlogits = new Float64Array(T * V);
  for (let t = 0; t < T; t++) {
    const lab = labels[t];
    if (lab === -100) continue;
    let mx = -Infinity;
    for (let j = 0; j < V; j++) mx = Math.max(mx, logits[t * V + j]);
    let s = 0;
    for (let j = 0; j < V; j++) s += Math.exp(logits[t * V + j] - mx);
    for (let j = 0; j < V; j++) dlogits[t * V + j] = Math.exp(logits[t * V + j] - mx) / s;
    dlogits[t * V + lab] -= 1;
  }
  let dx = rmsnormBackward(linearBackwardInput(dlogits, T, head, V, C), x, T, C, wN, eps);
  for (let l = cfg.numHiddenLayers - 1; l >= 0; l--) {
    const L = layers[l];
    // x_out = x2 + down(silu(gate(h2)) * up(h2))
    const da = await projBackward(dx, projName(l, 'mlp', 'down_proj'), L.saved.down_proj, C, I);
    const dg = new Float64Array(T * I), du = new Float64Array(T * I);
    for (let i = 0; i < da.length; i++) {
      const sg = 1 / (1 + Math.exp(-L.g[i]));
      du[i] = da[i] * L.g[i] * sg;
      dg[i] = da[i] * L.u[i] * sg * (1 + L.g[i] * (1 - sg));
    }
    const dh2 = await projBackward(dg, projName(l, 'mlp', 'gate_proj'), L.saved.gate_proj, I, C);
    const dh2u = await projBackward(du, projName(l, 'mlp', 'up_proj'), L.saved.up_proj, I, C);
    for (let i = 0; i < dh2.length; i++) dh2[i] += dh2u[i];
    const dx2 = rmsnormBackward(dh2, L.x2, T, C, await source.getFloat(`model.layers.${l}.post_attention_layernorm.weight`), eps);
    for (let i = 0; i < dx2.length; i++) dx2[i] += dx[i];
    // x2 = x_in + o_proj(attention(rope(q), rope(k), v))
    const datt = await projBackward(dx2, projName(l, 'self_attn', 'o_proj'), L.saved.o_proj, C, H * D);
    const dq = new Float64Array(T * H * D), dk = new Float64Array(T * KV * D), dv = new Float64Array(T * KV * D);
    const scale = 1 / Math.sqrt(D);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const kh = Math.floor(h / group);
        const p = L.P[b * H + h];
        for (let i = 0; i < S; i++) {
          const ti = b * S + i;
          const dp = new Float64Array(i + 1);
          let rowDot = 0;
          for (let j = 0; j <= i; j++) {
            const tj = b * S + j;
            let d = 0;
            for (let e = 0; e < D; e++) {
              d += datt[(ti * H + h) * D + e] * L.v[(tj * KV + kh) * D + e];
              dv[(tj * KV + kh) * D + e] += p[i * S + j] * datt[(ti * H + h) * D + e];
            }
            dp[j] = d;
            rowDot += p[i * S + j] * d;
          }
          for (let j = 0; j <= i; j++) {
            const ds = p[i * S + j] * (dp[j] - rowDot) * scale;
            const tj = b * S + j;
            for (let e = 0; e < D; e++) {
              dq[(ti * H + h) * D + e] += ds * L.k[(tj * KV + kh) * D + e];
              dk[(tj * KV + kh) * D + e] += ds * L.q[(ti * H + h) * D + e];
            }
          }
        }
      }
    }
    rope(dq, T, S, H, D, inv, -1);
    rope(dk, T, S, KV, D, inv, -1);
    const dh1 = await projBackward(dq, projName(l, 'self_attn', 'q_proj'), L.saved.q_proj, H * D, C);
    const dh1k = await projBackward(dk, projName(l, 'self_attn', 'k_proj'), L.saved.k_proj, KV * D, C);
    const dh1v = await projBackward(dv, projName(l, 'self_attn', 'v_proj'), L.saved.v_proj, KV * D, C);
    for (let i = 0; i < dh1.length; i++) dh1[i] += dh1k[i] + dh1v[i];
    const dxIn = rmsnormBackward(dh1, L.xIn, T, C, await source.getFloat(`model.layers.${l}.input_layernorm.weight`), eps);
    for (let i = 0; i < dxIn.length; i++) dxIn[i] += dx2[i];
    dx = dxIn;
  }
  return { lossSum, tokens, grads };
}
