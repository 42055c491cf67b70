// The Stage: a contiguous range of Llama decoder layers (NF4 base + LoRA) with forward, backward, checkpointing and inference.
//
// A layer (HF LlamaDecoderLayer):
//   h1 = rmsnorm(x); q,k,v = proj(h1); rope(q,k); att = attention(q,k,v); x2 = x + o_proj(att)
//   h2 = rmsnorm(x2); out = x2 + down(silu(gate(h2)) * up(h2))
// The first stage adds the embedding lookup, the last adds the final norm, lm_head and a chunked
// cross-entropy that never holds [T, V] logits. Layer forward is one function used both by the first
// forward and by the checkpoint recompute, so gradients are bit-identical with checkpointing on or off.
import type { Backend, NF4Weight } from '../backend.ts';
import type {
  LlamaConfig, LoraTarget, NamedTensor, Stage, StageForwardResult, StageInput, StageOptions, WeightSource,
} from '../types.ts';
import {
  LoraLinear, baseModuleName, initLoraA, loraParamName, loraScaling, orderedTargets, validateLoraConfig,
} from './lora.ts';
import type { LinearContext, LinearSaved, LoraAdapterSlot } from './lora.ts';
import { RopeCache } from './rope.ts';
import { VocabMatrix } from './vocab-matrix.ts';

const IGNORE_INDEX = -100;
const DEFAULT_LOSS_CHUNK = 4096;
const DEFAULT_SEED = 42;

interface LayerWeights {
  index: number;
  inputNorm: Float32Array;  // (C)
  postNorm: Float32Array;   // (C)
  q: LoraLinear; k: LoraLinear; v: LoraLinear; o: LoraLinear;
  gate: LoraLinear; up: LoraLinear; down: LoraLinear;
}

/** Everything a layer's backward needs, produced by one layer forward. */
interface LayerActs {
  x: Float32Array;      // (T, C) layer input
  h1: Float32Array;     // (T, C)
  rstd1: Float32Array;  // (T)
  q: Float32Array;      // (T, H*D) after rope
  k: Float32Array;      // (T, KV*D) after rope
  v: Float32Array;      // (T, KV*D)
  att: Float32Array;    // (T, H*D)
  lse: Float32Array;    // (B, H, S)
  x2: Float32Array;     // (T, C)
  h2: Float32Array;     // (T, C)
  rstd2: Float32Array;  // (T)
  gate: Float32Array;   // (T, I)
  up: Float32Array;     // (T, I)
  act: Float32Array;    // (T, I) silu(gate)*up
  lin: Record<LoraTarget, LinearSaved>;
}

interface PassContext extends LinearContext {
  B: number;
  S: number;
  T: number;
  positions: Int32Array; // (T)
}

/** Per micro-batch state kept between forward and backward. */
interface KeptBatch {
  ctx: PassContext;
  /** checkpointing: each layer's input; otherwise null */
  layerInputs: Float32Array[] | null;
  /** no checkpointing: each layer's activations; otherwise null */
  layerActs: LayerActs[] | null;
  /** last stage: output of the last layer (input of the final norm); null elsewhere */
  lastHidden: Float32Array | null;
  labels: Int32Array | null;
  /** per-token log-sum-exp of the logits (last stage) */
  lse: Float32Array | null;
}

/** KV cache of one decoding sequence: per layer k, v (maxLen, KV*D), post-rope keys. */
interface KVCache {
  k: Float32Array[];
  v: Float32Array[];
  maxLen: number;
  pos: number;
}

