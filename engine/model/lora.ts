// LoRA on an NF4 frozen linear: the target linears' names and shapes, PEFT naming, scaling and init, seeded dropout masks, forward and backward.
//
// y = x·Wᵀ (+ bias) + s · (drop(x)·Aᵀ)·Bᵀ, with W frozen NF4 [out, in], A [r, in], B [out, r].
// Parameter gradients accumulate (+=); the input gradient is assigned or accumulated as the caller asks.
import type { TensorBackend } from '../backend.ts';
import type { NF4Weight } from '../formats/nf4.ts';
import type { LlamaConfig, LoraConfig, LoraTarget, NamedTensor } from '../types.ts';
import { ALL_TARGETS } from '../types.ts';
import { Rng } from './rng.ts';

/** attention projections live under self_attn, the MLP ones under mlp (HF Llama module tree) */
export function moduleGroup(module: LoraTarget): 'self_attn' | 'mlp' {
  return module === 'gate_proj' || module === 'up_proj' || module === 'down_proj' || module === 'gate_up_proj' ? 'mlp' : 'self_attn';
}

/** HF base weight name prefix, e.g. "model.layers.3.self_attn.q_proj" */
export function baseModuleName(layer: number, module: LoraTarget): string {
  return `model.layers.${layer}.${moduleGroup(module)}.${module}`;
}

/** [out_features, in_features] of a target linear (HF layout). */
export function linearShape(cfg: LlamaConfig, module: LoraTarget): [number, number] {
  const C = cfg.hiddenSize, I = cfg.intermediateSize;
  const qDim = cfg.numAttentionHeads * cfg.headDim, kvDim = cfg.numKeyValueHeads * cfg.headDim;
  switch (module) {
    case 'q_proj': return [qDim, C];
    case 'k_proj': return [kvDim, C];
    case 'v_proj': return [kvDim, C];
    case 'o_proj': return [C, qDim];
    case 'gate_proj': return [I, C];
    case 'up_proj': return [I, C];
    case 'down_proj': return [C, I];
    case 'qkv_proj': return [qDim + 2 * kvDim, C];
    case 'gate_up_proj': return [2 * I, C];
  }
}

/** PEFT key of a LoRA tensor, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" */
export function loraParamName(layer: number, module: LoraTarget, which: 'A' | 'B'): string {
  return `base_model.model.${baseModuleName(layer, module)}.lora_${which}.weight`;
}

/** alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT) */
export function loraScaling(cfg: LoraConfig): number {
  return cfg.useRslora ? cfg.loraAlpha / Math.sqrt(cfg.r) : cfg.loraAlpha / cfg.r;
}

/** Throws a RangeError naming the offending field when a LoraConfig is unusable. */
export function validateLoraConfig(cfg: LoraConfig): void {
  if (!Number.isInteger(cfg.r) || cfg.r <= 0) throw new RangeError(`lora: r must be a positive integer, got ${cfg.r}`);
  if (!Number.isFinite(cfg.loraAlpha)) throw new RangeError(`lora: lora_alpha must be finite, got ${cfg.loraAlpha}`);
  if (!(cfg.loraDropout >= 0 && cfg.loraDropout < 1)) {
    throw new RangeError(`lora: lora_dropout must be in [0, 1), got ${cfg.loraDropout}`);
  }
  loraTargets(cfg.targetModules);
  if (cfg.initLoraWeights !== true && cfg.initLoraWeights !== 'gaussian') {
    throw new RangeError(`lora: init_lora_weights must be true or "gaussian", got ${JSON.stringify(cfg.initLoraWeights)}`);
  }
}

/** Target module names as LoraTargets, refused with a RangeError naming the first unknown one. Names from
 *  outside the engine (a run's assignment on the wire) are checked here, where they are used. */
export function loraTargets(names: readonly string[]): LoraTarget[] {
  for (const m of names) {
    if (!(ALL_TARGETS as readonly string[]).includes(m)) {
      throw new RangeError(`lora: unknown target module "${m}" (expected one of ${ALL_TARGETS.join(', ')})`);
    }
  }
  return [...names] as LoraTarget[];
}

