// The Stage: a contiguous range of Llama decoder layers (NF4 base + LoRA) and its training lifecycle:
// forward passes, the micro-batches kept for backward (inputs with checkpointing, activations without),
// backward into the caller's LoRA gradients, release and dispose.
//
// The first stage adds the embedding lookup, the last the loss head (engine/model/head.ts). Decoding and
// whole-model logits are the stage's StageDecoding (engine/model/decode.ts), on the same weights.
import type { Backend, TensorBackend } from '../backend.ts';
import type { LlamaConfig, NamedTensor, Stage, StageForwardResult, StageInput } from '../types.ts';
import type { Decodable, Decoder, StageDecoding } from './decode.ts';
import type { LossHead } from './head.ts';
import { freeLayerActs, packedPositions, trainingPositions } from './layer.ts';
import type { DecoderLayer, LayerActs, PassContext } from './layer.ts';
import { PassParams } from './lora.ts';
import type { VocabMatrix } from './vocab-matrix.ts';

const IGNORE_INDEX = -100;

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

export class LlamaStage<Buf = Float32Array> implements Stage, Decodable {
  readonly config: LlamaConfig;
  readonly layerStart: number;
  readonly layerEnd: number;
  readonly isFirst: boolean;
  readonly isLast: boolean;
  readonly params: NamedTensor[];
  private readonly backend: Backend;
  /** where activations live between ops: the backend's device view, or its host arrays */
  private readonly tensors: TensorBackend<Buf>;
  private readonly gradientCheckpointing: boolean;
  private readonly layers: DecoderLayer[];
  private readonly embed: VocabMatrix | null; // (V, C) first stage
  private readonly head: LossHead | null;     // last stage
  private readonly decoding: StageDecoding<Buf>;
  private readonly kept = new Map<string, KeptBatch<Buf>>();
  /** training forwards still computing, and those released meanwhile (their result must not be kept) */
  private readonly pending = new Set<string>();
  private readonly releasedWhilePending = new Set<string>();
  private disposed = false;

