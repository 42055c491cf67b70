// One Llama decoder layer (HF LlamaDecoderLayer; Phi3DecoderLayer's fused linears in parts) on NF4 linears with LoRA: its forward/backward pair.
//
//   h1 = rmsnorm(x); q,k,v = proj(h1); [Qwen3: q,k = rmsnorm per head]; rope(q,k); att = attention(q,k,v)
//   x2 = x + o_proj(att); h2 = rmsnorm(x2); out = x2 + down(silu(gate(h2)) * up(h2))
//   Gemma (engine/model/gemma.ts): x2 = x + rmsnorm(o_proj(att)); out = x2 + rmsnorm(down(gelu_tanh(gate(h2)) * up(h2))),
//   attention with its scale, soft-cap and sliding window; its (1 + w) norm weights arrive as plain weights
//
// Forward is the one function used both by the first forward and by the checkpoint recompute in backward,
// so gradients are bit-identical with checkpointing on or off. Buffers belong to the stage's TensorBackend
// (host arrays on CPU, device memory on a GPU); T = tokens, C = hidden, H/KV = query/key-value heads,
// D = head dim, I = intermediate size.
import type { AttentionOptions, TensorBackend } from '../backend.ts';
import type { LayerLinear, LlamaConfig } from '../types.ts';
import { freeLinearSaved } from './lora.ts';
import type { LinearContext, LinearSaved, LoraLinear, PassParams } from './lora.ts';
import type { RopeCache } from './rope.ts';

/** One pass over a micro-batch (or a decoding step): B sequences of S tokens, T = B*S. */
export interface PassContext extends LinearContext {
  B: number;
  S: number;
  T: number;
  positions: Int32Array; // (T)
  /** packed row (B = 1): lengths of its examples; attention runs per example (no attention across them) */
  segments?: Int32Array;
}

/** Everything a layer's backward needs, produced by one layer forward. */
export interface LayerActs<Buf> {
  x: Buf;      // (T, C) layer input
  h1: Buf;     // (T, C)
  rstd1: Buf;  // (T)
  q: Buf;      // (T, H*D) after rope
  k: Buf;      // (T, KV*D) after rope
  /** Qwen3 q/k norm: the projections before the per-head norm and the norms' rstd; null elsewhere */
  qPre: Buf | null;  // (T, H*D)
  kPre: Buf | null;  // (T, KV*D)
  rstdQ: Buf | null; // (T*H)
  rstdK: Buf | null; // (T*KV)
  v: Buf;      // (T, KV*D)
  att: Buf;    // (T, H*D)
  lse: Buf;    // (B, H, S)
  x2: Buf;     // (T, C)
  /** Gemma: o_proj's output before post_attention_layernorm and that norm's rstd; null elsewhere */
  attnOut: Buf | null; // (T, C)
  rstdA: Buf | null;   // (T)
  /** Gemma: down_proj's output before post_feedforward_layernorm and that norm's rstd; null elsewhere */
  mlpOut: Buf | null;  // (T, C)
  rstdF: Buf | null;   // (T)
  h2: Buf;     // (T, C)
  rstd2: Buf;  // (T)
  gate: Buf;   // (T, I)
  up: Buf;     // (T, I)
  act: Buf;    // (T, I) silu(gate)*up (Gemma: gelu_tanh(gate)*up)
  lin: Record<LayerLinear, LinearSaved<Buf>>;
}

/** One layer's view of a decoding sequence's KV cache (engine/model/decode.ts keeps it on the host). */
export interface LayerCache {
  /** tokens already cached before this pass, at positions [0, pos) */
  readonly pos: number;
  /** keep this pass's post-rope k and v (T, KV*D) as cache rows [pos, pos + T) */
  store(k: Float32Array, v: Float32Array): void;
  /** out (T, H*D) assigned: attention of this pass's post-rope q (T, H*D), token t over cache rows [0, pos + t]
   *  (the last `window` of them with a sliding window), with the layer's scale and soft-cap */
  attend(out: Float32Array, q: Float32Array, T: number, opts?: AttentionOptions): void;
}