/** A module's place in a layer's checkpoint order, the same for every family: q, k, v (or the fused qkv), o,
 *  gate, up (or gate_up), down. Stage params and adapter files list a layer's tensors in this order. */
export function moduleRank(m: LoraTarget): number {
  return m === 'qkv_proj' ? 2.5 : m === 'gate_up_proj' ? 5.5 : ALL_TARGETS.indexOf(m);
}

/** Targets in the fixed canonical order (ALL_TARGETS), independent of the user's list order, so every
 *  replica orders params identically. */
export function orderedTargets(cfg: LoraConfig): LoraTarget[] {
  const set = new Set(cfg.targetModules);
  return ALL_TARGETS.filter((m) => set.has(m));
}

/** PEFT init of lora_A [r, in] keyed by (seed, layer, module) so any stage split inits identically.
 *  true: kaiming_uniform_(a=√5) ⇒ U(±1/√in); "gaussian": N(0, (1/r)²). lora_B stays zero. */
export function initLoraA(out: Float32Array, r: number, inFeatures: number, init: true | 'gaussian', seed: number,
  layer: number, module: LoraTarget): void {
  if (out.length !== r * inFeatures) throw new RangeError(`initLoraA: buffer length ${out.length} != r*in = ${r * inFeatures}`);
  const rng = new Rng(seed, 0x4c6f5241 /* "LoRA" */, layer, ALL_TARGETS.indexOf(module));
  if (init === 'gaussian') rng.fillNormal(out, 0, 1 / r);
  else {
    const bound = 1 / Math.sqrt(inFeatures);
    rng.fillUniform(out, -bound, bound);
  }
}

/** Elements of mask generation between yields to the event loop: ~2 ms of work, so a 30M-element mask of a
 *  real model (T=2048 × 14336) never blocks heartbeats for long. */
const MASK_YIELD_ELEMENTS = 1 << 19;

/** Dropout keep-mask [n] (1 = keep) from a PRNG keyed by (dropoutSeed, layer, module): the recompute in
 *  backward regenerates the very same mask. Each 32-bit draw gives two 16-bit uniforms; an element is
 *  dropped when its uniform is below round(p·65536), i.e. p is honoured to 1/65536. */
export async function dropoutMask(n: number, p: number, dropoutSeed: number, layer: number, module: LoraTarget): Promise<Uint8Array> {
  const rng = new Rng(dropoutSeed, 0x44726f70 /* "Drop" */, layer, ALL_TARGETS.indexOf(module));
  const threshold = Math.round(p * 65536);
  const mask = new Uint8Array(n);
  const words = new Uint32Array(MASK_YIELD_ELEMENTS / 2);
  for (let start = 0; start < n; start += MASK_YIELD_ELEMENTS) {
    if (start > 0) await new Promise<void>((resolve) => setImmediate(resolve));
    const end = Math.min(n, start + MASK_YIELD_ELEMENTS); // even start ⇒ pairs never straddle chunks
    const w = rng.fillU32(words.subarray(0, (end - start + 1) >> 1));
    for (let i = start, j = 0; i < end; i += 2, j++) {
      const u = w[j];
      mask[i] = (u & 0xffff) >= threshold ? 1 : 0;
      if (i + 1 < end) mask[i + 1] = (u >>> 16) >= threshold ? 1 : 0;
    }
  }
  return mask;
}

/** What a LoRA linear keeps from forward for its backward. */
export interface LinearSaved<Buf = Float32Array> {
  /** input of the LoRA branch after dropout [T, in] (the layer input itself without dropout) */
  xd: Buf | null;
  /** keep-mask of the dropout [T, in], null without dropout */
  mask: Uint8Array | null;
  /** xd · Aᵀ [T, r] */
  ax: Buf | null;
}