export class LlamaStage implements Stage {
  readonly config: LlamaConfig;
  readonly layerStart: number;
  readonly layerEnd: number;
  readonly isFirst: boolean;
  readonly isLast: boolean;
  readonly params: NamedTensor[];
  readonly backend: Backend;
  readonly gradientCheckpointing: boolean;
  readonly lossChunk: number;
  private readonly layers: LayerWeights[];
  private readonly embed: VocabMatrix | null;   // (V, C) first stage
  private readonly finalNorm: Float32Array | null; // (C) last stage
  private readonly lmHead: VocabMatrix | null;  // (V, C) last stage
  private readonly rope: RopeCache;
  /** the attention kernels are fully causal: longer sequences than a sliding window would differ from HF */
  private readonly slidingWindow: number | null;
  private readonly kept = new Map<string, KeptBatch>();
  /** training forwards still computing, and those released meanwhile (their result must not be kept) */
  private readonly pending = new Set<string>();
  private readonly releasedWhilePending = new Set<string>();
  private disposed = false;

  constructor(args: {
    config: LlamaConfig; layerStart: number; layerEnd: number; params: NamedTensor[]; backend: Backend;
    gradientCheckpointing: boolean; lossChunk: number; layers: LayerWeights[]; embed: VocabMatrix | null;
    finalNorm: Float32Array | null; lmHead: VocabMatrix | null;
  }) {
    this.config = args.config;
    this.layerStart = args.layerStart;
    this.layerEnd = args.layerEnd;
    this.isFirst = args.layerStart === 0;
    this.isLast = args.layerEnd === args.config.numHiddenLayers;
    this.params = args.params;
    this.backend = args.backend;
    this.gradientCheckpointing = args.gradientCheckpointing;
    this.lossChunk = args.lossChunk;
    this.layers = args.layers;
    this.embed = args.embed;
    this.finalNorm = args.finalNorm;
    this.lmHead = args.lmHead;
    this.rope = new RopeCache(args.config);
    this.slidingWindow = slidingWindowOf(args.config);
  }

  /** keys currently kept for backward */
  get inFlightKeys(): string[] {
    return [...this.kept.keys()];
  }

  newGrads(): Float32Array[] {
    return this.params.map((p) => new Float32Array(p.data.length));
  }

  async forward(input: StageInput, opts?: { train?: boolean }): Promise<StageForwardResult> {
    this.checkAlive();
    const train = opts?.train ?? true;
    const { key, batch: B, seqLen: S } = input;
    if (!Number.isInteger(B) || B <= 0 || !Number.isInteger(S) || S <= 0) {
      throw new RangeError(`stage.forward(${key}): batch and seqLen must be positive integers, got ${B}x${S}`);
    }
    if (train && (this.kept.has(key) || this.pending.has(key))) throw new Error(`stage.forward: micro-batch key "${key}" is already in flight`);
    const T = B * S;
    const labels = this.checkLabels(input, T, train);
    if (!train) return this.forwardPass(input, labels, false);
    this.pending.add(key);
    try {
      return await this.forwardPass(input, labels, true);
    } finally {
      this.pending.delete(key);
      if (this.releasedWhilePending.delete(key)) this.kept.delete(key);
    }
  }

  private async forwardPass(input: StageInput, labels: Int32Array | null, train: boolean): Promise<StageForwardResult> {
    const { key, batch: B, seqLen: S } = input;
    const T = B * S;
    const C = this.config.hiddenSize;
    const ctx: PassContext = {
      B, S, T, positions: trainingPositions(B, S), train, dropoutSeed: input.dropoutSeed ?? 0,
    };
    let x = await this.stageInput(input, T, C);
    const ckpt = this.gradientCheckpointing;
    const layerInputs: Float32Array[] | null = train && ckpt ? [] : null;
    const layerActs: LayerActs[] | null = train && !ckpt ? [] : null;
    for (const layer of this.layers) {
      const { out, acts } = await this.layerForward(layer, x, ctx, null);
      layerInputs?.push(x);
      layerActs?.push(acts);
      x = out;
    }
    const result: StageForwardResult = {};
    let lse: Float32Array | null = null;
    if (this.isLast) {
      if (labels) {
        const loss = await this.lossForward(x, labels, T);
        result.lossSum = loss.lossSum;
        result.tokens = loss.tokens;
        lse = loss.lse;
      }
    } else {
      result.hidden = x;
    }
    if (train) this.kept.set(key, { ctx, layerInputs, layerActs, lastHidden: this.isLast ? x : null, labels, lse });
    return result;
  }

