// The op interface every compute backend implements (native CPU, float64 reference, CUDA).
//
// Conventions (llm.c style): outputs first, inputs next, dimensions last. All buffers are
// row-major Float32Array in host memory unless stated. Parameter gradients ACCUMULATE (+=),
// activation gradients ASSIGN (=) unless an op's doc says otherwise. Every op is async: the
// native backend runs it on a worker thread so the JS event loop stays free.
//
// Shapes use T = number of tokens (batch * seqLen), C = hidden size, H = query heads,
// KV = key/value heads, D = head dim.
import type { NF4Weight } from './formats/nf4.ts';
import type { AdamWOptions, Optimizer, ParamSpec } from './optimizer.ts';

/** The ops of a backend over buffers of type Buf: host Float32Arrays for the CPU backends
 *  (`Backend`), opaque device buffers for a device-resident `TensorBackend` (CUDA). */
export interface Ops<Buf> {
  /** C[M,N] = alpha * op(A) · op(B) + beta * C.
   *  op(A) is [M,K]: A is stored [M,K], or [K,M] when transA.
   *  op(B) is [K,N]: B is stored [K,N], or [N,K] when transB.
   *  beta = 0 ignores C's previous contents (even NaN). */
  gemm(transA: boolean, transB: boolean, M: number, N: number, K: number,
    alpha: number, A: Buf, B: Buf, beta: number, C: Buf): Promise<void>;

  /** Y[M,N] = X[M,K] · Wᵀ + beta * Y, with W the NF4 weight [N,K] dequantized on the fly
   *  (never materialized whole). N = W.rows, K = W.cols. */
  gemmNF4(M: number, X: Buf, W: NF4Weight, beta: number, Y: Buf): Promise<void>;

  /** DX[M,K] = DY[M,N] · W + beta * DX, W the NF4 weight [N,K] (input gradient of x·Wᵀ). */
  gemmNF4T(M: number, DY: Buf, W: NF4Weight, beta: number, DX: Buf): Promise<void>;

  /** out[rows*cols] = dequantized W (for merge, tests and benchmarks). */
  dequantNF4(W: NF4Weight, out: Buf): Promise<void>;

  /** out[T,C] = x / sqrt(mean(x²) + eps) * w;  rstd[T] saved for backward. */
  rmsnormForward(out: Buf, rstd: Buf, x: Buf, w: Buf,
    T: number, C: number, eps: number): Promise<void>;
  /** dx[T,C] = (assign); dw[C] += when dw is given (frozen norms pass null). */
  rmsnormBackward(dx: Buf, dw: Buf | null, dout: Buf, x: Buf,
    w: Buf, rstd: Buf, T: number, C: number): Promise<void>;

