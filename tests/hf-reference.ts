// An independent float64 forward of the decoder families, written from the Hugging Face modeling equations
// (transformers' modeling_llama.py, modeling_qwen3.py and modeling_phi3.py), for tests to hold the engine against.
//
// It reads the raw config.json keys itself and shares no code with engine/: its own NF4 decode (the
// bitsandbytes table), its own rope, norms, attention and loss. Slow plain loops; for models of a few
// thousand parameters per layer.
//
// The equations (HF names):
//   x = embed_tokens[ids]
//   per layer: h = input_layernorm(x); q = q_proj(h), k = k_proj(h), v = v_proj(h)      (+ LoRA on each linear)
//     Qwen3: q = q_norm(q.view(.., heads, head_dim)), k = k_norm(k.view(.., kv_heads, head_dim))
//     q, k = apply_rotary_pos_emb(q, k, cos, sin) (rotate_half over head_dim); attention = softmax(q·kᵀ/√head_dim + causal)·v
//     x = x + o_proj(attention); h = post_attention_layernorm(x); x = x + down_proj(silu(gate_proj(h)) * up_proj(h))
//     Phi-3: qkv = qkv_proj(h); q = qkv[..., :heads·head_dim], k = the next kv_heads·head_dim, v = the rest;
//     gate, up = gate_up_proj(h).chunk(2, dim=-1); mlp = down_proj(up * silu(gate)); longrope: inv_freq =
//     1 / (ext_factors · theta^(2i/D)), ext = long_factor when max(position)+1 > original_max_position_embeddings
//     else short_factor, cos and sin times attention_factor (default √(1 + ln(max/original) / ln(original)))
//   logits = lm_head(norm(x)) (lm_head = embed_tokens when tied)
//   RMSNorm(x) = w * x / sqrt(mean(x²) + eps)
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { decodeAbsmax } from '../engine/formats/nf4.ts';
import type { NamedTensor, WeightSource } from '../engine/types.ts';

// bitsandbytes NF4 code table, index = 4-bit code (facts §1)
const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
].map(Math.fround);

/** flat blocks of `blocksize`, element 2j in the high nibble of byte j */
export function nf4ToF64(w: NF4Weight): Float64Array {
  const n = w.rows * w.cols;
  const out = new Float64Array(n);
  // a double-quantized absmax is decoded first (bitsandbytes' float32 code * nested + offset)
  const absmax = decodeAbsmax(w.absmax);
  for (let i = 0; i < n; i++) {
    const b = w.packed[i >> 1];
    out[i] = NF4[i % 2 === 0 ? b >> 4 : b & 15] * absmax[Math.floor(i / w.blocksize)]!;
  }
  return out;
}

const num = (raw: Raw, k: string, d?: number): number => {
  const v = raw[k] ?? d;
  if (typeof v !== 'number') throw new Error(`hf-reference: config has no number "${k}"`);
  return v;
};

export type Raw = Record<string, unknown>;
export const rawNum = (raw: Raw, k: string, d?: number): number => num(raw, k, d);

export interface RefLora { params: NamedTensor[]; scaling: number }

export interface RefInput {
  /** token ids [B*S] (from the embedding), or hidden [B*S, C] entering layer `fromLayer` */
  ids?: Int32Array;
  hidden?: Float64Array | Float32Array;
  fromLayer?: number;
  B: number;
  S: number;
  /** position ids [B*S] (default: t mod S; a packed row restarts them per example) */
  positions?: Int32Array;
}

export function matmulT(x: Float64Array, T: number, W: ArrayLike<number>, out: number, inF: number): Float64Array {
  const y = new Float64Array(T * out);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < out; j++) {
      let a = 0;
      for (let i = 0; i < inF; i++) a += x[t * inF + i] * W[j * inF + i];
      y[t * out + j] = a;
    }
  }
  return y;
}

export function rmsNorm(x: Float64Array, rows: number, n: number, w: ArrayLike<number>, eps: number): Float64Array {
  const y = new Float64Array(rows * n);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let c = 0; c < n; c++) ss += x[r * n + c] ** 2;
    const inv = 1 / Math.sqrt(ss / n + eps);
    for (let c = 0; c < n; c++) y[r * n + c] = w[c] * x[r * n + c] * inv;
  }
  return y;
}