  async backward(key: string, grads: Float32Array[], args: { gradOut?: Float32Array; lossScale?: number }): Promise<{ gradIn?: Float32Array }> {
    this.checkAlive();
    const kept = this.kept.get(key);
    if (!kept) throw new Error(`stage.backward: no forward kept for micro-batch key "${key}" (never run, released, or already backpropagated)`);
    const { ctx } = kept;
    const C = this.config.hiddenSize;
    this.checkGrads(grads);
    let dx: Float32Array;
    if (this.isLast) {
      const scale = args.lossScale;
      if (typeof scale !== 'number' || !Number.isFinite(scale)) {
        throw new RangeError(`stage.backward(${key}): the last stage needs a finite lossScale, got ${scale}`);
      }
      this.kept.delete(key);
      dx = await this.lossBackward(kept, scale);
    } else {
      const g = args.gradOut;
      if (!(g instanceof Float32Array) || g.length !== ctx.T * C) {
        throw new RangeError(`stage.backward(${key}): gradOut must be a Float32Array of ${ctx.T}x${C} = ${ctx.T * C}, got ${g instanceof Float32Array ? g.length : typeof g}`);
      }
      this.kept.delete(key);
      dx = g;
    }
    for (let i = this.layers.length - 1; i >= 0; i--) {
      const layer = this.layers[i];
      let acts: LayerActs;
      if (kept.layerActs) acts = kept.layerActs[i];
      else acts = (await this.layerForward(layer, kept.layerInputs![i], ctx, null)).acts;
      const needInputGrad = !(this.isFirst && i === 0);
      dx = await this.layerBackward(layer, dx, acts, ctx, grads, needInputGrad);
      // drop references early so a long stage's peak memory is one layer of activations
      if (kept.layerActs) kept.layerActs[i] = undefined as unknown as LayerActs;
      if (kept.layerInputs) kept.layerInputs[i] = undefined as unknown as Float32Array;
    }
    return this.isFirst ? {} : { gradIn: dx };
  }

  release(key: string): void {
    this.kept.delete(key);
    if (this.pending.has(key)) this.releasedWhilePending.add(key);
  }

  dispose(): void {
    this.kept.clear();
    this.disposed = true;
  }

  /** Full logits [T, V] of the whole model (first and last stage); inference only. */
  async fullLogits(ids: Int32Array, B: number, S: number): Promise<Float32Array> {
    this.checkAlive();
    if (!this.isFirst || !this.isLast) {
      throw new Error(`logits: needs a stage holding the whole model, this one holds layers [${this.layerStart}, ${this.layerEnd}) of ${this.config.numHiddenLayers}`);
    }
    const T = B * S;
    const res = await this.hiddenForInference(ids, B, S);
    return this.headLogits(res, T);
  }

  /** A KV cache for one sequence of up to maxLen tokens (whole-model stages only). */
  newKVCache(maxLen: number): KVCache {
    if (!this.isFirst || !this.isLast) throw new Error('generate: needs a stage holding the whole model');
    const kvDim = this.config.numKeyValueHeads * this.config.headDim;
    return {
      k: this.layers.map(() => new Float32Array(maxLen * kvDim)),
      v: this.layers.map(() => new Float32Array(maxLen * kvDim)),
      maxLen,
      pos: 0,
    };
  }

  /** Append tokens to a KV cache and return the logits [V] of the last appended token. */
  async decode(cache: KVCache, ids: Int32Array): Promise<Float32Array> {
    this.checkAlive();
    const T = ids.length;
    if (T === 0) throw new RangeError('decode: no tokens to append');
    if (cache.pos + T > cache.maxLen) throw new RangeError(`decode: KV cache full (${cache.pos} + ${T} > ${cache.maxLen})`);
    const C = this.config.hiddenSize;
    const positions = new Int32Array(T);
    for (let t = 0; t < T; t++) positions[t] = cache.pos + t;
    const ctx: PassContext = { B: 1, S: T, T, positions, train: false, dropoutSeed: 0 };
    let x: Float32Array = new Float32Array(T * C);
    await this.embed!.gather(this.backend, x, ids, T);
    for (let i = 0; i < this.layers.length; i++) {
      x = (await this.layerForward(this.layers[i], x, ctx, { cache, layerIdx: i })).out;
    }
    cache.pos += T;
    return this.headLogits(x.subarray((T - 1) * C), 1);
  }