/** The frozen weights of one layer: its norms and seven linears (each with its LoRA adapter, if targeted; for
 *  Phi-3, q/k/v are the row parts of qkv_proj and gate/up those of gate_up_proj, lora.ts LoraLinear). */
export interface LayerWeights {
  inputNorm: Float32Array;  // (C)
  /** the norm before the MLP: Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm */
  postNorm: Float32Array;   // (C)
  /** Gemma: post_attention_layernorm (on the attention output) and post_feedforward_layernorm; null elsewhere */
  postAttnNorm?: Float32Array | null; // (C)
  postFfnNorm?: Float32Array | null;  // (C)
  /** Qwen3's per-head RMSNorm weights on q and k (D each), null for families without them */
  qNorm: Float32Array | null;
  kNorm: Float32Array | null;
  q: LoraLinear; k: LoraLinear; v: LoraLinear; o: LoraLinear;
  gate: LoraLinear; up: LoraLinear; down: LoraLinear;
}

/** Sliding-window attention length of the config, or null when attention is fully causal (HF semantics:
 *  Mistral uses sliding_window when set; Qwen2/3 only with use_sliding_window). */
export function slidingWindowOf(cfg: LlamaConfig): number | null {
  const sw = cfg.raw?.sliding_window;
  if (typeof sw !== 'number' || !(sw > 0)) return null;
  if (cfg.raw.use_sliding_window === false) return null;
  if ((cfg.modelType === 'qwen2' || cfg.modelType === 'qwen3') && cfg.raw.use_sliding_window !== true) return null;
  return sw;
}

/** positions of a packed row: each example's restart at 0 (TRL's position_ids for padding-free packing) */
export function packedPositions(segments: Int32Array, S: number): Int32Array {
  const p = new Int32Array(S);
  let t = 0;
  for (const len of segments) for (let s = 0; s < len; s++) p[t++] = s;
  if (t !== S) throw new RangeError(`packed segments sum to ${t}, the row has ${S} tokens`);
  return p;
}

/** Attention of a pass, forward or backward: over its B sequences, or in a packed row example by example on
 *  slices (tokens are rows of q/k/v, so an example is a contiguous slice; its lse is the (H, len) block at
 *  offset a·H): every backend's causal kernels serve packing, nothing crosses an example's boundary. */
async function attend<Buf>(t: TensorBackend<Buf>, ctx: PassContext, H: number, KV: number, D: number,
  run: (sl: (b: Buf, width: number) => Buf, lse: (b: Buf) => Buf, B: number, S: number) => Promise<void>): Promise<void> {
  if (!ctx.segments) return run((b) => b, (b) => b, ctx.B, ctx.S);
  let a = 0;
  for (const len of ctx.segments) {
    const at = a;
    await run((b, width) => t.slice(b, at * width, (at + len) * width), (b) => t.slice(b, at * H, (at + len) * H), 1, len);
    a += len;
  }
}

/** position of token t within its right-padded sequence */
export function trainingPositions(B: number, S: number): Int32Array {
  const p = new Int32Array(B * S);
  for (let b = 0; b < B; b++) for (let s = 0; s < S; s++) p[b * S + s] = s;
  return p;
}

function maxPosition(ctx: PassContext): number {
  let maxPos = 0;
  for (let i = 0; i < ctx.T; i++) if (ctx.positions[i] > maxPos) maxPos = ctx.positions[i];
  return maxPos;
}

/** free a layer's saved activations (and its input x when includeX) */
export function freeLayerActs<Buf>(t: TensorBackend<Buf>, a: LayerActs<Buf>, includeX: boolean): void {
  if (includeX) t.free(a.x);
  for (const b of [a.h1, a.rstd1, a.q, a.k, a.v, a.att, a.lse, a.x2, a.h2, a.rstd2, a.gate, a.up, a.act]) t.free(b);
  for (const b of [a.qPre, a.kPre, a.rstdQ, a.rstdK, a.attnOut, a.rstdA, a.mlpOut, a.rstdF]) t.free(b);
  for (const saved of Object.values(a.lin)) freeLinearSaved(t, saved);
}