  /** In place HF rotate-half RoPE on x[T, nHeads, D]; token t uses row positions[t] of
   *  cos/sin tables [maxPos, D/2]. inverse=true applies the transpose rotation (backward). */
  rope(x: Buf, cos: Buf, sin: Buf, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void>;

  /** Causal GQA attention over B sequences of length S (T = B*S).
   *  q[T,H,D], k,v[T,KV,D] → out[T,H,D]; lse[B,H,S] (log-sum-exp of the final scores) saved.
   *  Scores s_ij = q_i·k_j · scale (scale = 1/sqrt(D) unless opts.scale), soft-capped to
   *  softcap·tanh(s/softcap) when opts.softcap > 0 (Gemma-2), over keys j ≤ i with i − j < window when
   *  opts.window > 0 (sliding-window layers). Query head h uses kv head floor(h / (H/KV)). */
  attentionForward(out: Buf, lse: Buf, q: Buf, k: Buf,
    v: Buf, B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void>;
  /** dq, dk, dv assigned (the same opts as the forward). */
  attentionBackward(dq: Buf, dk: Buf, dv: Buf, dout: Buf,
    q: Buf, k: Buf, v: Buf, out: Buf, lse: Buf,
    B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void>;

  /** out[n] = silu(gate) * up */
  swigluForward(out: Buf, gate: Buf, up: Buf, n: number): Promise<void>;
  /** dgate, dup assigned */
  swigluBackward(dgate: Buf, dup: Buf, dout: Buf, gate: Buf,
    up: Buf, n: number): Promise<void>;

  /** out[n] = gelu_tanh(gate) * up (Gemma's GeGLU, gelu_pytorch_tanh:
   *  0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))) */
  gegluForward(out: Buf, gate: Buf, up: Buf, n: number): Promise<void>;
  /** dgate, dup assigned */
  gegluBackward(dgate: Buf, dup: Buf, dout: Buf, gate: Buf,
    up: Buf, n: number): Promise<void>;

  /** y[n] = cap · tanh(x / cap) (final-logit soft-capping); y may be x (in place) */
  softcapForward(y: Buf, x: Buf, cap: number, n: number): Promise<void>;
  /** dx[n] = dy · (1 − tanh²(x / cap)) assigned, x the input of the forward; dx may be x or dy (in place) */
  softcapBackward(dx: Buf, dy: Buf, x: Buf, cap: number, n: number): Promise<void>;

  /** out[T,C] = table[ids[t], :]  (table [V,C] float32; ids checked < V) */
  embeddingForward(out: Buf, ids: Int32Array, table: Buf, T: number, C: number,
    V: number): Promise<void>;

  /** One vocabulary chunk of chunked cross-entropy, forward. logits[T,Vc] holds columns
   *  [v0, v0+Vc) of the full logits. Updates the running online-softmax state per row:
   *  m[t] (max), s[t] (sum of exp(l - m)), and sets picked[t] = logit of labels[t] when the label
   *  falls in this chunk. Rows with label < 0 (ignore index -100) are skipped entirely. */
  crossEntropyChunkForward(logits: Buf, labels: Int32Array, v0: number, T: number,
    Vc: number, m: Buf, s: Buf, picked: Buf): Promise<void>;
  /** In place: logits[T,Vc] ← scale[t] * (softmax - onehot) using the final lse[t]; rows with
   *  label < 0 become 0. */
  crossEntropyChunkBackward(logits: Buf, labels: Int32Array, v0: number, T: number,
    Vc: number, lse: Buf, scale: Buf): Promise<void>;
}

/** Attention variants beyond Llama's (Gemma): absent or 0 fields mean the default. */
export interface AttentionOptions {
  /** score scale (default 1/sqrt(D); Gemma: query_pre_attn_scalar^-0.5) */
  scale?: number;
  /** > 0: scores become softcap·tanh(score/softcap) before the softmax (attn_logit_softcapping) */
  softcap?: number;
  /** > 0: query i sees keys j with i − window < j ≤ i (sliding_window) */
  window?: number;
}

/** The attention options with their defaults filled in (softcap and window 0 = off). */
export function attentionOptions(D: number, opts?: AttentionOptions): { scale: number; softcap: number; window: number } {
  const scale = opts?.scale ?? 1 / Math.sqrt(D), softcap = opts?.softcap ?? 0, window = opts?.window ?? 0;
  if (!(scale > 0) || !Number.isFinite(scale)) throw new RangeError(`attention: scale must be a positive finite number, got ${scale}`);
  if (!(softcap >= 0) || !Number.isFinite(softcap)) throw new RangeError(`attention: softcap must be >= 0, got ${softcap}`);
  if (!Number.isSafeInteger(window) || window < 0) throw new RangeError(`attention: window must be a non-negative integer, got ${window}`);
  return { scale, softcap, window };
}

export interface Backend extends Ops<Float32Array> {
  readonly name: string;
  /** worker threads the backend uses (1 for the reference) */
  readonly threads: number;
  /** A device-resident view of this backend (activations stay in device memory between ops), when
   *  the backend has one. Stages use it instead of hostTensors(this). */
  tensors?(): TensorBackend<unknown>;
  /** The backend's own optimizer (e.g. CUDA's paged AdamW) for these params and options, or null
   *  where it has none for them (engine/train/optim.ts createOptimizer then uses the CPU AdamW). */
  createOptimizer?(params: readonly ParamSpec[], opts: AdamWOptions): Optimizer | null;
  /** release threads/handles */
  dispose(): void;
}

/** A backend whose buffers may live outside host memory (a GPU), so a stage keeps its activations
 *  there from op to op and only crosses to the host at stage boundaries (hidden states, gradients,
 *  loss sums). For the CPU backends Buf is Float32Array and every transfer is the identity
 *  (`hostTensors`). The stage code is written against this interface with Buf opaque, so the
 *  type checker guarantees it never reads a buffer on the host without `download`.
 *
 *  Rules every implementation follows:
 *  - `alloc` and `upload` give buffers the caller owns and releases with `free` (a no-op on the
 *    host); `slice` gives views that are never freed and die with their parent.
 *  - `constant` is for frozen host arrays (norm weights, biases, rope tables, lm_head): the first
 *    call per array object transfers it, later calls return the same buffer; never freed by callers.
 *  - Host implementations may return `src` itself from `upload` and `b` itself from `download`,
 *    so callers must neither mutate an uploaded array while its buffer lives nor a downloaded one
 *    they did not pass as `out`.
 *  - Ops take distinct buffers for inputs and outputs except where a doc says in place. */
export interface TensorBackend<Buf> extends Ops<Buf> {
  readonly name: string;
  /** 'host': buffers are the Float32Arrays themselves; 'device': they live in device memory */
  readonly resident: 'host' | 'device';
  /** a zero-filled buffer of n floats */
  alloc(n: number): Buf;
  /** release a buffer from alloc/upload (not a slice) */
  free(b: Buf | null | undefined): void;
  /** a buffer holding src's values */
  upload(src: Float32Array): Promise<Buf>;
  /** the buffer of a frozen host array, transferred once per array object */
  constant(src: Float32Array): Promise<Buf>;
  /** b's values on the host: into `out` when given (its length must be b's), else a new array
   *  (host implementations return b itself) */
  download(b: Buf, out?: Float32Array): Promise<Float32Array>;
  /** elements [start, end) of b, sharing its memory */
  slice(b: Buf, start: number, end: number): Buf;
  /** y[i] += x[i] for i < n */
  add(y: Buf, x: Buf, n: number): Promise<void>;
  /** y[t, j] += bias[j] for t < T, j < N */
  addBias(y: Buf, bias: Buf, T: number, N: number): Promise<void>;
  /** accumulate=false: out[i] = mask[i] ? x[i] * scale : 0;
   *  accumulate=true:  out[i] += mask[i] ? x[i] * scale : 0  (LoRA dropout forward / backward).
   *  The product and the sum are computed in float64 and rounded to float32 once at the store, as
   *  the JS expression does (scale is a float64, e.g. 1/0.9); add and addBias round each sum once. */
  maskScale(out: Buf, x: Buf, mask: Uint8Array, scale: number, n: number, accumulate: boolean): Promise<void>;
}

/** The host TensorBackend over a CPU Backend: buffers are Float32Arrays, transfers are free. */
export function hostTensors(be: Backend): TensorBackend<Float32Array> {
  return {
    name: be.name,
    resident: 'host',
    alloc: (n) => new Float32Array(n),
    free: () => {},
    upload: async (src) => src,
    constant: async (src) => src,
    download: async (b, out) => {
      if (!out) return b;
      if (out.length !== b.length) throw new RangeError(`download: out has ${out.length} elements, the buffer ${b.length}`);
      if (out !== b) out.set(b);
      return out;
    },
    slice: (b, start, end) => b.subarray(start, end),
    add: async (y, x, n) => {
      for (let i = 0; i < n; i++) y[i] += x[i];
    },
    addBias: async (y, bias, T, N) => {
      for (let t = 0; t < T; t++) {
        const row = t * N;
        for (let j = 0; j < N; j++) y[row + j] += bias[j];
      }
    },
    maskScale: async (out, x, mask, scale, n, accumulate) => {
      if (accumulate) {
        for (let i = 0; i < n; i++) if (mask[i]) out[i] += x[i] * scale;
      } else {
        for (let i = 0; i < n; i++) out[i] = mask[i] ? x[i] * scale : 0;
      }
    },
    gemm: (...a) => be.gemm(...a),
    gemmNF4: (...a) => be.gemmNF4(...a),
    gemmNF4T: (...a) => be.gemmNF4T(...a),
    dequantNF4: (...a) => be.dequantNF4(...a),
    rmsnormForward: (...a) => be.rmsnormForward(...a),
    rmsnormBackward: (...a) => be.rmsnormBackward(...a),
    rope: (...a) => be.rope(...a),
    attentionForward: (...a) => be.attentionForward(...a),
    attentionBackward: (...a) => be.attentionBackward(...a),
    swigluForward: (...a) => be.swigluForward(...a),
    swigluBackward: (...a) => be.swigluBackward(...a),
    gegluForward: (...a) => be.gegluForward(...a),
    gegluBackward: (...a) => be.gegluBackward(...a),
    softcapForward: (...a) => be.softcapForward(...a),
    softcapBackward: (...a) => be.softcapBackward(...a),
    embeddingForward: (...a) => be.embeddingForward(...a),
    crossEntropyChunkForward: (...a) => be.crossEntropyChunkForward(...a),
    crossEntropyChunkBackward: (...a) => be.crossEntropyChunkBackward(...a),
  };
}

/** The TensorBackend a stage computes on: the backend's device-resident view when it has one. */
export function tensorsOf(be: Backend): TensorBackend<unknown> {
  return be.tensors ? be.tensors() : hostTensors(be) as TensorBackend<unknown>;
}