  // ---- internals ----

  private checkAlive(): void {
    if (this.disposed) throw new Error('stage: used after dispose()');
  }

  private checkGrads(grads: Float32Array[]): void {
    if (!Array.isArray(grads) || grads.length !== this.params.length) {
      throw new RangeError(`stage.backward: grads must align with params (${this.params.length} tensors), got ${Array.isArray(grads) ? grads.length : typeof grads}`);
    }
    for (let i = 0; i < grads.length; i++) {
      if (!(grads[i] instanceof Float32Array) || grads[i].length !== this.params[i].data.length) {
        throw new RangeError(`stage.backward: grads[${i}] for ${this.params[i].name} must be Float32Array(${this.params[i].data.length})`);
      }
    }
  }

  private checkLabels(input: StageInput, T: number, train: boolean): Int32Array | null {
    if (!this.isLast) return null;
    const labels = input.labels;
    if (!labels) {
      if (train) throw new Error(`stage.forward(${input.key}): the last stage needs labels to train`);
      return null;
    }
    if (labels.length !== T) throw new RangeError(`stage.forward(${input.key}): labels length ${labels.length} != batch*seqLen ${T}`);
    const V = this.config.vocabSize;
    for (let t = 0; t < T; t++) {
      const l = labels[t];
      if (l !== IGNORE_INDEX && (l < 0 || l >= V)) {
        throw new RangeError(`stage.forward(${input.key}): labels[${t}] = ${l} is neither -100 nor in [0, ${V})`);
      }
    }
    // copied: kept until backward, and the caller (network layer) may reuse its buffer
    return new Int32Array(labels);
  }

  private async stageInput(input: StageInput, T: number, C: number): Promise<Float32Array> {
    if (this.isFirst) {
      const ids = input.ids;
      if (!(ids instanceof Int32Array) || ids.length !== T) {
        throw new RangeError(`stage.forward(${input.key}): the first stage needs ids Int32Array(${T}), got ${ids instanceof Int32Array ? ids.length : typeof ids}`);
      }
      const x = new Float32Array(T * C);
      await this.embed!.gather(this.backend, x, ids, T);
      return x;
    }
    const h = input.hidden;
    if (!(h instanceof Float32Array) || h.length !== T * C) {
      throw new RangeError(`stage.forward(${input.key}): hidden must be Float32Array(${T}x${C} = ${T * C}), got ${h instanceof Float32Array ? h.length : typeof h}`);
    }
    // copy: the caller (network layer) may reuse its buffer while we keep this one for backward
    return new Float32Array(h);
  }

  private async hiddenForInference(ids: Int32Array, B: number, S: number): Promise<Float32Array> {
    const T = B * S;
    const C = this.config.hiddenSize;
    if (!(ids instanceof Int32Array) || ids.length !== T) throw new RangeError(`logits: ids must be Int32Array(${T}), got ${ids?.length}`);
    const ctx: PassContext = { B, S, T, positions: trainingPositions(B, S), train: false, dropoutSeed: 0 };
    let x: Float32Array = new Float32Array(T * C);
    await this.embed!.gather(this.backend, x, ids, T);
    for (const layer of this.layers) x = (await this.layerForward(layer, x, ctx, null)).out;
    return x;
  }

  /** final norm + lm_head over all rows of x [T, C] → logits [T, V] (inference) */
  private async headLogits(x: Float32Array, T: number): Promise<Float32Array> {
    const C = this.config.hiddenSize, V = this.config.vocabSize;
    const h = new Float32Array(T * C);
    const rstd = new Float32Array(T);
    await this.backend.rmsnormForward(h, rstd, x, this.finalNorm!, T, C, this.config.rmsNormEps);
    const logits = new Float32Array(T * V);
    await this.backend.gemm(false, true, T, V, C, 1, h, this.lmHead!.allF32(), 0, logits);
    return logits;
  }