  constructor(parts: {
    config: LlamaConfig; layerStart: number; layerEnd: number; params: NamedTensor[]; backend: Backend;
    tensors: TensorBackend<Buf>; gradientCheckpointing: boolean; layers: DecoderLayer[]; embed: VocabMatrix | null;
    head: LossHead | null; decoding: StageDecoding<Buf>;
  }) {
    this.config = parts.config;
    this.layerStart = parts.layerStart;
    this.layerEnd = parts.layerEnd;
    this.isFirst = parts.layerStart === 0;
    this.isLast = parts.layerEnd === parts.config.numHiddenLayers;
    this.params = parts.params;
    this.backend = parts.backend;
    this.tensors = parts.tensors;
    this.gradientCheckpointing = parts.gradientCheckpointing;
    this.layers = parts.layers;
    this.embed = parts.embed;
    this.head = parts.head;
    this.decoding = parts.decoding;
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
    if (input.segments) checkSegments(input.segments, B, S, key);
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
    const seg = input.segments;
    const ctx: PassContext = {
      B, S, T, positions: seg ? packedPositions(seg, S) : trainingPositions(B, S), train, dropoutSeed: input.dropoutSeed ?? 0,
      ...(seg ? { segments: seg } : {}),
    };
    let x: Buf = await this.stageInput(input, T, C); // (T, C)
    const ckpt = this.gradientCheckpointing;
    const layerInputs: Buf[] | null = train && ckpt ? [] : null;
    const layerActs: LayerActs<Buf>[] | null = train && !ckpt ? [] : null;
    const kept: KeptBatch<Buf> = { ctx, layerInputs, layerActs, lastHidden: null, labels, lse: null };
    const params = new PassParams(t);
    try {
      await params.prefetch(this.params.map((p) => p.data));
      for (const layer of this.layers) {
        const { out, acts } = await layer.forward(t, x, params, ctx);
        if (layerActs) layerActs.push(acts);
        else {
          // checkpointing keeps only the layer input (recomputed in backward); inference keeps nothing
          freeLayerActs(t, acts, layerInputs === null);
          layerInputs?.push(x);
        }
        x = out;
      }
      const result: StageForwardResult = {};
      if (this.isLast) {
        if (labels) {
          const loss = await this.head!.forward(t, x, labels, T);
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
    const dparams: Buf[] = [];
    let dx: Buf | null = null; // (T, C) gradient of the current layer's output, then of its input
    const params = new PassParams(t);
    try {
      await params.prefetch(this.params.map((p) => p.data));
      for (const a of grads) dparams.push(await t.upload(a));
      dx = this.isLast
        ? await this.head!.backward(t, kept.lastHidden!, kept.labels!, kept.lse!, scale, ctx.T)
        : await t.upload(args.gradOut!);
      for (let i = this.layers.length - 1; i >= 0; i--) {
        const layer = this.layers[i];
        let acts: LayerActs<Buf>;
        if (kept.layerActs) acts = kept.layerActs[i];
        else {
          const r = await layer.forward(t, kept.layerInputs![i], params, ctx);
          t.free(r.out);
          acts = r.acts;
        }
        // drop references early so a long stage's peak memory is one layer of activations
        if (kept.layerActs) kept.layerActs[i] = undefined as unknown as LayerActs<Buf>;
        if (kept.layerInputs) kept.layerInputs[i] = undefined as unknown as Buf;
        const needInputGrad = !(this.isFirst && i === 0);
        try {
          const dxIn: Buf | null = await layer.backward(t, dparams, dx!, acts, params, needInputGrad, ctx);
          t.free(dx);
          dx = dxIn;
        } finally {
          freeLayerActs(t, acts, true);
        }
      }
      for (let i = 0; i < grads.length; i++) await t.download(dparams[i], grads[i]);
      return this.isFirst ? {} : { gradIn: await t.download(dx!) };
    } finally {
      t.free(dx);
      for (const b of dparams) t.free(b);
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
    this.decoding.dispose();
  }

  /** Whole-model logits (engine/model/decode.ts); stages holding the whole model only. */
  logits(ids: Int32Array, B: number, S: number): Promise<Float32Array> {
    return this.decoding.logits(ids, B, S);
  }

  /** KV-cache decoding (engine/model/decode.ts); stages holding the whole model only. */
  createDecoder(maxLen: number): Decoder {
    return this.decoding.createDecoder(maxLen);
  }

  /** free everything a kept micro-batch holds (entries already handed back are undefined) */
  private freeKept(k: KeptBatch<Buf>): void {
    const t = this.tensors;
    if (k.layerInputs) for (const x of k.layerInputs) if (x !== undefined) t.free(x);
    if (k.layerActs) for (const a of k.layerActs) if (a !== undefined) freeLayerActs(t, a, true);
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

  /** the pass's input (T, C): the embedded ids on the first stage, a copy of the hidden states elsewhere */
  private async stageInput(input: StageInput, T: number, C: number): Promise<Buf> {
    const t = this.tensors;
    if (this.isFirst) {
      const ids = input.ids;
      if (!(ids instanceof Int32Array) || ids.length !== T) {
        throw new RangeError(`stage.forward(${input.key}): the first stage needs ids Int32Array(${T}), got ${ids instanceof Int32Array ? ids.length : typeof ids}`);
      }
      return this.embed!.embed(this.backend, t, ids, T);
    }
    const h = input.hidden;
    if (!(h instanceof Float32Array) || h.length !== T * C) {
      throw new RangeError(`stage.forward(${input.key}): hidden must be Float32Array(${T}x${C} = ${T * C}), got ${h instanceof Float32Array ? h.length : typeof h}`);
    }
    // copied: the caller (network layer) may reuse its buffer while we keep this one for backward
    // (a device upload is that copy already)
    return t.upload(t.resident === 'host' ? new Float32Array(h) : h);
  }
}

/** a packed row's example lengths: batch 1, positive lengths summing to seqLen */
function checkSegments(seg: Int32Array, B: number, S: number, key: string): void {
  if (B !== 1) throw new RangeError(`stage.forward(${key}): a packed micro-batch is one row, got batch ${B}`);
  let sum = 0;
  for (const n of seg) {
    if (!(n > 0)) throw new RangeError(`stage.forward(${key}): packed example lengths must be positive, got ${n}`);
    sum += n;
  }
  if (sum !== S) throw new RangeError(`stage.forward(${key}): packed example lengths sum to ${sum}, seqLen is ${S}`);
}