export class DecoderLayer {
  private readonly w: LayerWeights;
  private readonly config: LlamaConfig;
  /** shared by the stage's layers, so each table crosses to a device once */
  private readonly rope: RopeCache;
  /** the attention kernels are fully causal: longer sequences than a sliding window would differ from HF */
  private readonly slidingWindow: number | null;
  /** Gemma's attention scale, soft-cap and sliding window; undefined = Llama's */
  private readonly attn: AttentionOptions | undefined;
  /** Gemma's GeGLU (tanh GELU) instead of SwiGLU */
  private readonly geglu: boolean;

  constructor(w: LayerWeights, config: LlamaConfig, rope: RopeCache, slidingWindow: number | null,
    variant: { attention?: AttentionOptions; geglu?: boolean } = {}) {
    this.w = w;
    this.config = config;
    this.rope = rope;
    this.slidingWindow = slidingWindow;
    this.attn = variant.attention;
    this.geglu = variant.geglu ?? false;
  }

  /** out (T, C) = layer(x (T, C)); acts keeps what backward needs (x included, not copied). With a KV cache
   *  (decoding) the pass's k, v join the cache and attention runs over it. */
  async forward<Buf>(t: TensorBackend<Buf>, x: Buf, params: PassParams<Buf>, ctx: PassContext,
    kv: LayerCache | null = null): Promise<{ out: Buf; acts: LayerActs<Buf> }> {
    const L = this.w, cfg = this.config;
    const { T, B, S } = ctx;
    const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const I = cfg.intermediateSize, eps = cfg.rmsNormEps;
    const h1 = t.alloc(T * C), rstd1 = t.alloc(T); // (T, C), (T)
    await t.rmsnormForward(h1, rstd1, x, await t.constant(L.inputNorm), T, C, eps);
    const q = await L.q.forward(t, h1, T, ctx, params); // (T, H*D)
    const k = await L.k.forward(t, h1, T, ctx, params); // (T, KV*D)
    const v = await L.v.forward(t, h1, T, ctx, params); // (T, KV*D)
    // Qwen3: each head's q and k RMS-normalized over D (rows T*H of D), before rope
    const qn = L.qNorm ? await this.headNorm(t, q.y, L.qNorm, T * H) : null;
    const kn = L.kNorm ? await this.headNorm(t, k.y, L.kNorm, T * KV) : null;
    const qr = qn ? qn.y : q.y, kr = kn ? kn.y : k.y; // (T, H*D), (T, KV*D) rotated in place below
    const maxPos = maxPosition(ctx);
    if (this.slidingWindow !== null && maxPos >= this.slidingWindow) {
      throw new RangeError(`${cfg.modelType}: position ${maxPos} needs sliding-window attention (sliding_window ${this.slidingWindow}); ` +
        `only sequences up to ${this.slidingWindow} tokens are supported`);
    }
    const rope = this.rope.get(maxPos + 1);
    const cos = await t.constant(rope.cos), sin = await t.constant(rope.sin);
    await t.rope(qr, cos, sin, ctx.positions, T, H, D, false);
    await t.rope(kr, cos, sin, ctx.positions, T, KV, D, false);
    let att = t.alloc(T * H * D); // (T, H*D)
    let lse: Buf; // (B, H, S)
    if (kv === null || kv.pos === 0) {
      lse = t.alloc(B * H * S);
      await attend(t, ctx, H, KV, D, (sl, ls, b, s) => t.attentionForward(sl(att, H * D), ls(lse), sl(qr, H * D), sl(kr, KV * D), sl(v.y, KV * D), b, s, H, KV, D, this.attn));
    } else {
      lse = t.alloc(0);
    }
    if (kv !== null) {
      // decoding: the KV cache lives on the host (inference only)
      kv.store(await t.download(kr), await t.download(v.y));
      if (kv.pos > 0) {
        const out = new Float32Array(T * H * D);
        kv.attend(out, await t.download(qr), T, this.attn);
        t.free(att);
        att = await t.upload(out);
      }
    }
    const o = await L.o.forward(t, att, T, ctx, params);
    // x2 = x + o, in place on the fresh o buffer (Gemma: x + rmsnorm(o), o kept for backward)
    const post = L.postAttnNorm ? await this.rowNorm(t, o.y, L.postAttnNorm, T) : null;
    const x2 = post ? post.y : o.y; // (T, C)
    await t.add(x2, x, T * C);
    const h2 = t.alloc(T * C), rstd2 = t.alloc(T); // (T, C), (T)
    await t.rmsnormForward(h2, rstd2, x2, await t.constant(L.postNorm), T, C, eps);
    const gate = await L.gate.forward(t, h2, T, ctx, params); // (T, I)
    const up = await L.up.forward(t, h2, T, ctx, params); // (T, I)
    const act = t.alloc(T * I); // (T, I)
    if (this.geglu) await t.gegluForward(act, gate.y, up.y, T * I);
    else await t.swigluForward(act, gate.y, up.y, T * I);
    const down = await L.down.forward(t, act, T, ctx, params);
    const postF = L.postFfnNorm ? await this.rowNorm(t, down.y, L.postFfnNorm, T) : null;
    const out = postF ? postF.y : down.y; // (T, C) out = x2 + down (Gemma: x2 + rmsnorm(down)), in place
    await t.add(out, x2, T * C);
    return {
      out,
      acts: {
        x, h1, rstd1, q: qr, k: kr, v: v.y, att, lse,
        qPre: qn ? q.y : null, kPre: kn ? k.y : null, rstdQ: qn ? qn.rstd : null, rstdK: kn ? kn.rstd : null, x2,
        attnOut: post ? o.y : null, rstdA: post ? post.rstd : null, mlpOut: postF ? down.y : null, rstdF: postF ? postF.rstd : null, h2, rstd2, gate: gate.y, up: up.y, act,
        lin: {
          q_proj: q.saved, k_proj: k.saved, v_proj: v.saved, o_proj: o.saved,
          gate_proj: gate.saved, up_proj: up.saved, down_proj: down.saved,
        },
      },
    };
  }