/** Float64 logits [B*S, V] of the model in `src` (its config's raw JSON says the family), LoRA without dropout. */
export async function hfLogits(src: WeightSource, input: RefInput, lora?: RefLora): Promise<Float64Array> {
  const raw = src.config.raw;
  const type = String(raw.model_type);
  if (type !== 'llama' && type !== 'qwen3' && type !== 'qwen2' && type !== 'mistral' && type !== 'phi3') throw new Error(`hf-reference: no equations for ${type}`);
  const C = num(raw, 'hidden_size'), H = num(raw, 'num_attention_heads'), KV = num(raw, 'num_key_value_heads', H);
  const D = num(raw, 'head_dim', C / H), I = num(raw, 'intermediate_size'), V = num(raw, 'vocab_size');
  const L = num(raw, 'num_hidden_layers'), eps = num(raw, 'rms_norm_eps'), theta = num(raw, 'rope_theta', 10000);
  const tied = raw.tie_word_embeddings === true;
  const { B, S } = input;
  const T = B * S;
  const loraOf = new Map((lora?.params ?? []).map((p) => [p.name, p.data]));
  const f = async (name: string) => Float64Array.from(await src.getFloat(name));

  const linear = async (x: Float64Array, base: string, out: number, inF: number): Promise<Float64Array> => {
    const y = matmulT(x, T, nf4ToF64(await src.getNF4(`${base}.weight`)), out, inF);
    if (src.has(`${base}.bias`)) {
      const b = await src.getFloat(`${base}.bias`);
      for (let t = 0; t < T; t++) for (let j = 0; j < out; j++) y[t * out + j] += b[j];
    }
    const A = loraOf.get(`base_model.model.${base}.lora_A.weight`), Bm = loraOf.get(`base_model.model.${base}.lora_B.weight`);
    if (A && Bm) {
      const r = A.length / inF;
      const bax = matmulT(matmulT(x, T, A, r, inF), T, Bm, out, r);
      for (let i = 0; i < y.length; i++) y[i] += lora!.scaling * bax[i];
    }
    return y;
  };
  // rotate_half with emb = cat(freqs, freqs): pairs (i, i + D/2); inv_freq = 1 / theta^(2i/D)
  const positions = input.positions ?? Int32Array.from({ length: T }, (_, t) => t % S);
  const rs = (raw.rope_scaling ?? null) as Raw | null;
  const rsType = rs ? rs.rope_type ?? rs.type : null;
  let ext: number[] | null = null, ropeScale = 1;
  if (rs && (rsType === 'longrope' || rsType === 'su')) {
    const maxPos = num(raw, 'max_position_embeddings'), orig = num(raw, 'original_max_position_embeddings', maxPos);
    ext = (Math.max(...positions) + 1 > orig ? rs.long_factor : rs.short_factor) as number[];
    ropeScale = maxPos / orig <= 1 ? 1 : Math.sqrt(1 + Math.log(maxPos / orig) / Math.log(orig));
  } else if (rs && rsType !== 'default') throw new Error(`hf-reference: no rope equations for ${String(rsType)}`);
  const rope = (x: Float64Array, nH: number) => {
    for (let t = 0; t < T; t++) {
      const p = positions[t];
      for (let h = 0; h < nH; h++) {
        const o = (t * nH + h) * D;
        for (let i = 0; i < D / 2; i++) {
          const a = p / ((ext ? ext[i] : 1) * theta ** ((2 * i) / D));
          const c = Math.cos(a) * ropeScale, sn = Math.sin(a) * ropeScale;
          const x1 = x[o + i], x2 = x[o + i + D / 2];
          x[o + i] = x1 * c - x2 * sn;
          x[o + i + D / 2] = x2 * c + x1 * sn;
        }
      }
    }
  };

  let x: Float64Array;
  const from = input.fromLayer ?? 0;
  if (input.ids) {
    const E = await src.getFloat('model.embed_tokens.weight');
    x = new Float64Array(T * C);
    for (let t = 0; t < T; t++) for (let c = 0; c < C; c++) x[t * C + c] = E[input.ids[t] * C + c];
  } else {
    x = Float64Array.from(input.hidden!);
  }
  for (let l = from; l < L; l++) {
    const p = `model.layers.${l}`;
    const h = rmsNorm(x, T, C, await f(`${p}.input_layernorm.weight`), eps);
    let q: Float64Array, k: Float64Array, v: Float64Array;
    if (type === 'phi3') {
      const F = (H + 2 * KV) * D;
      const qkv = await linear(h, `${p}.self_attn.qkv_proj`, F, C);
      const cols = (c0: number, n: number) => {
        const y = new Float64Array(T * n);
        for (let t = 0; t < T; t++) for (let j = 0; j < n; j++) y[t * n + j] = qkv[t * F + c0 + j];
        return y;
      };
      q = cols(0, H * D); k = cols(H * D, KV * D); v = cols(H * D + KV * D, KV * D);
    } else {
      q = await linear(h, `${p}.self_attn.q_proj`, H * D, C);
      k = await linear(h, `${p}.self_attn.k_proj`, KV * D, C);
      v = await linear(h, `${p}.self_attn.v_proj`, KV * D, C);
    }
    if (type === 'qwen3') {
      q = rmsNorm(q, T * H, D, await f(`${p}.self_attn.q_norm.weight`), eps);
      k = rmsNorm(k, T * KV, D, await f(`${p}.self_attn.k_norm.weight`), eps);
    }
    rope(q, H);
    rope(k, KV);
    const att = new Float64Array(T * H * D);
    for (let b = 0; b < B; b++) {
      for (let hh = 0; hh < H; hh++) {
        const kh = Math.floor(hh / (H / KV));
        for (let i = 0; i < S; i++) {
          const w = new Float64Array(i + 1);
          for (let j = 0; j <= i; j++) {
            let d = 0;
            for (let e = 0; e < D; e++) d += q[((b * S + i) * H + hh) * D + e] * k[((b * S + j) * KV + kh) * D + e];
            w[j] = d / Math.sqrt(D);
          }
          const m = Math.max(...w);
          let z = 0;
          for (let j = 0; j <= i; j++) z += Math.exp(w[j] - m);
          for (let j = 0; j <= i; j++) {
            const pj = Math.exp(w[j] - m) / z;
            for (let e = 0; e < D; e++) att[((b * S + i) * H + hh) * D + e] += pj * v[((b * S + j) * KV + kh) * D + e];
          }
        }
      }
    }
    const o = await linear(att, `${p}.self_attn.o_proj`, C, H * D);
    for (let i = 0; i < x.length; i++) x[i] += o[i];
    const h2 = rmsNorm(x, T, C, await f(`${p}.post_attention_layernorm.weight`), eps);
    let g: Float64Array, u: Float64Array;
    if (type === 'phi3') {
      const gu = await linear(h2, `${p}.mlp.gate_up_proj`, 2 * I, C);
      g = new Float64Array(T * I); u = new Float64Array(T * I);
      for (let t = 0; t < T; t++) for (let j = 0; j < I; j++) { g[t * I + j] = gu[t * 2 * I + j]; u[t * I + j] = gu[t * 2 * I + I + j]; }
    } else {
      g = await linear(h2, `${p}.mlp.gate_proj`, I, C); u = await linear(h2, `${p}.mlp.up_proj`, I, C);
    }
    const a = g.map((gi, i) => (gi / (1 + Math.exp(-gi))) * u[i]);
    const dn = await linear(a, `${p}.mlp.down_proj`, C, I);
    for (let i = 0; i < x.length; i++) x[i] += dn[i];
  }
  const hN = rmsNorm(x, T, C, await f('model.norm.weight'), eps);
  return matmulT(hN, T, await src.getFloat(tied ? 'model.embed_tokens.weight' : 'lm_head.weight'), V, C);
}

/** Σ of token cross-entropies over labels ≠ -100 (float64) */
export function hfLossSum(logits: Float64Array, labels: Int32Array, V: number): number {
  let sum = 0;
  for (let t = 0; t < labels.length; t++) {
    if (labels[t] === -100) continue;
    const row = logits.subarray(t * V, (t + 1) * V);
    const m = Math.max(...row);
    let z = 0;
    for (const v of row) z += Math.exp(v - m);
    sum += m + Math.log(z) - row[labels[t]];
  }
  return sum;
}
