// An independent float64 forward of Gemma-2 and Gemma-3 text, written from transformers' modeling_gemma2.py and
// modeling_gemma3.py (Gemma2ForCausalLM / Gemma3ForCausalLM), for tests to hold the engine against. It reads the raw
// config.json keys itself with the config classes' defaults and shares no code with engine/ (only the NF4 decode and
// plain matmul / RMSNorm loops of tests/hf-reference.ts).
//
// The equations (HF names):
//   x = embed_tokens[ids] · hidden_size**0.5                                   (Gemma2Model / Gemma3TextScaledWordEmbedding)
//   Gemma RMSNorm(x) = x / sqrt(mean(x²) + eps) · (1 + weight)
//   per layer (Gemma2DecoderLayer / Gemma3DecoderLayer):
//     h = input_layernorm(x); q, k, v = q_proj(h), k_proj(h), v_proj(h)            (+ LoRA on each linear)
//     Gemma-3: q = q_norm(q per head), k = k_norm(k per head)
//     rope: Gemma-2 rope_theta everywhere; Gemma-3 rope_local_base_freq on sliding layers, rope_theta (and
//       rope_scaling, linear: inv_freq / factor) on full ones
//     w = q·kᵀ · query_pre_attn_scalar**-0.5; attn_logit_softcapping: w = tanh(w / cap) · cap;
//       causal mask, and on sliding layers only keys kv_idx > q_idx − sliding_window; softmax; · v
//     x = x + post_attention_layernorm(o_proj(attention))
//     x = x + post_feedforward_layernorm(down_proj(gelu_tanh(gate_proj(h2)) · up_proj(h2))), h2 = pre_feedforward_layernorm(x)
//   Sliding layers: Gemma-2 `not bool(layer_idx % 2)`; Gemma-3 `bool((layer_idx + 1) % sliding_window_pattern)`
//     (default 6); config.layer_types overrides both.
//   logits = lm_head(norm(x)) (lm_head = embed_tokens, tied by default); final_logit_softcapping: tanh(l / cap) · cap
//   Defaults: Gemma-2 attn cap 50, final cap 30; Gemma-3 none; query_pre_attn_scalar 256; sliding_window 4096.
import type { WeightSource } from '../engine/types.ts';
import type { Raw, RefInput, RefLora } from './hf-reference.ts';
import { matmulT, nf4ToF64, rawNum } from './hf-reference.ts';

const keyOr = (raw: Raw, k: string, d: number | null): number | null => (raw[k] === undefined ? d : (raw[k] as number | null));

function gemmaNorm(x: Float64Array, rows: number, n: number, w: ArrayLike<number>, eps: number): Float64Array {
  const y = new Float64Array(rows * n);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let c = 0; c < n; c++) ss += x[r * n + c] ** 2;
    const inv = 1 / Math.sqrt(ss / n + eps);
    for (let c = 0; c < n; c++) y[r * n + c] = x[r * n + c] * inv * (1 + w[c]);
  }
  return y;
}

const geluTanh = (g: number) => 0.5 * g * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (g + 0.044715 * g ** 3)));

/** is layer l a sliding-window layer */
export function hfGemmaSliding(raw: Raw, l: number): boolean {
  if (Array.isArray(raw.layer_types)) return raw.layer_types[l] === 'sliding_attention';
  if (raw.model_type === 'gemma2') return l % 2 === 0;
  const pattern = typeof raw.sliding_window_pattern === 'number' ? raw.sliding_window_pattern : 6;
  return (l + 1) % pattern !== 0;
}