  /** dparams (the LoRA grads, buffers of t) += this layer's part; returns dx (T, C) assigned, or null when
   *  !needInputGrad (the first layer of stage 0: the embedding is frozen, nobody needs dx). The caller frees
   *  dout (T, C) and the acts. */
  async backward<Buf>(t: TensorBackend<Buf>, dparams: Buf[], dout: Buf, a: LayerActs<Buf>, params: PassParams<Buf>,
    needInputGrad: boolean, ctx: PassContext): Promise<Buf | null> {
    const L = this.w, cfg = this.config;
    const { T, B, S } = ctx;
    const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const I = cfg.intermediateSize;
    // MLP branch
    const dact = t.alloc(T * I); // (T, I)
    const dDown = L.postFfnNorm ? await this.rowNormBackward(t, dout, a.mlpOut!, L.postFfnNorm, a.rstdF!, T) : dout; // (T, C)
    await L.down.backward(t, dDown, a.lin.down_proj, T, dparams, dact, false, params);
    if (dDown !== dout) t.free(dDown);
    const dgate = t.alloc(T * I), dup = t.alloc(T * I); // (T, I)
    if (this.geglu) await t.gegluBackward(dgate, dup, dact, a.gate, a.up, T * I);
    else await t.swigluBackward(dgate, dup, dact, a.gate, a.up, T * I);
    t.free(dact);
    const dh2 = t.alloc(T * C); // (T, C)
    await L.gate.backward(t, dgate, a.lin.gate_proj, T, dparams, dh2, false, params);
    await L.up.backward(t, dup, a.lin.up_proj, T, dparams, dh2, true, params);
    t.free(dgate);
    t.free(dup);
    const dx2 = t.alloc(T * C); // (T, C)
    await t.rmsnormBackward(dx2, null, dh2, a.x2, await t.constant(L.postNorm), a.rstd2, T, C);
    t.free(dh2);
    await t.add(dx2, dout, T * C);
    // attention branch
    const datt = t.alloc(T * H * D); // (T, H*D)
    const dO = L.postAttnNorm ? await this.rowNormBackward(t, dx2, a.attnOut!, L.postAttnNorm, a.rstdA!, T) : dx2; // (T, C)
    await L.o.backward(t, dO, a.lin.o_proj, T, dparams, datt, false, params);
    if (dO !== dx2) t.free(dO);
    let dq = t.alloc(T * H * D), dk = t.alloc(T * KV * D); // (T, H*D), (T, KV*D)
    const dv = t.alloc(T * KV * D); // (T, KV*D)
    await attend(t, ctx, H, KV, D, (sl, ls, b, s) => t.attentionBackward(sl(dq, H * D), sl(dk, KV * D), sl(dv, KV * D), sl(datt, H * D),
      sl(a.q, H * D), sl(a.k, KV * D), sl(a.v, KV * D), sl(a.att, H * D), ls(a.lse), b, s, H, KV, D, this.attn));
    t.free(datt);
    const rope = this.rope.get(maxPosition(ctx) + 1);
    const cos = await t.constant(rope.cos), sin = await t.constant(rope.sin);
    await t.rope(dq, cos, sin, ctx.positions, T, H, D, true);
    await t.rope(dk, cos, sin, ctx.positions, T, KV, D, true);
    if (L.qNorm) dq = await this.headNormBackward(t, dq, a.qPre!, L.qNorm, a.rstdQ!, T * H);
    if (L.kNorm) dk = await this.headNormBackward(t, dk, a.kPre!, L.kNorm, a.rstdK!, T * KV);
    const dh1 = needInputGrad ? t.alloc(T * C) : null; // (T, C)
    await L.q.backward(t, dq, a.lin.q_proj, T, dparams, dh1, false, params);
    await L.k.backward(t, dk, a.lin.k_proj, T, dparams, dh1, true, params);
    await L.v.backward(t, dv, a.lin.v_proj, T, dparams, dh1, true, params);
    t.free(dq);
    t.free(dk);
    t.free(dv);
    if (!dh1) {
      t.free(dx2);
      return null;
    }
    const dx = t.alloc(T * C); // (T, C)
    await t.rmsnormBackward(dx, null, dh1, a.x, await t.constant(L.inputNorm), a.rstd1, T, C);
    t.free(dh1);
    await t.add(dx, dx2, T * C);
    t.free(dx2);
    return dx;
  }

