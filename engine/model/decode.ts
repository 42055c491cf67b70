// Inference over a stage that holds the whole model: full logits (eval, tests) and KV-cache decoding
// (generate), on the stage's own weights and TensorBackend.
import type { AttentionOptions, Backend, TensorBackend } from '../backend.ts';
import { attentionOptions } from '../backend.ts';
import type { LlamaConfig, NamedTensor } from '../types.ts';
import type { LossHead } from './head.ts';
import { freeLayerActs, trainingPositions } from './layer.ts';
import type { DecoderLayer, LayerCache, PassContext } from './layer.ts';
import { PassParams } from './lora.ts';
import type { VocabMatrix } from './vocab-matrix.ts';

/** KV-cache decoding handle of one sequence. */
export interface Decoder {
  /** tokens appended so far */
  readonly length: number;
  /** append tokens, return logits [V] of the last one */
  append(ids: ArrayLike<number>): Promise<Float32Array>;
}

/** What generation and whole-model inference ask of a model (engine/model/generate.ts decodes through it). */
export interface Decodable {
  /** Whole-model logits [B*S, V] (inference, no dropout). */
  logits(ids: Int32Array, B: number, S: number): Promise<Float32Array>;
  /** A KV-cache decoding handle for one sequence of up to maxLen tokens. */
  createDecoder(maxLen: number): Decoder;
}

/** Whole-model logits [B*S, V] (inference, no dropout). For tests and eval of small models. */
export function logits(model: Decodable, ids: Int32Array, B: number, S: number): Promise<Float32Array> {
  return model.logits(ids, B, S);
}

/** A KV-cache decoding handle over a whole-model stage. */
export function createDecoder(model: Decodable, maxLen: number): Decoder {
  return model.createDecoder(maxLen);
}

/** KV cache of one decoding sequence, on the host: per layer k, v (maxLen, KV*D), post-rope keys. */
class KVCache {
  readonly maxLen: number;
  /** tokens cached so far */
  pos = 0;
  /** what each layer sees of it */
  readonly layers: LayerCache[];

  constructor(maxLen: number, nLayers: number, cfg: LlamaConfig) {
    this.maxLen = maxLen;
    const H = cfg.numAttentionHeads, KV = cfg.numKeyValueHeads, D = cfg.headDim;
    const kvDim = KV * D;
    const cache = this;
    this.layers = Array.from({ length: nLayers }, (): LayerCache => {
      const k = new Float32Array(maxLen * kvDim), v = new Float32Array(maxLen * kvDim);
      return {
        get pos() { return cache.pos; },
        store(kNew, vNew) {
          k.set(kNew, cache.pos * kvDim);
          v.set(vNew, cache.pos * kvDim);
        },
        attend(out, q, T, opts) { cachedAttention(out, q, k, v, cache.pos, T, H, KV, D, opts); },
      };
    });
  }
}

/** Decode attention for T new tokens at cache positions [pos, pos+T) against cache rows [0, pos+t] (the last
 *  `window` of them with a sliding window), scores scaled and soft-capped as the layer's options say.
 *  out (T, H*D) assigned; q (T, H*D) post-rope; caches (maxLen, KV*D). */
function cachedAttention(out: Float32Array, q: Float32Array, kc: Float32Array, vc: Float32Array, pos: number,
  T: number, H: number, KV: number, D: number, opts?: AttentionOptions): void {
  const { scale, softcap, window } = attentionOptions(D, opts);
  const group = H / KV;
  const kvDim = KV * D;
  const scores = new Float64Array(pos + T);
  const acc = new Float64Array(D);
  for (let t = 0; t < T; t++) {
    const n = pos + t + 1;
    const lo = window > 0 ? Math.max(0, n - window) : 0;
    for (let h = 0; h < H; h++) {
      const kvh = Math.floor(h / group);
      const qo = (t * H + h) * D;
      let mx = -Infinity;
      for (let j = lo; j < n; j++) {
        const ko = j * kvDim + kvh * D;
        let d = 0;
        for (let e = 0; e < D; e++) d += q[qo + e] * kc[ko + e];
        d *= scale;
        if (softcap > 0) d = softcap * Math.tanh(d / softcap);
        scores[j] = d;
        if (d > mx) mx = d;
      }
      let sum = 0;
      acc.fill(0);
      for (let j = lo; j < n; j++) {
        const w = Math.exp(scores[j] - mx);
        sum += w;
        const vo = j * kvDim + kvh * D;
        for (let e = 0; e < D; e++) acc[e] += w * vc[vo + e];
      }
      for (let e = 0; e < D; e++) out[qo + e] = acc[e] / sum;
    }
  }
}