  private async layerForward(L: LayerWeights, x: Float32Array, ctx: PassContext,
    kv: { cache: KVCache; layerIdx: number } | null): Promise<{ out: Float32Array; acts: LayerActs }> {
    const be = this.backend, cfg = this.config;
    const { T, B, S } = ctx;
    const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const I = cfg.intermediateSize, eps = cfg.rmsNormEps;
    const h1 = new Float32Array(T * C), rstd1 = new Float32Array(T);
    await be.rmsnormForward(h1, rstd1, x, L.inputNorm, T, C, eps);
    const q = await L.q.forward(be, h1, T, ctx);
    const k = await L.k.forward(be, h1, T, ctx);
    const v = await L.v.forward(be, h1, T, ctx);
    let maxPos = 0;
    for (let t = 0; t < T; t++) if (ctx.positions[t] > maxPos) maxPos = ctx.positions[t];
    if (this.slidingWindow !== null && maxPos >= this.slidingWindow) {
      throw new RangeError(`${cfg.modelType}: position ${maxPos} needs sliding-window attention (sliding_window ${this.slidingWindow}); ` +
        `only sequences up to ${this.slidingWindow} tokens are supported`);
    }
    const { cos, sin } = this.rope.get(maxPos + 1);
    await be.rope(q.y, cos, sin, ctx.positions, T, H, D, false);
    await be.rope(k.y, cos, sin, ctx.positions, T, KV, D, false);
    const att = new Float32Array(T * H * D);
    let lse: Float32Array;
    if (kv === null || kv.cache.pos === 0) {
      lse = new Float32Array(B * H * S);
      await be.attentionForward(att, lse, q.y, k.y, v.y, B, S, H, KV, D);
    } else {
      lse = new Float32Array(0);
    }
    if (kv !== null) {
      const kvDim = KV * D;
      const off = kv.cache.pos * kvDim;
      kv.cache.k[kv.layerIdx].set(k.y, off);
      kv.cache.v[kv.layerIdx].set(v.y, off);
      if (kv.cache.pos > 0) {
        cachedAttention(att, q.y, kv.cache.k[kv.layerIdx], kv.cache.v[kv.layerIdx], kv.cache.pos, T, H, KV, D);
      }
    }
    const o = await L.o.forward(be, att, T, ctx);
    const x2 = o.y; // (T, C) x2 = x + o, in place on the fresh o buffer
    for (let i = 0; i < x2.length; i++) x2[i] += x[i];
    const h2 = new Float32Array(T * C), rstd2 = new Float32Array(T);
    await be.rmsnormForward(h2, rstd2, x2, L.postNorm, T, C, eps);
    const gate = await L.gate.forward(be, h2, T, ctx);
    const up = await L.up.forward(be, h2, T, ctx);
    const act = new Float32Array(T * I);
    await be.swigluForward(act, gate.y, up.y, T * I);
    const down = await L.down.forward(be, act, T, ctx);
    const out = down.y;
    for (let i = 0; i < out.length; i++) out[i] += x2[i];
    return {
      out,
      acts: {
        x, h1, rstd1, q: q.y, k: k.y, v: v.y, att, lse, x2, h2, rstd2, gate: gate.y, up: up.y, act,
        lin: {
          q_proj: q.saved, k_proj: k.saved, v_proj: v.saved, o_proj: o.saved,
          gate_proj: gate.saved, up_proj: up.saved, down_proj: down.saved,
        },
      },
    };
  }

