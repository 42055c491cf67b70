// The Stage: a contiguous range of Llama decoder layers (NF4 base + LoRA) with forward, backward, checkpointing and inference.
//
// A layer (HF LlamaDecoderLayer):
//   h1 = rmsnorm(x); q,k,v = proj(h1); rope(q,k); att = attention(q,k,v); x2 = x + o_proj(att)
//   h2 = rmsnorm(x2); out = x2 + down(silu(gate(h2)) * up(h2))
// The first stage adds the embedding lookup, the last adds the final norm, lm_head and a chunked
// cross-entropy that never holds [T, V] logits. Layer forward is one function used both by the first
// forward and by the checkpoint recompute, so gradients are bit-identical with checkpointing on or off.
import type { Backend, TensorBackend } from '../backend.ts';
import type { NF4Weight } from '../formats/nf4.ts';
import { tensorsOf } from '../backend.ts';
import type {
  LlamaConfig, LoraTarget, NamedTensor, Stage, StageForwardResult, StageInput, StageOptions, WeightSource,
} from '../types.ts';
import {
  LoraLinear, PassParams, baseModuleName, freeLinearSaved, initLoraA, loraParamName, loraScaling, orderedTargets, validateLoraConfig,
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

/** Everything a layer's backward needs, produced by one layer forward (buffers of the stage's
 *  TensorBackend: host arrays on CPU, device memory on a GPU). */
interface LayerActs<Buf> {
  x: Buf;      // (T, C) layer input
  h1: Buf;     // (T, C)
  rstd1: Buf;  // (T)
  q: Buf;      // (T, H*D) after rope
  k: Buf;      // (T, KV*D) after rope
  v: Buf;      // (T, KV*D)
  att: Buf;    // (T, H*D)
  lse: Buf;    // (B, H, S)
  x2: Buf;     // (T, C)
  h2: Buf;     // (T, C)
  rstd2: Buf;  // (T)
  gate: Buf;   // (T, I)
  up: Buf;     // (T, I)
  act: Buf;    // (T, I) silu(gate)*up
  lin: Record<LoraTarget, LinearSaved<Buf>>;
}

interface PassContext extends LinearContext {
  B: number;
  S: number;
  T: number;
  positions: Int32Array; // (T)
}

/** Per micro-batch state kept between forward and backward. */
interface KeptBatch<Buf> {
  ctx: PassContext;
  /** checkpointing: each layer's input; otherwise null */
  layerInputs: Buf[] | null;
  /** no checkpointing: each layer's activations; otherwise null */
  layerActs: LayerActs<Buf>[] | null;
  /** last stage: output of the last layer (input of the final norm); null elsewhere */
  lastHidden: Buf | null;
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

export class LlamaStage<Buf = Float32Array> implements Stage {
  readonly config: LlamaConfig;
  readonly layerStart: number;
  readonly layerEnd: number;
  readonly isFirst: boolean;
  readonly isLast: boolean;
  readonly params: NamedTensor[];
  readonly backend: Backend;
  /** where activations live between ops: the backend's device view, or its host arrays */
  readonly tensors: TensorBackend<Buf>;
  readonly gradientCheckpointing: boolean;
  readonly lossChunk: number;
  private readonly layers: LayerWeights[];
  private readonly embed: VocabMatrix | null;   // (V, C) first stage
  private readonly finalNorm: Float32Array | null; // (C) last stage
  private readonly lmHead: VocabMatrix | null;  // (V, C) last stage
  private readonly rope: RopeCache;
  /** the attention kernels are fully causal: longer sequences than a sliding window would differ from HF */
  private readonly slidingWindow: number | null;
  private readonly kept = new Map<string, KeptBatch<Buf>>();
  /** training forwards still computing, and those released meanwhile (their result must not be kept) */
  private readonly pending = new Set<string>();
  private readonly releasedWhilePending = new Set<string>();
  private disposed = false;

  constructor(args: {
    config: LlamaConfig; layerStart: number; layerEnd: number; params: NamedTensor[]; backend: Backend;
    tensors: TensorBackend<Buf>; gradientCheckpointing: boolean; lossChunk: number; layers: LayerWeights[]; embed: VocabMatrix | null;
    finalNorm: Float32Array | null; lmHead: VocabMatrix | null;
  }) {
    this.config = args.config;
    this.layerStart = args.layerStart;
    this.layerEnd = args.layerEnd;
    this.isFirst = args.layerStart === 0;
    this.isLast = args.layerEnd === args.config.numHiddenLayers;
    this.params = args.params;
    this.backend = args.backend;
    this.tensors = args.tensors;
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
      if (this.releasedWhilePending.delete(key)) this.dropKept(key);
    }
  }

  private async forwardPass(input: StageInput, labels: Int32Array | null, train: boolean): Promise<StageForwardResult> {
    const t = this.tensors;
    const { key, batch: B, seqLen: S } = input;
    const T = B * S;
    const C = this.config.hiddenSize;
    const ctx: PassContext = {
      B, S, T, positions: trainingPositions(B, S), train, dropoutSeed: input.dropoutSeed ?? 0,
    };
    let x: Buf = await this.stageInput(input, T, C);
    const ckpt = this.gradientCheckpointing;
    const layerInputs: Buf[] | null = train && ckpt ? [] : null;
    const layerActs: LayerActs<Buf>[] | null = train && !ckpt ? [] : null;
    const kept: KeptBatch<Buf> = { ctx, layerInputs, layerActs, lastHidden: null, labels, lse: null };
    const params = new PassParams(t);
    try {
      await this.prefetchParams(params);
      for (const layer of this.layers) {
        const { out, acts } = await this.layerForward(layer, x, ctx, null, params);
        if (layerActs) layerActs.push(acts);
        else {
          // checkpointing keeps only the layer input (recomputed in backward); inference keeps nothing
          this.freeActs(acts, layerInputs === null);
          layerInputs?.push(x);
        }
        x = out;
      }
      const result: StageForwardResult = {};
      if (this.isLast) {
        if (labels) {
          const loss = await this.lossForward(x, labels, T);
          result.lossSum = loss.lossSum;
          result.tokens = loss.tokens;
          kept.lse = loss.lse;
        }
      } else {
        result.hidden = await t.download(x);
      }
      if (train && this.isLast) kept.lastHidden = x;
      else t.free(x);
      if (train) this.kept.set(key, kept);
      return result;
    } catch (e) {
      if (x !== kept.lastHidden && !layerInputs?.includes(x) && !layerActs?.some((a) => a.x === x)) t.free(x);
      this.freeKept(kept);
      throw e;
    } finally {
      await params.free();
    }
  }

  async backward(key: string, grads: Float32Array[], args: { gradOut?: Float32Array; lossScale?: number }): Promise<{ gradIn?: Float32Array }> {
    this.checkAlive();
    const t = this.tensors;
    const kept = this.kept.get(key);
    if (!kept) throw new Error(`stage.backward: no forward kept for micro-batch key "${key}" (never run, released, or already backpropagated)`);
    const { ctx } = kept;
    const C = this.config.hiddenSize;
    this.checkGrads(grads);
    let scale = 0;
    if (this.isLast) {
      scale = args.lossScale as number;
      if (typeof scale !== 'number' || !Number.isFinite(scale)) {
        throw new RangeError(`stage.backward(${key}): the last stage needs a finite lossScale, got ${scale}`);
      }
    } else {
      const g = args.gradOut;
      if (!(g instanceof Float32Array) || g.length !== ctx.T * C) {
        throw new RangeError(`stage.backward(${key}): gradOut must be a Float32Array of ${ctx.T}x${C} = ${ctx.T * C}, got ${g instanceof Float32Array ? g.length : typeof g}`);
      }
    }
    this.kept.delete(key);
    // Parameter gradients accumulate into the caller's arrays: on a device they are uploaded, accumulated
    // there and downloaded back once (on the host the buffers are the arrays themselves).
    const g: Buf[] = [];
    let dx: Buf | null = null;
    const params = new PassParams(t);
    try {
      await this.prefetchParams(params);
      for (const a of grads) g.push(await t.upload(a));
      dx = this.isLast ? await this.lossBackward(kept, scale) : await t.upload(args.gradOut!);
      for (let i = this.layers.length - 1; i >= 0; i--) {
        const layer = this.layers[i];
        let acts: LayerActs<Buf>;
        if (kept.layerActs) acts = kept.layerActs[i];
        else {
          const r = await this.layerForward(layer, kept.layerInputs![i], ctx, null, params);
          t.free(r.out);
          acts = r.acts;
        }
        // drop references early so a long stage's peak memory is one layer of activations
        if (kept.layerActs) kept.layerActs[i] = undefined as unknown as LayerActs<Buf>;
        if (kept.layerInputs) kept.layerInputs[i] = undefined as unknown as Buf;
        const needInputGrad = !(this.isFirst && i === 0);
        try {
          const next: Buf = await this.layerBackward(layer, dx, acts, ctx, g, needInputGrad, params);
          t.free(dx);
          dx = next;
        } finally {
          this.freeActs(acts, true);
        }
      }
      for (let i = 0; i < grads.length; i++) await t.download(g[i], grads[i]);
      return this.isFirst ? {} : { gradIn: await t.download(dx) };
    } finally {
      t.free(dx);
      for (const b of g) t.free(b);
      this.freeKept(kept);
      await params.free();
    }
  }

  release(key: string): void {
    this.dropKept(key);
    if (this.pending.has(key)) this.releasedWhilePending.add(key);
  }

  dispose(): void {
    for (const key of [...this.kept.keys()]) this.dropKept(key);
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
    try {
      return await this.headLogits(res, T);
    } finally {
      this.tensors.free(res);
    }
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
    const t = this.tensors;
    const T = ids.length;
    if (T === 0) throw new RangeError('decode: no tokens to append');
    if (cache.pos + T > cache.maxLen) throw new RangeError(`decode: KV cache full (${cache.pos} + ${T} > ${cache.maxLen})`);
    const C = this.config.hiddenSize;
    const positions = new Int32Array(T);
    for (let i = 0; i < T; i++) positions[i] = cache.pos + i;
    const ctx: PassContext = { B: 1, S: T, T, positions, train: false, dropoutSeed: 0 };
    let x: Buf = await this.embedIds(ids, T);
    const params = new PassParams(t);
    try {
      await this.prefetchParams(params);
      for (let i = 0; i < this.layers.length; i++) {
        const { out, acts } = await this.layerForward(this.layers[i], x, ctx, { cache, layerIdx: i }, params);
        this.freeActs(acts, true);
        x = out;
      }
      cache.pos += T;
      return await this.headLogits(t.slice(x, (T - 1) * C, T * C), 1);
    } finally {
      t.free(x);
      await params.free();
    }
  }

  // ---- internals ----

  /** upload this pass's LoRA tensors before its kernels are queued (see PassParams.prefetch); the
   *  caller's finally frees them */
  private async prefetchParams(params: PassParams<Buf>): Promise<void> {
    if (this.tensors.resident !== 'host') await params.prefetch(this.params.map((p) => p.data));
  }

  /** free a layer's saved activations (and its input x when includeX) */
  private freeActs(a: LayerActs<Buf>, includeX: boolean): void {
    const t = this.tensors;
    if (includeX) t.free(a.x);
    for (const b of [a.h1, a.rstd1, a.q, a.k, a.v, a.att, a.lse, a.x2, a.h2, a.rstd2, a.gate, a.up, a.act]) t.free(b);
    for (const saved of Object.values(a.lin)) freeLinearSaved(t, saved);
  }

  /** free everything a kept micro-batch holds (entries already handed back are undefined) */
  private freeKept(k: KeptBatch<Buf>): void {
    const t = this.tensors;
    if (k.layerInputs) for (const x of k.layerInputs) if (x !== undefined) t.free(x);
    if (k.layerActs) for (const a of k.layerActs) if (a !== undefined) this.freeActs(a, true);
    t.free(k.lastHidden);
    k.layerInputs = null;
    k.layerActs = null;
    k.lastHidden = null;
  }

  private dropKept(key: string): void {
    const k = this.kept.get(key);
    if (!k) return;
    this.kept.delete(key);
    this.freeKept(k);
  }

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

  /** the embedding rows of ids [T] (gathered on the host from the bf16/f32 table), as a buffer */
  private async embedIds(ids: Int32Array, T: number): Promise<Buf> {
    const x = new Float32Array(T * this.config.hiddenSize);
    await this.embed!.gather(this.backend, x, ids, T);
    return this.tensors.upload(x);
  }

  private async stageInput(input: StageInput, T: number, C: number): Promise<Buf> {
    const t = this.tensors;
    if (this.isFirst) {
      const ids = input.ids;
      if (!(ids instanceof Int32Array) || ids.length !== T) {
        throw new RangeError(`stage.forward(${input.key}): the first stage needs ids Int32Array(${T}), got ${ids instanceof Int32Array ? ids.length : typeof ids}`);
      }
      return this.embedIds(ids, T);
    }
    const h = input.hidden;
    if (!(h instanceof Float32Array) || h.length !== T * C) {
      throw new RangeError(`stage.forward(${input.key}): hidden must be Float32Array(${T}x${C} = ${T * C}), got ${h instanceof Float32Array ? h.length : typeof h}`);
    }
    // copied: the caller (network layer) may reuse its buffer while we keep this one for backward
    // (a device upload is that copy already)
    return t.upload(t.resident === 'host' ? new Float32Array(h) : h);
  }

  private async hiddenForInference(ids: Int32Array, B: number, S: number): Promise<Buf> {
    const t = this.tensors;
    const T = B * S;
    if (!(ids instanceof Int32Array) || ids.length !== T) throw new RangeError(`logits: ids must be Int32Array(${T}), got ${ids?.length}`);
    const ctx: PassContext = { B, S, T, positions: trainingPositions(B, S), train: false, dropoutSeed: 0 };
    let x: Buf = await this.embedIds(ids, T);
    const params = new PassParams(t);
    try {
      await this.prefetchParams(params);
      for (const layer of this.layers) {
        const { out, acts } = await this.layerForward(layer, x, ctx, null, params);
        this.freeActs(acts, true);
        x = out;
      }
      return x;
    } catch (e) {
      t.free(x);
      throw e;
    } finally {
      await params.free();
    }
  }

  /** lm_head rows [v0, v1) as a buffer: decoded into `scratch` on the host, a view of the resident
   *  float32 matrix on a device (never freed by the caller) */
  private async headRows(v0: number, v1: number, scratch: Float32Array | null): Promise<Buf> {
    const t = this.tensors, lm = this.lmHead!, C = this.config.hiddenSize;
    if (t.resident === 'host') return t.upload(lm.rowsF32(v0, v1, scratch));
    return t.slice(await t.constant(lm.allF32()), v0 * C, v1 * C);
  }

  /** The final norm of x [T, C] into h (rstd saved), then per vocabulary chunk of `lossChunk` rows the
   *  logits lc = h · W_chunkᵀ [T, Vc] in `logits` (reused: each chunk overwrites the previous one). */
  private async *headChunks(x: Buf, h: Buf, rstd: Buf, logits: Buf, T: number): AsyncGenerator<{ v0: number; Vc: number; lc: Buf; W: Buf }> {
    const t = this.tensors, cfg = this.config;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const chunk = Math.min(this.lossChunk, V);
    await t.rmsnormForward(h, rstd, x, await t.constant(this.finalNorm!), T, C, cfg.rmsNormEps);
    const wScratch = this.lmHead!.storedAsBf16 && t.resident === 'host' ? new Float32Array(chunk * C) : null;
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0);
      const lc = t.slice(logits, 0, T * Vc);
      const W = await this.headRows(v0, v0 + Vc, wScratch);
      await t.gemm(false, true, T, Vc, C, 1, h, W, 0, lc);
      yield { v0, Vc, lc, W };
    }
  }

  /** final norm + lm_head over all rows of x [T, C] → logits [T, V] (inference) */
  private async headLogits(x: Buf, T: number): Promise<Float32Array> {
    const t = this.tensors;
    const C = this.config.hiddenSize, V = this.config.vocabSize;
    const h = t.alloc(T * C);
    const rstd = t.alloc(T);
    const logits = t.alloc(T * V);
    try {
      await t.rmsnormForward(h, rstd, x, await t.constant(this.finalNorm!), T, C, this.config.rmsNormEps);
      await t.gemm(false, true, T, V, C, 1, h, await t.constant(this.lmHead!.allF32()), 0, logits);
      return await t.download(logits);
    } finally {
      t.free(h);
      t.free(rstd);
      if (t.resident !== 'host') t.free(logits);
    }
  }

  private async layerForward(L: LayerWeights, x: Buf, ctx: PassContext,
    kv: { cache: KVCache; layerIdx: number } | null, params: PassParams<Buf>): Promise<{ out: Buf; acts: LayerActs<Buf> }> {
    const t = this.tensors, cfg = this.config;
    const { T, B, S } = ctx;
    const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const I = cfg.intermediateSize, eps = cfg.rmsNormEps;
    const h1 = t.alloc(T * C), rstd1 = t.alloc(T);
    await t.rmsnormForward(h1, rstd1, x, await t.constant(L.inputNorm), T, C, eps);
    const q = await L.q.forward(t, h1, T, ctx, params);
    const k = await L.k.forward(t, h1, T, ctx, params);
    const v = await L.v.forward(t, h1, T, ctx, params);
    let maxPos = 0;
    for (let i = 0; i < T; i++) if (ctx.positions[i] > maxPos) maxPos = ctx.positions[i];
    if (this.slidingWindow !== null && maxPos >= this.slidingWindow) {
      throw new RangeError(`${cfg.modelType}: position ${maxPos} needs sliding-window attention (sliding_window ${this.slidingWindow}); ` +
        `only sequences up to ${this.slidingWindow} tokens are supported`);
    }
    const rope = this.rope.get(maxPos + 1);
    const cos = await t.constant(rope.cos), sin = await t.constant(rope.sin);
    await t.rope(q.y, cos, sin, ctx.positions, T, H, D, false);
    await t.rope(k.y, cos, sin, ctx.positions, T, KV, D, false);
    let att = t.alloc(T * H * D);
    let lse: Buf;
    if (kv === null || kv.cache.pos === 0) {
      lse = t.alloc(B * H * S);
      await t.attentionForward(att, lse, q.y, k.y, v.y, B, S, H, KV, D);
    } else {
      lse = t.alloc(0);
    }
    if (kv !== null) {
      // decoding: the KV cache lives on the host (inference only)
      const kvDim = KV * D;
      const off = kv.cache.pos * kvDim;
      kv.cache.k[kv.layerIdx].set(await t.download(k.y), off);
      kv.cache.v[kv.layerIdx].set(await t.download(v.y), off);
      if (kv.cache.pos > 0) {
        const out = new Float32Array(T * H * D);
        cachedAttention(out, await t.download(q.y), kv.cache.k[kv.layerIdx], kv.cache.v[kv.layerIdx], kv.cache.pos, T, H, KV, D);
        t.free(att);
        att = await t.upload(out);
      }
    }
    const o = await L.o.forward(t, att, T, ctx, params);
    const x2 = o.y; // (T, C) x2 = x + o, in place on the fresh o buffer
    await t.add(x2, x, T * C);
    const h2 = t.alloc(T * C), rstd2 = t.alloc(T);
    await t.rmsnormForward(h2, rstd2, x2, await t.constant(L.postNorm), T, C, eps);
    const gate = await L.gate.forward(t, h2, T, ctx, params);
    const up = await L.up.forward(t, h2, T, ctx, params);
    const act = t.alloc(T * I);
    await t.swigluForward(act, gate.y, up.y, T * I);
    const down = await L.down.forward(t, act, T, ctx, params);
    const out = down.y;
    await t.add(out, x2, T * C);
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

  /** dout (T, C) → dx (T, C) assigned; LoRA grads accumulated. The caller frees dout and the acts. */
  private async layerBackward(L: LayerWeights, dout: Buf, a: LayerActs<Buf>, ctx: PassContext,
    grads: Buf[], needInputGrad: boolean, params: PassParams<Buf>): Promise<Buf> {
    const t = this.tensors, cfg = this.config;
    const { T, B, S } = ctx;
    const C = cfg.hiddenSize, H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const I = cfg.intermediateSize;
    // MLP branch
    const dact = t.alloc(T * I);
    await L.down.backward(t, dout, a.lin.down_proj, T, grads, dact, false, params);
    const dgate = t.alloc(T * I), dup = t.alloc(T * I);
    await t.swigluBackward(dgate, dup, dact, a.gate, a.up, T * I);
    t.free(dact);
    const dh2 = t.alloc(T * C);
    await L.gate.backward(t, dgate, a.lin.gate_proj, T, grads, dh2, false, params);
    await L.up.backward(t, dup, a.lin.up_proj, T, grads, dh2, true, params);
    t.free(dgate);
    t.free(dup);
    const dx2 = t.alloc(T * C);
    await t.rmsnormBackward(dx2, null, dh2, a.x2, await t.constant(L.postNorm), a.rstd2, T, C);
    t.free(dh2);
    await t.add(dx2, dout, T * C);
    // attention branch
    const datt = t.alloc(T * H * D);
    await L.o.backward(t, dx2, a.lin.o_proj, T, grads, datt, false, params);
    const dq = t.alloc(T * H * D), dk = t.alloc(T * KV * D), dv = t.alloc(T * KV * D);
    await t.attentionBackward(dq, dk, dv, datt, a.q, a.k, a.v, a.att, a.lse, B, S, H, KV, D);
    t.free(datt);
    let maxPos = 0;
    for (let i = 0; i < T; i++) if (ctx.positions[i] > maxPos) maxPos = ctx.positions[i];
    const rope = this.rope.get(maxPos + 1);
    const cos = await t.constant(rope.cos), sin = await t.constant(rope.sin);
    await t.rope(dq, cos, sin, ctx.positions, T, H, D, true);
    await t.rope(dk, cos, sin, ctx.positions, T, KV, D, true);
    const dh1 = needInputGrad ? t.alloc(T * C) : null;
    await L.q.backward(t, dq, a.lin.q_proj, T, grads, dh1, false, params);
    await L.k.backward(t, dk, a.lin.k_proj, T, grads, dh1, true, params);
    await L.v.backward(t, dv, a.lin.v_proj, T, grads, dh1, true, params);
    t.free(dq);
    t.free(dk);
    t.free(dv);
    if (!dh1) return dx2; // first layer of stage 0: the embedding is frozen, nobody needs dx
    const dx = t.alloc(T * C);
    await t.rmsnormBackward(dx, null, dh1, a.x, await t.constant(L.inputNorm), a.rstd1, T, C);
    t.free(dh1);
    await t.add(dx, dx2, T * C);
    t.free(dx2);
    return dx;
  }

  /** final norm + chunked lm_head + cross-entropy; returns per-token lse for backward */
  private async lossForward(x: Buf, labels: Int32Array, T: number): Promise<{ lossSum: number; tokens: number; lse: Float32Array }> {
    const t = this.tensors, cfg = this.config;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const chunk = Math.min(this.lossChunk, V);
    const h = t.alloc(T * C), rstd = t.alloc(T);
    const mB = await t.upload(new Float32Array(T).fill(-Infinity));
    const sB = t.alloc(T), pickedB = t.alloc(T);
    const logits = t.alloc(T * chunk);
    let m: Float32Array, s: Float32Array, picked: Float32Array;
    try {
      for await (const { v0, Vc, lc } of this.headChunks(x, h, rstd, logits, T)) {
        await t.crossEntropyChunkForward(lc, labels, v0, T, Vc, mB, sB, pickedB);
      }
      m = await t.download(mB);
      s = await t.download(sB);
      picked = await t.download(pickedB);
    } finally {
      for (const b of [h, rstd, mB, sB, pickedB, logits]) t.free(b);
    }
    const lse = new Float32Array(T);
    let lossSum = 0, tokens = 0;
    for (let i = 0; i < T; i++) {
      if (labels[i] < 0) continue;
      const l = m[i] + Math.log(s[i]);
      lse[i] = l;
      lossSum += l - picked[i];
      tokens++;
    }
    return { lossSum, tokens, lse };
  }

  /** d(lossSum)·lossScale through the head and final norm → d lastHidden (T, C) */
  private async lossBackward(kept: KeptBatch<Buf>, lossScale: number): Promise<Buf> {
    const t = this.tensors, cfg = this.config;
    const { T } = kept.ctx;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const labels = kept.labels!;
    const x = kept.lastHidden!;
    const scaleH = new Float32Array(T);
    for (let i = 0; i < T; i++) scaleH[i] = labels[i] < 0 ? 0 : lossScale;
    const chunk = Math.min(this.lossChunk, V);
    const h = t.alloc(T * C), rstd = t.alloc(T);
    const scale = await t.upload(scaleH), lse = await t.upload(kept.lse!);
    const dh = t.alloc(T * C);
    const logits = t.alloc(T * chunk);
    const dx = t.alloc(T * C);
    try {
      for await (const { v0, Vc, lc, W } of this.headChunks(x, h, rstd, logits, T)) {
        await t.crossEntropyChunkBackward(lc, labels, v0, T, Vc, lse, scale);
        await t.gemm(false, false, T, C, Vc, 1, lc, W, 1, dh);
      }
      await t.rmsnormBackward(dx, null, dh, x, await t.constant(this.finalNorm!), rstd, T, C);
      return dx;
    } catch (e) {
      t.free(dx);
      throw e;
    } finally {
      for (const b of [h, rstd, scale, lse, dh, logits]) t.free(b);
    }
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
  return new LlamaStage<unknown>({
    config: cfg, layerStart, layerEnd, params, backend, tensors: tensorsOf(backend), gradientCheckpointing: opts.gradientCheckpointing ?? true,
    lossChunk, layers, embed: isFirst ? embed : null, finalNorm, lmHead,
  });
}

function asLlamaStage(stage: Stage, what: string): LlamaStage<unknown> {
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
