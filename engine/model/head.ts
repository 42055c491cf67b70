// The loss head of the last stage: final RMSNorm, the vocabulary projection (lm_head) and a chunked
// cross-entropy that never holds (T, V) logits in training; whole-vocabulary logits for inference.
import type { TensorBackend } from '../backend.ts';
import type { LlamaConfig } from '../types.ts';
import type { VocabMatrix } from './vocab-matrix.ts';

export class LossHead {
  private readonly config: LlamaConfig;
  private readonly finalNorm: Float32Array; // (C)
  private readonly lmHead: VocabMatrix;     // (V, C)
  /** vocabulary rows per cross-entropy chunk */
  private readonly lossChunk: number;
  /** Gemma's final_logit_softcapping: logits become cap·tanh(logits/cap); 0 = none */
  private readonly softcap: number;

  constructor(config: LlamaConfig, finalNorm: Float32Array, lmHead: VocabMatrix, lossChunk: number, softcap = 0) {
    this.config = config;
    this.finalNorm = finalNorm;
    this.lmHead = lmHead;
    this.lossChunk = lossChunk;
    this.softcap = softcap;
  }

  /** Sum of token cross-entropies of x (T, C) against labels (T) (label < 0 ignored) and their count;
   *  lse (T), the per-token log-sum-exp of the logits, is what backward needs. */
  async forward<Buf>(t: TensorBackend<Buf>, x: Buf, labels: Int32Array, T: number): Promise<{ lossSum: number; tokens: number; lse: Float32Array }> {
    const cfg = this.config;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const chunk = Math.min(this.lossChunk, V);
    const h = t.alloc(T * C), rstd = t.alloc(T); // (T, C), (T)
    const mB = await t.upload(new Float32Array(T).fill(-Infinity)); // (T) running max
    const sB = t.alloc(T), pickedB = t.alloc(T); // (T) running sum of exp, logit of the label
    const logits = t.alloc(T * chunk); // (T, chunk)
    let m: Float32Array, s: Float32Array, picked: Float32Array;
    try {
      for await (const { v0, Vc, lc } of this.chunks(t, x, h, rstd, logits, T)) {
        if (this.softcap > 0) await t.softcapForward(lc, lc, this.softcap, T * Vc);
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

  /** dx (T, C) = d(lossSum · lossScale)/dx through the head and the final norm, for the x (T, C), labels (T)
   *  and lse (T) of forward. The caller frees dx. */
  async backward<Buf>(t: TensorBackend<Buf>, x: Buf, labels: Int32Array, lse: Float32Array, lossScale: number, T: number): Promise<Buf> {
    const cfg = this.config;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const scaleH = new Float32Array(T); // (T)
    for (let i = 0; i < T; i++) scaleH[i] = labels[i] < 0 ? 0 : lossScale;
    const chunk = Math.min(this.lossChunk, V);
    const h = t.alloc(T * C), rstd = t.alloc(T); // (T, C), (T)
    const scale = await t.upload(scaleH), lseB = await t.upload(lse); // (T), (T)
    const dh = t.alloc(T * C); // (T, C)
    const logits = t.alloc(T * chunk); // (T, chunk), overwritten by its gradient
    const capped = this.softcap > 0 ? t.alloc(T * chunk) : null; // (T, chunk) soft-capped logits, then their gradient
    const dx = t.alloc(T * C); // (T, C)
    try {
      for await (const { v0, Vc, lc, W } of this.chunks(t, x, h, rstd, logits, T)) {
        if (capped) {
          const cc = t.slice(capped, 0, T * Vc);
          await t.softcapForward(cc, lc, this.softcap, T * Vc);
          await t.crossEntropyChunkBackward(cc, labels, v0, T, Vc, lseB, scale);
          await t.softcapBackward(lc, cc, lc, this.softcap, T * Vc);
        } else {
          await t.crossEntropyChunkBackward(lc, labels, v0, T, Vc, lseB, scale);
        }
        await t.gemm(false, false, T, C, Vc, 1, lc, W, 1, dh);
      }
      await t.rmsnormBackward(dx, null, dh, x, await t.constant(this.finalNorm), rstd, T, C);
      return dx;
    } catch (e) {
      t.free(dx);
      throw e;
    } finally {
      for (const b of [h, rstd, scale, lseB, dh, logits, capped]) t.free(b);
    }
  }

  /** logits (T, V) of x (T, C): final norm and lm_head over the whole vocabulary at once (inference) */
  async logits<Buf>(t: TensorBackend<Buf>, x: Buf, T: number): Promise<Float32Array> {
    const C = this.config.hiddenSize, V = this.config.vocabSize;
    const h = t.alloc(T * C); // (T, C)
    const rstd = t.alloc(T); // (T)
    const logits = t.alloc(T * V); // (T, V)
    try {
      await t.rmsnormForward(h, rstd, x, await t.constant(this.finalNorm), T, C, this.config.rmsNormEps);
      await t.gemm(false, true, T, V, C, 1, h, await t.constant(this.lmHead.allF32()), 0, logits);
      if (this.softcap > 0) await t.softcapForward(logits, logits, this.softcap, T * V);
      return await t.download(logits);
    } finally {
      t.free(h);
      t.free(rstd);
      if (t.resident !== 'host') t.free(logits);
    }
  }

  /** lm_head rows [v0, v1) as a buffer: decoded into `scratch` on the host, a view of the resident
   *  float32 matrix on a device (never freed by the caller) */
  private async rows<Buf>(t: TensorBackend<Buf>, v0: number, v1: number, scratch: Float32Array | null): Promise<Buf> {
    const lm = this.lmHead, C = this.config.hiddenSize;
    if (t.resident === 'host') return t.upload(lm.rowsF32(v0, v1, scratch));
    return t.slice(await t.constant(lm.allF32()), v0 * C, v1 * C);
  }

  /** The final norm of x (T, C) into h (rstd saved), then per vocabulary chunk of `lossChunk` rows the
   *  logits lc = h · W_chunkᵀ (T, Vc) in `logits` (reused: each chunk overwrites the previous one). */
  private async *chunks<Buf>(t: TensorBackend<Buf>, x: Buf, h: Buf, rstd: Buf, logits: Buf, T: number): AsyncGenerator<{ v0: number; Vc: number; lc: Buf; W: Buf }> {
    const cfg = this.config;
    const C = cfg.hiddenSize, V = cfg.vocabSize;
    const chunk = Math.min(this.lossChunk, V);
    await t.rmsnormForward(h, rstd, x, await t.constant(this.finalNorm), T, C, cfg.rmsNormEps);
    const wScratch = this.lmHead.storedAsBf16 && t.resident === 'host' ? new Float32Array(chunk * C) : null;
    for (let v0 = 0; v0 < V; v0 += chunk) {
      const Vc = Math.min(chunk, V - v0);
      const lc = t.slice(logits, 0, T * Vc);
      const W = await this.rows(t, v0, v0 + Vc, wScratch);
      await t.gemm(false, true, T, Vc, C, 1, h, W, 0, lc);
      yield { v0, Vc, lc, W };
    }
  }
}