  /** dout (T, C) → dx (T, C) assigned; LoRA grads accumulated. */
  private async layerBackward(L: LayerWeights, dout: Float32Array, a: LayerActs, ctx: PassContext,
    grads: Float32Array[], needInputGrad: boolean): Promise<Float32Array> {
    const be = this.backend, cfg = this.config;
    const { T, B, S } = ctx;
    const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const I = cfg.intermediateSize;
    // MLP branch
    const dact = new Float32Array(T * I);
    await L.down.backward(be, dout, a.lin.down_proj, T, grads, dact, false);
    const dgate = new Float32Array(T * I), dup = new Float32Array(T * I);
    await be.swigluBackward(dgate, dup, dact, a.gate, a.up, T * I);
    const dh2 = new Float32Array(T * C);
    await L.gate.backward(be, dgate, a.lin.gate_proj, T, grads, dh2, false);
    await L.up.backward(be, dup, a.lin.up_proj, T, grads, dh2, true);
    const dx2 = new Float32Array(T * C);
    await be.rmsnormBackward(dx2, null, dh2, a.x2, L.postNorm, a.rstd2, T, C);
    for (let i = 0; i < dx2.length; i++) dx2[i] += dout[i];
    // attention branch
    const datt = new Float32Array(T * H * D);
    await L.o.backward(be, dx2, a.lin.o_proj, T, grads, datt, false);
    const dq = new Float32Array(T * H * D), dk = new Float32Array(T * KV * D), dv = new Float32Array(T * KV * D);
    await be.attentionBackward(dq, dk, dv, datt, a.q, a.k, a.v, a.att, a.lse, B, S, H, KV, D);
    let maxPos = 0;
    for (let t = 0; t < T; t++) if (ctx.positions[t] > maxPos) maxPos = ctx.positions[t];
    const { cos, sin } = this.rope.get(maxPos + 1);
    await be.rope(dq, cos, sin, ctx.positions, T, H, D, true);
    await be.rope(dk, cos, sin, ctx.positions, T, KV, D, true);
    const dh1 = needInputGrad ? new Float32Array(T * C) : null;
    await L.q.backward(be, dq, a.lin.q_proj, T, grads, dh1, false);
    await L.k.backward(be, dk, a.lin.k_proj, T, grads, dh1, true);
    await L.v.backward(be, dv, a.lin.v_proj, T, grads, dh1, true);
    if (!dh1) return dx2; // first layer of stage 0: the embedding is frozen, nobody needs dx
    const dx = new Float32Array(T * C);
    await be.rmsnormBackward(dx, null, dh1, a.x, L.inputNorm, a.rstd1, T, C);
    for (let i = 0; i < dx.length; i++) dx[i] += dx2[i];
    return dx;
  }

