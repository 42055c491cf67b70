// Rotary position embedding tables with Hugging Face semantics (default, linear, llama3, dynamic-within-context,
// Phi-3's longrope).
//
// HF computes inv_freq, the angles and cos/sin in float32; we round at the same points (Math.fround) so the
// tables match what the model was trained with, which matters at large positions where a float32 angle
// differs from the float64 one by ~1e-3 rad.
import type { LlamaConfig } from '../types.ts';

/** inverse frequencies [D/2] (float32-rounded values) for the config's rope_theta and rope_scaling; `long`
 *  picks longrope's long_factor (sequences past original_max_position_embeddings) */
export function ropeInvFreq(cfg: Pick<LlamaConfig, 'headDim' | 'ropeTheta' | 'ropeScaling'>, long = false): Float64Array {
  const dim = cfg.headDim;
  if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0) {
    throw new RangeError(`rope: head_dim must be a positive even integer, got ${dim}`);
  }
  if (!(cfg.ropeTheta > 0)) throw new RangeError(`rope: rope_theta must be > 0, got ${cfg.ropeTheta}`);
  const half = dim / 2;
  const inv = new Float64Array(half);
  const sc = cfg.ropeScaling;
  if (sc?.ropeType === 'longrope') {
    // _compute_longrope_parameters: 1 / (ext_factors * base ** (arange(0, dim, 2) / dim)), in float32
    const ext = long ? sc.longFactor : sc.shortFactor;
    if (!ext || ext.length !== half) throw new RangeError(`rope: longrope needs ${long ? 'long' : 'short'}_factor of ${half} entries`);
    for (let i = 0; i < half; i++) {
      const base = Math.fround(Math.pow(cfg.ropeTheta, Math.fround((2 * i) / dim)));
      inv[i] = Math.fround(1 / Math.fround(Math.fround(ext[i]) * base));
    }
    return inv;
  }
  for (let i = 0; i < half; i++) {
    // 1 / base^(arange(0, dim, 2) / dim), every step in float32 as torch does
    const exponent = Math.fround((2 * i) / dim);
    inv[i] = Math.fround(1 / Math.fround(Math.pow(cfg.ropeTheta, exponent)));
  }
  if (sc === null) return inv;
  const type = sc.ropeType;
  if (type === 'default') return inv;
  if (type === 'linear') {
    checkFactor(sc.factor, type);
    for (let i = 0; i < half; i++) inv[i] = Math.fround(inv[i] / sc.factor);
    return inv;
  }
  if (type === 'dynamic') {
    // Dynamic NTK only changes inv_freq for sequences longer than max_position_embeddings; the stage
    // refuses such positions (see ropeMaxPositions), so within context it is the default rotation.
    checkFactor(sc.factor, type);
    return inv;
  }
  if (type === 'llama3') {
    checkFactor(sc.factor, type);
    const low = sc.lowFreqFactor, high = sc.highFreqFactor, oldCtx = sc.originalMaxPositionEmbeddings;
    if (low === undefined || high === undefined || oldCtx === undefined) {
      throw new RangeError('rope: llama3 rope_scaling needs low_freq_factor, high_freq_factor and original_max_position_embeddings');
    }
    if (!(high > low)) throw new RangeError(`rope: llama3 needs high_freq_factor > low_freq_factor, got ${high} <= ${low}`);
    const lowFreqWavelen = oldCtx / low;
    const highFreqWavelen = oldCtx / high;
    for (let i = 0; i < half; i++) {
      const f = inv[i];
      const wavelen = (2 * Math.PI) / f;
      if (wavelen > lowFreqWavelen) {
        inv[i] = Math.fround(f / sc.factor);
      } else if (wavelen < highFreqWavelen) {
        inv[i] = f;
      } else {
        const smooth = (oldCtx / wavelen - low) / (high - low);
        inv[i] = Math.fround((1 - smooth) * f / sc.factor + smooth * f);
      }
    }
    return inv;
  }
  throw new RangeError(`rope: unsupported rope_scaling type "${type}" (supported: default, linear, llama3, dynamic)`);
}