/** The LoRA tensors of one pass (a micro-batch's forward, or its backward with the recompute) on the
 *  TensorBackend: each uploaded at its first use and released together when the pass ends, so a device
 *  copies each A and B once per pass instead of once per use. Host backends use the arrays themselves
 *  (upload is the identity), so what the ops read is the params' current data as before. */
export class PassParams<Buf> {
  private readonly t: TensorBackend<Buf>;
  private readonly bufs = new Map<Float32Array, Promise<Buf>>();
  constructor(t: TensorBackend<Buf>) {
    this.t = t;
  }
  get(a: Float32Array): Promise<Buf> {
    let b = this.bufs.get(a);
    if (b === undefined) {
      b = this.t.upload(a);
      this.bufs.set(a, b);
    }
    return b;
  }
  /** Upload these arrays now, before the pass queues its kernels: on a device an upload from host
   *  memory waits for the queued work, so uploading at first use mid-pass would stall the GPU once
   *  per layer instead of once per pass. */
  async prefetch(arrays: readonly Float32Array[]): Promise<void> {
    if (this.t.resident === 'host') return; // host uploads are the arrays themselves: nothing waits
    for (const a of arrays) await this.get(a);
  }

  /** release every uploaded tensor (uploads that failed hold nothing) */
  async free(): Promise<void> {
    const all = [...this.bufs.values()];
    this.bufs.clear();
    for (const p of all) {
      const b = await p.catch(() => null);
      if (b !== null) this.t.free(b);
    }
  }
}

/** Release what a linear saved for backward (xd only when dropout made a copy of the input). */
export function freeLinearSaved<Buf>(t: TensorBackend<Buf>, saved: LinearSaved<Buf>): void {
  if (saved.mask !== null) t.free(saved.xd);
  t.free(saved.ax);
  saved.xd = null;
  saved.ax = null;
}

export interface LinearContext {
  /** apply LoRA dropout (training forward) */
  train: boolean;
  dropoutSeed: number;
}

export interface LoraAdapterSlot {
  A: NamedTensor;
  B: NamedTensor;
  /** indices of A and B in the stage's params / grads arrays */
  aIndex: number;
  bIndex: number;
  r: number;
  scaling: number;
  dropout: number;
}

/** One frozen NF4 linear of layer `layer`, with an optional LoRA adapter and optional frozen bias. A part of
 *  a fused linear (Phi-3's q of qkv_proj) holds the fused weight's rows [rowOffset, rowOffset + out) and the
 *  fused adapter: lora_A whole, lora_B's same rows, the dropout mask of the fused module; the parts' dA and
 *  dX sum to the fused module's, so the adapter is exactly PEFT's on the fused linear. */
export class LoraLinear {
  readonly layer: number;
  readonly module: LoraTarget;
  readonly weight: NF4Weight;
  readonly bias: Float32Array | null;
  readonly lora: LoraAdapterSlot | null;
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** first row of this part in the fused module (0 for a plain linear) */
  readonly rowOffset: number;

  constructor(layer: number, module: LoraTarget, weight: NF4Weight, bias: Float32Array | null, lora: LoraAdapterSlot | null, rowOffset = 0) {
    this.layer = layer;
    this.module = module;
    this.weight = weight;
    this.bias = bias;
    this.lora = lora;
    this.rowOffset = rowOffset;
    this.inFeatures = weight.cols;
    this.outFeatures = weight.rows;
    if (bias && bias.length !== weight.rows) {
      throw new RangeError(`${baseModuleName(layer, module)}.bias: expected length ${weight.rows}, got ${bias.length}`);
    }
  }

  /** this part's rows of a lora_B-shaped buffer [fused out, r] (the buffer itself for a plain linear) */
  private rowsOfB<Buf>(t: TensorBackend<Buf>, b: Buf, r: number): Buf {
    if (this.lora !== null && this.outFeatures * r === this.lora.B.data.length) return b;
    return t.slice(b, this.rowOffset * r, (this.rowOffset + this.outFeatures) * r);
  }