  /** final norm + chunked lm_head + cross-entropy; returns per-token lse for backward */
  private async lossForward(x: Float32Array, labels: Int32Array, T: number): Promise<{ lossSum: number; tokens: number; lse: Float32Array }> {
    const be = this.backend, cfg = this.config;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const h = new Float32Array(T * C), rstd = new Float32Array(T);
    await be.rmsnormForward(h, rstd, x, this.finalNorm!, T, C, cfg.rmsNormEps);
    const m = new Float32Array(T).fill(-Infinity);
    const s = new Float32Array(T);
    const picked = new Float32Array(T);
    const chunk = Math.min(this.lossChunk, V);
    const logits = new Float32Array(T * chunk);
    const wScratch = this.lmHead!.storedAsBf16 ? new Float32Array(chunk * C) : null;
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0);
      const lc = logits.subarray(0, T * Vc);
      await be.gemm(false, true, T, Vc, C, 1, h, this.lmHead!.rowsF32(v0, v0 + Vc, wScratch), 0, lc);
      await be.crossEntropyChunkForward(lc, labels, v0, T, Vc, m, s, picked);
    }
    const lse = new Float32Array(T);
    let lossSum = 0, tokens = 0;
    for (let t = 0; t < T; t++) {
      if (labels[t] < 0) continue;
      const l = m[t] + Math.log(s[t]);
      lse[t] = l;
      lossSum += l - picked[t];
      tokens++;
    }
    return { lossSum, tokens, lse };
  }

  /** d(lossSum)·lossScale through the head and final norm → d lastHidden (T, C) */
  private async lossBackward(kept: KeptBatch, lossScale: number): Promise<Float32Array> {
    const be = this.backend, cfg = this.config;
    const { T } = kept.ctx;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const labels = kept.labels!, lse = kept.lse!;
    const x = kept.lastHidden!;
    const h = new Float32Array(T * C), rstd = new Float32Array(T);
    await be.rmsnormForward(h, rstd, x, this.finalNorm!, T, C, cfg.rmsNormEps);
    const scale = new Float32Array(T);
    for (let t = 0; t < T; t++) scale[t] = labels[t] < 0 ? 0 : lossScale;
    const dh = new Float32Array(T * C);
    const chunk = Math.min(this.lossChunk, V);
    const logits = new Float32Array(T * chunk);
    const wScratch = this.lmHead!.storedAsBf16 ? new Float32Array(chunk * C) : null;
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0);
      const lc = logits.subarray(0, T * Vc);
      const W = this.lmHead!.rowsF32(v0, v0 + Vc, wScratch);
      await be.gemm(false, true, T, Vc, C, 1, h, W, 0, lc);
      await be.crossEntropyChunkBackward(lc, labels, v0, T, Vc, lse, scale);
      await be.gemm(false, false, T, C, Vc, 1, lc, W, 1, dh);
    }
    const dx = new Float32Array(T * C);
    await be.rmsnormBackward(dx, null, dh, x, this.finalNorm!, rstd, T, C);
    return dx;
  }
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

/** position of token t within its right-padded sequence */
function trainingPositions(B: number, S: number): Int32Array {
  const p = new Int32Array(B * S);
  for (let b = 0; b < B; b++) for (let s = 0; s < S; s++) p[b * S + s] = s;
  return p;
}

/** Decode attention for T new tokens at cache positions [pos, pos+T) against cache rows [0, pos+t].
 *  out (T, H*D) assigned; q (T, H*D) post-rope; caches (maxLen, KV*D). */
function cachedAttention(out: Float32Array, q: Float32Array, kc: Float32Array, vc: Float32Array, pos: number,
  T: number, H: number, KV: number, D: number): void {
  const scale = 1 / Math.sqrt(D);
  const group = H / KV;
  const kvDim = KV * D;
  const scores = new Float64Array(pos + T);
  const acc = new Float64Array(D);
  for (let t = 0; t < T; t++) {
    const n = pos + t + 1;
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / group);
      const qo = (t * H + h) * D;
      let mx = -Infinity;
      for (let j = 0; j < n; j++) {
        const ko = j * kvDim + kvh * D;
        let d = 0;
        for (let e = 0; e < D; e++) d += q[qo + e] * kc[ko + e];
        d *= scale;
        scores[j] = d;
        if (d > mx) mx = d;
      }
      let sum = 0;
      acc.fill(0);
      for (let j = 0; j < n; j++) {
        const w = Math.exp(scores[j] - mx);
        sum += w;
        const vo = j * kvDim + kvh * D;
        for (let e = 0; e < D; e++) acc[e] += w * vc[vo + e];
      }
      for (let e = 0; e < D; e++) out[qo + e] = acc[e] / sum;
    }
  }
}

function checkNF4(name: string, w: NF4Weight, rows: number, cols: number): NF4Weight {
  if (w.rows !== rows || w.cols !== cols) {
    throw new RangeError(`${name}: expected NF4 weight [${rows}, ${cols}], got [${w.rows}, ${w.cols}]`);
  }
  const n = rows * cols;
  if (w.packed.length !== Math.ceil(n / 2)) throw new RangeError(`${name}: packed length ${w.packed.length} != ceil(${n}/2)`);
  if (w.absmax.length !== Math.ceil(n / w.blocksize)) {
    throw new RangeError(`${name}: absmax length ${w.absmax.length} != ceil(${n}/${w.blocksize})`);
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
    throw new Error(`model_type "${t}" is not a Llama-family architecture this engine implements (llama, mistral, qwen2)`);
  }
  for (const n of ['q_norm', 'k_norm']) {
    const name = `model.layers.${layer}.self_attn.${n}.weight`;
    if (source.has(name)) throw new Error(`${name}: per-head q/k RMSNorm (Qwen3-style, model_type "${t}") is not supported`);
  }
}