/** The decoding side of a stage (engine/model/stage.ts hands it out): the same layers, embedding and head,
 *  no kept micro-batches; nothing stays on the device between calls. */
export class StageDecoding<Buf> implements Decodable {
  private readonly config: LlamaConfig;
  private readonly layerStart: number;
  private readonly layerEnd: number;
  private readonly backend: Backend;
  private readonly tensors: TensorBackend<Buf>;
  private readonly params: readonly NamedTensor[];
  private readonly layers: readonly DecoderLayer[];
  private readonly embed: VocabMatrix | null;
  private readonly head: LossHead | null;
  private disposed = false;

  constructor(parts: {
    config: LlamaConfig; layerStart: number; layerEnd: number; backend: Backend; tensors: TensorBackend<Buf>;
    params: readonly NamedTensor[]; layers: readonly DecoderLayer[]; embed: VocabMatrix | null; head: LossHead | null;
  }) {
    this.config = parts.config;
    this.layerStart = parts.layerStart;
    this.layerEnd = parts.layerEnd;
    this.backend = parts.backend;
    this.tensors = parts.tensors;
    this.params = parts.params;
    this.layers = parts.layers;
    this.embed = parts.embed;
    this.head = parts.head;
  }

  dispose(): void {
    this.disposed = true;
  }

  async logits(ids: Int32Array, B: number, S: number): Promise<Float32Array> {
    this.checkAlive();
    if (!this.holdsWholeModel()) {
      throw new Error(`logits: needs a stage holding the whole model, this one holds layers [${this.layerStart}, ${this.layerEnd}) of ${this.config.numHiddenLayers}`);
    }
    const T = B * S;
    const x = await this.hidden(ids, B, S);
    try {
      return await this.head!.logits(this.tensors, x, T);
    } finally {
      this.tensors.free(x);
    }
  }

  createDecoder(maxLen: number): Decoder {
    if (!Number.isInteger(maxLen) || maxLen <= 0) throw new RangeError(`createDecoder: maxLen must be a positive integer, got ${maxLen}`);
    if (!this.holdsWholeModel()) throw new Error('generate: needs a stage holding the whole model');
    const cache = new KVCache(maxLen, this.layers.length, this.config);
    return {
      get length() { return cache.pos; },
      append: (ids) => this.append(cache, Int32Array.from(ids)),
    };
  }

  private holdsWholeModel(): boolean {
    return this.layerStart === 0 && this.layerEnd === this.config.numHiddenLayers;
  }

  private checkAlive(): void {
    if (this.disposed) throw new Error('stage: used after dispose()');
  }

  /** the last layer's output (T, C) for ids (B*S), no dropout; the caller frees it */
  private async hidden(ids: Int32Array, B: number, S: number): Promise<Buf> {
    const t = this.tensors;
    const T = B * S;
    if (!(ids instanceof Int32Array) || ids.length !== T) throw new RangeError(`logits: ids must be Int32Array(${T}), got ${ids?.length}`);
    const ctx: PassContext = { B, S, T, positions: trainingPositions(B, S), train: false, dropoutSeed: 0 };
    let x: Buf = await this.embed!.embed(this.backend, t, ids, T);
    const params = new PassParams(t);
    try {
      await params.prefetch(this.params.map((p) => p.data));
      for (const layer of this.layers) {
        const { out, acts } = await layer.forward(t, x, params, ctx);
        freeLayerActs(t, acts, true);
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

  /** Append tokens to a KV cache and return the logits [V] of the last appended token. */
  private async append(cache: KVCache, ids: Int32Array): Promise<Float32Array> {
    this.checkAlive();
    const t = this.tensors;
    const T = ids.length;
    if (T === 0) throw new RangeError('decode: no tokens to append');
    if (cache.pos + T > cache.maxLen) throw new RangeError(`decode: KV cache full (${cache.pos} + ${T} > ${cache.maxLen})`);
    const C = this.config.hiddenSize;
    const positions = new Int32Array(T);
    for (let i = 0; i < T; i++) positions[i] = cache.pos + i;
    const ctx: PassContext = { B: 1, S: T, T, positions, train: false, dropoutSeed: 0 };
    let x: Buf = await this.embed!.embed(this.backend, t, ids, T);
    const params = new PassParams(t);
    try {
      await params.prefetch(this.params.map((p) => p.data));
      for (let i = 0; i < this.layers.length; i++) {
        const { out, acts } = await this.layers[i].forward(t, x, params, ctx, cache.layers[i]);
        freeLayerActs(t, acts, true);
        x = out;
      }
      cache.pos += T;
      return await this.head!.logits(t, t.slice(x, (T - 1) * C, T * C), 1);
    } finally {
      t.free(x);
      await params.free();
    }
  }
}