/** Float64 logits [B*S, V] of the Gemma-2 / Gemma-3 text model in `src`, LoRA without dropout. */
export async function hfGemmaLogits(src: WeightSource, input: RefInput, lora?: RefLora): Promise<Float64Array> {
  const raw = src.config.raw;
  const type = String(raw.model_type);
  if (type !== 'gemma2' && type !== 'gemma3_text') throw new Error(`hf-reference-gemma: no equations for ${type}`);
  const g3 = type === 'gemma3_text';
  const C = rawNum(raw, 'hidden_size'), H = rawNum(raw, 'num_attention_heads'), KV = rawNum(raw, 'num_key_value_heads', H);
  const D = rawNum(raw, 'head_dim', 256), I = rawNum(raw, 'intermediate_size'), V = rawNum(raw, 'vocab_size');
  const L = rawNum(raw, 'num_hidden_layers'), eps = rawNum(raw, 'rms_norm_eps', 1e-6);
  const theta = rawNum(raw, 'rope_theta', g3 ? 1_000_000 : 10000), localTheta = rawNum(raw, 'rope_local_base_freq', 10000);
  const scaling = raw.rope_scaling as { rope_type?: string; factor?: number } | null | undefined;
  if (scaling && scaling.rope_type !== 'linear') throw new Error(`hf-reference-gemma: rope_scaling ${JSON.stringify(scaling)} not written here`);
  const linearFactor = scaling ? scaling.factor! : 1;
  const attnScale = rawNum(raw, 'query_pre_attn_scalar', 256) ** -0.5;
  const attnCap = keyOr(raw, 'attn_logit_softcapping', g3 ? null : 50);
  const finalCap = keyOr(raw, 'final_logit_softcapping', g3 ? null : 30);
  const window = keyOr(raw, 'sliding_window', 4096);
  const tied = raw.tie_word_embeddings !== false;
  const { B, S } = input;
  const T = B * S;
  const loraOf = new Map((lora?.params ?? []).map((p) => [p.name, p.data]));
  const f = async (name: string) => Float64Array.from(await src.getFloat(name));

  const linear = async (x: Float64Array, base: string, out: number, inF: number): Promise<Float64Array> => {
    const y = matmulT(x, T, nf4ToF64(await src.getNF4(`${base}.weight`)), out, inF);
    const A = loraOf.get(`base_model.model.${base}.lora_A.weight`), Bm = loraOf.get(`base_model.model.${base}.lora_B.weight`);
    if (A && Bm) {
      const r = A.length / inF;
      const bax = matmulT(matmulT(x, T, A, r, inF), T, Bm, out, r);
      for (let i = 0; i < y.length; i++) y[i] += lora!.scaling * bax[i];
    }
    return y;
  };
  const rope = (x: Float64Array, nH: number, base: number, factor: number) => {
    for (let t = 0; t < T; t++) {
      const p = t % S;
      for (let h = 0; h < nH; h++) {
        const o = (t * nH + h) * D;
        for (let i = 0; i < D / 2; i++) {
          const a = p * (1 / base ** ((2 * i) / D)) / factor;
          const x1 = x[o + i], x2 = x[o + i + D / 2];
          x[o + i] = x1 * Math.cos(a) - x2 * Math.sin(a);
          x[o + i + D / 2] = x2 * Math.cos(a) + x1 * Math.sin(a);
        }
      }
    }
  };

  let x: Float64Array;
  if (input.ids) {
    const E = await src.getFloat('model.embed_tokens.weight');
    x = new Float64Array(T * C);
    const normalizer = Math.sqrt(C);
    for (let t = 0; t < T; t++) for (let c = 0; c < C; c++) x[t * C + c] = E[input.ids[t] * C + c] * normalizer;
  } else {
    x = Float64Array.from(input.hidden!);
  }
  for (let l = input.fromLayer ?? 0; l < L; l++) {
    const p = `model.layers.${l}`;
    const sliding = hfGemmaSliding(raw, l);
    const h = gemmaNorm(x, T, C, await f(`${p}.input_layernorm.weight`), eps);
    let q = await linear(h, `${p}.self_attn.q_proj`, H * D, C);
    let k = await linear(h, `${p}.self_attn.k_proj`, KV * D, C);
    const v = await linear(h, `${p}.self_attn.v_proj`, KV * D, C);
    if (g3) {
      q = gemmaNorm(q, T * H, D, await f(`${p}.self_attn.q_norm.weight`), eps);
      k = gemmaNorm(k, T * KV, D, await f(`${p}.self_attn.k_norm.weight`), eps);
    }
    const [base, factor] = g3 && sliding ? [localTheta, 1] : [theta, g3 ? linearFactor : 1];
    rope(q, H, base, factor);
    rope(k, KV, base, factor);
    const att = new Float64Array(T * H * D);
    for (let b = 0; b < B; b++) {
      for (let hh = 0; hh < H; hh++) {
        const kh = Math.floor(hh / (H / KV));
        for (let i = 0; i < S; i++) {
          const keep = (j: number) => j <= i && (!sliding || window === null || j > i - window);
          const w = new Float64Array(S).fill(-Infinity);
          for (let j = 0; j < S; j++) {
            if (!keep(j)) continue;
            let d = 0;
            for (let e = 0; e < D; e++) d += q[((b * S + i) * H + hh) * D + e] * k[((b * S + j) * KV + kh) * D + e];
            d *= attnScale;
            if (attnCap !== null) d = Math.tanh(d / attnCap) * attnCap;
            w[j] = d;
          }
          const m = Math.max(...w);
          let z = 0;
          for (let j = 0; j < S; j++) if (keep(j)) z += Math.exp(w[j] - m);
          for (let j = 0; j < S; j++) {
            if (!keep(j)) continue;
            const pj = Math.exp(w[j] - m) / z;
            for (let e = 0; e < D; e++) att[((b * S + i) * H + hh) * D + e] += pj * v[((b * S + j) * KV + kh) * D + e];
          }
        }
      }
    }
    const o = gemmaNorm(await linear(att, `${p}.self_attn.o_proj`, C, H * D), T, C, await f(`${p}.post_attention_layernorm.weight`), eps);
    for (let i = 0; i < x.length; i++) x[i] += o[i];
    const h2 = gemmaNorm(x, T, C, await f(`${p}.pre_feedforward_layernorm.weight`), eps);
    const g = await linear(h2, `${p}.mlp.gate_proj`, I, C), u = await linear(h2, `${p}.mlp.up_proj`, I, C);
    const a = g.map((gi, i) => geluTanh(gi) * u[i]);
    const dn = gemmaNorm(await linear(a, `${p}.mlp.down_proj`, C, I), T, C, await f(`${p}.post_feedforward_layernorm.weight`), eps);
    for (let i = 0; i < x.length; i++) x[i] += dn[i];
  }
  const hN = gemmaNorm(x, T, C, await f('model.norm.weight'), eps);
  const logits = matmulT(hN, T, await src.getFloat(tied ? 'model.embed_tokens.weight' : 'lm_head.weight'), V, C);
  if (finalCap !== null) for (let i = 0; i < logits.length; i++) logits[i] = Math.tanh(logits[i] / finalCap) * finalCap;
  return logits;
}