/** Load layers [layerStart, layerEnd) of the source's model and create this stage's LoRA params. */
export async function loadStage(source: WeightSource, backend: Backend, opts: StageOptions): Promise<Stage> {
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
  const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
  const I = cfg.intermediateSize, V = cfg.vocabSize;
  const dims: Record<LoraTarget, [number, number]> = {
    q_proj: [H * D, C], k_proj: [KV * D, C], v_proj: [KV * D, C], o_proj: [C, H * D],
    gate_proj: [I, C], up_proj: [I, C], down_proj: [C, I],
  };
  const targets = new Set(orderedTargets(opts.lora));
  const r = opts.lora.r;
  const scaling = loraScaling(opts.lora);
  const params: NamedTensor[] = [];
  const layers: LayerWeights[] = [];
  const order: LoraTarget[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
  for (let l = layerStart; l < layerEnd; l++) {
    const lin = {} as Record<LoraTarget, LoraLinear>;
    for (const m of order) {
      const [out, inF] = dims[m];
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
    layers.push({
      index: l,
      inputNorm: await getFloatChecked(source, `model.layers.${l}.input_layernorm.weight`, C),
      postNorm: await getFloatChecked(source, `model.layers.${l}.post_attention_layernorm.weight`, C),
      q: lin.q_proj, k: lin.k_proj, v: lin.v_proj, o: lin.o_proj,
      gate: lin.gate_proj, up: lin.up_proj, down: lin.down_proj,
    });
  }
  const isFirst = layerStart === 0, isLast = layerEnd === nL;
  const embedName = 'model.embed_tokens.weight';
  let embed: VocabMatrix | null = null;
  if (isFirst || (isLast && cfg.tieWordEmbeddings)) embed = new VocabMatrix(await getFloatChecked(source, embedName, V * C), V, C);
  let finalNorm: Float32Array | null = null, lmHead: VocabMatrix | null = null;
  if (isLast) {
    finalNorm = await getFloatChecked(source, 'model.norm.weight', C);
    if (cfg.tieWordEmbeddings) lmHead = embed;
    else lmHead = new VocabMatrix(await getFloatChecked(source, 'lm_head.weight', V * C), V, C);
  }
  return new LlamaStage({
    config: cfg, layerStart, layerEnd, params, backend, gradientCheckpointing: opts.gradientCheckpointing ?? true,
    lossChunk, layers, embed: isFirst ? embed : null, finalNorm, lmHead,
  });
}

function asLlamaStage(stage: Stage, what: string): LlamaStage {
  if (!(stage instanceof LlamaStage)) throw new TypeError(`${what}: expected a stage from loadStage()`);
  return stage;
}

/** Whole-model logits [B*S, V] (inference, no dropout). For tests and eval of small models. */
export async function logits(stage: Stage, ids: Int32Array, B: number, S: number): Promise<Float32Array> {
  return asLlamaStage(stage, 'logits').fullLogits(ids, B, S);
}

/** KV-cache decoding handle over a whole-model stage. */
export interface Decoder {
  /** tokens appended so far */
  readonly length: number;
  /** append tokens, return logits [V] of the last one */
  append(ids: ArrayLike<number>): Promise<Float32Array>;
}

export function createDecoder(stage: Stage, maxLen: number): Decoder {
  const s = asLlamaStage(stage, 'createDecoder');
  if (!Number.isInteger(maxLen) || maxLen <= 0) throw new RangeError(`createDecoder: maxLen must be a positive integer, got ${maxLen}`);
  const cache = s.newKVCache(maxLen);
  return {
    get length() { return cache.pos; },
    append: (ids) => s.decode(cache, Int32Array.from(ids)),
  };
}