function checkFactor(factor: number, type: string): void {
  if (!(factor >= 1)) throw new RangeError(`rope: ${type} rope_scaling factor must be >= 1, got ${factor}`);
}

/** cos/sin tables [maxPos, D/2] for positions 0..maxPos-1, each scaled by `scale` in float32 (longrope's
 *  attention_factor: HF multiplies emb.cos() and emb.sin() by attention_scaling) */
export function ropeTables(invFreq: Float64Array, maxPos: number, scale = 1): { cos: Float32Array; sin: Float32Array } {
  const half = invFreq.length;
  const cos = new Float32Array(maxPos * half);
  const sin = new Float32Array(maxPos * half);
  for (let p = 0; p < maxPos; p++) {
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(p * invFreq[i]);
      cos[p * half + i] = scale === 1 ? Math.cos(angle) : Math.fround(Math.cos(angle)) * scale;
      sin[p * half + i] = scale === 1 ? Math.sin(angle) : Math.fround(Math.sin(angle)) * scale;
    }
  }
  return { cos, sin };
}

/** Positions a config allows: dynamic scaling would change the tables beyond max_position_embeddings. */
export function ropeMaxPositions(cfg: Pick<LlamaConfig, 'ropeScaling' | 'maxPositionEmbeddings'>): number {
  if (cfg.ropeScaling?.ropeType === 'dynamic') return cfg.maxPositionEmbeddings;
  return Number.MAX_SAFE_INTEGER;
}

/** Tables grown on demand (doubling) so a 128k-context model does not allocate 64 MB up front.
 *  Returned arrays are never mutated afterwards, so callers in flight keep valid views. Longrope (HF's
 *  longrope_frequency_update) rotates a whole pass by the long factors once its largest position + 1 exceeds
 *  original_max_position_embeddings, and by the short ones otherwise. */
export class RopeCache {
  readonly invFreq: Float64Array;
  private readonly limit: number;
  private readonly scale: number;
  private readonly long: { original: number; cache: RopeCache } | null = null;
  private cos: Float32Array = new Float32Array(0);
  private sin: Float32Array = new Float32Array(0);
  private size = 0;

  constructor(cfg: Pick<LlamaConfig, 'headDim' | 'ropeTheta' | 'ropeScaling' | 'maxPositionEmbeddings'>) {
    this.invFreq = ropeInvFreq(cfg);
    this.limit = ropeMaxPositions(cfg);
    const sc = cfg.ropeScaling;
    this.scale = sc?.ropeType === 'longrope' ? sc.attentionFactor ?? 1 : 1;
    if (sc?.ropeType === 'longrope' && sc.longFactor) {
      const longCfg = { ...cfg, ropeScaling: { ...sc, shortFactor: sc.longFactor, longFactor: undefined } };
      this.long = { original: sc.originalMaxPositionEmbeddings ?? cfg.maxPositionEmbeddings, cache: new RopeCache(longCfg) };
    }
  }

  /** tables covering at least positions [0, maxPos) */
  get(maxPos: number): { cos: Float32Array; sin: Float32Array } {
    if (this.long !== null && maxPos > this.long.original) return this.long.cache.get(maxPos);
    if (maxPos > this.limit) {
      throw new RangeError(`rope: position ${maxPos - 1} exceeds max_position_embeddings ${this.limit} of dynamic rope scaling`);
    }
    if (maxPos > this.size) {
      const n = Math.min(this.limit, Math.max(maxPos, 2 * this.size, 256));
      const t = ropeTables(this.invFreq, n, this.scale);
      this.cos = t.cos;
      this.sin = t.sin;
      this.size = n;
    }
    return { cos: this.cos, sin: this.sin };
  }
}