  /** y[T, out] = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ. Reads the LoRA tensors' .data at call time. */
  async forward<Buf>(t: TensorBackend<Buf>, x: Buf, T: number, ctx: LinearContext, params: PassParams<Buf>): Promise<{ y: Buf; saved: LinearSaved<Buf> }> {
    const out = this.outFeatures, inF = this.inFeatures;
    const y = t.alloc(T * out);
    await t.gemmNF4(T, x, this.weight, 0, y);
    if (this.bias) await t.addBias(y, await t.constant(this.bias), T, out);
    const saved: LinearSaved<Buf> = { xd: null, mask: null, ax: null };
    const lora = this.lora;
    if (lora === null) return { y, saved };
    const { r, scaling } = lora;
    let xd = x;
    let mask: Uint8Array | null = null;
    if (ctx.train && lora.dropout > 0) {
      mask = await dropoutMask(T * inF, lora.dropout, ctx.dropoutSeed, this.layer, this.module);
      xd = t.alloc(T * inF);
      await t.maskScale(xd, x, mask, 1 / (1 - lora.dropout), T * inF, false);
    }
    const A = await params.get(lora.A.data), B = this.rowsOfB(t, await params.get(lora.B.data), r);
    const ax = t.alloc(T * r); // (T, r)
    await t.gemm(false, true, T, r, inF, 1, xd, A, 0, ax);
    await t.gemm(false, true, T, out, r, scaling, ax, B, 1, y);
    saved.xd = xd;
    saved.mask = mask;
    saved.ax = ax;
    return { y, saved };
  }

  /** dA, dB += (into grads at the slot indices); dX (if given) gets x-gradient, assigned when
   *  accumulate=false and added otherwise. dX=null skips the input gradient (first layer of stage 0).
   *  grads are buffers of t (the stage uploads the host grads once per backward). */
  async backward<Buf>(t: TensorBackend<Buf>, dY: Buf, saved: LinearSaved<Buf>, T: number, grads: Buf[],
    dX: Buf | null, accumulate: boolean, params: PassParams<Buf>): Promise<void> {
    const out = this.outFeatures, inF = this.inFeatures;
    if (dX) await t.gemmNF4T(T, dY, this.weight, accumulate ? 1 : 0, dX);
    const lora = this.lora;
    if (lora === null) return;
    if (!saved.xd || !saved.ax) throw new Error(`${baseModuleName(this.layer, this.module)}: backward without saved LoRA activations`);
    const { r, scaling } = lora;
    const dA = grads[lora.aIndex], dBAll = grads[lora.bIndex];
    if (!dA || !dBAll) throw new RangeError(`grads[${lora.aIndex}], grads[${lora.bIndex}] (${lora.A.name}, ${lora.B.name}): missing`);
    const dB = this.rowsOfB(t, dBAll, r);
    const A = await params.get(lora.A.data), B = this.rowsOfB(t, await params.get(lora.B.data), r);
    const dax = t.alloc(T * r);
    try {
      // dB[out, r] += s · dYᵀ · ax
      await t.gemm(true, false, out, r, T, scaling, dY, saved.ax, 1, dB);
      // dax[T, r] = s · dY · B
      await t.gemm(false, false, T, r, out, scaling, dY, B, 0, dax);
      // dA[r, in] += daxᵀ · xd
      await t.gemm(true, false, r, inF, T, 1, dax, saved.xd, 1, dA);
      if (!dX) return;
      if (saved.mask === null) {
        // no dropout: dX += dax · A
        await t.gemm(false, false, T, inF, r, 1, dax, A, 1, dX);
      } else {
        const dxd = t.alloc(T * inF);
        try {
          await t.gemm(false, false, T, inF, r, 1, dax, A, 0, dxd);
          await t.maskScale(dX, dxd, saved.mask, 1 / (1 - lora.dropout), T * inF, true);
        } finally {
          t.free(dxd);
        }
      }
    } finally {
      t.free(dax);
    }
  }
}