  /** y (T, C) = rmsnorm of x (T, C) with the frozen weight w (C) (Gemma's post-attention / post-feedforward norms) */
  private async rowNorm<Buf>(t: TensorBackend<Buf>, x: Buf, w: Float32Array, T: number): Promise<{ y: Buf; rstd: Buf }> {
    const C = this.config.hiddenSize;
    const y = t.alloc(T * C), rstd = t.alloc(T);
    await t.rmsnormForward(y, rstd, x, await t.constant(w), T, C, this.config.rmsNormEps);
    return { y, rstd };
  }

  /** the gradient (T, C) of rowNorm's input from dy (T, C), which the caller keeps */
  private async rowNormBackward<Buf>(t: TensorBackend<Buf>, dy: Buf, x: Buf, w: Float32Array, rstd: Buf, T: number): Promise<Buf> {
    const C = this.config.hiddenSize;
    const dx = t.alloc(T * C);
    await t.rmsnormBackward(dx, null, dy, x, await t.constant(w), rstd, T, C);
    return dx;
  }

  /** y (rows, D) = rmsnorm of each head row of x (rows, D) with the frozen per-head weight w (D); rstd (rows) kept */
  private async headNorm<Buf>(t: TensorBackend<Buf>, x: Buf, w: Float32Array, rows: number): Promise<{ y: Buf; rstd: Buf }> {
    const D = this.config.headDim;
    const y = t.alloc(rows * D), rstd = t.alloc(rows);
    await t.rmsnormForward(y, rstd, x, await t.constant(w), rows, D, this.config.rmsNormEps);
    return { y, rstd };
  }

  /** the gradient (rows, D) before the per-head norm, from dy (rows, D), which is freed */
  private async headNormBackward<Buf>(t: TensorBackend<Buf>, dy: Buf, x: Buf, w: Float32Array, rstd: Buf, rows: number): Promise<Buf> {
    const dx = t.alloc(rows * this.config.headDim);
    await t.rmsnormBackward(dx, null, dy, x, await t.constant(w), rstd, rows, this.config.headDim);
    t.free(dy);
    return dx;
  }
}
