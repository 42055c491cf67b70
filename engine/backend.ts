// The op interface every compute backend implements (native CPU, float64 reference, CUDA).
//
// Conventions (llm.c style): outputs first, inputs next, dimensions last. All buffers are
// row-major Float32Array in host memory unless stated. Parameter gradients ACCUMULATE (+=),
// activation gradients ASSIGN (=) unless an op's doc says otherwise. Every op is async: the
// native backend runs it on a worker thread so the JS event loop stays free.
//
// Shapes use T = number of tokens (batch * seqLen), C = hidden size, H = query heads,
// KV = key/value heads, D = head dim.

/** An NF4-quantized 2-D weight [rows, cols] = [out_features, in_features], bitsandbytes layout,
 *  with the per-block absmax already decoded to float32 (double quantization undone at load). */
export interface NF4Weight {
  /** packed codes: flat element 2j in the high nibble, 2j+1 in the low nibble; length ceil(n/2) */
  packed: Uint8Array;
  /** float32 absmax per block of `blocksize` consecutive flat elements; length ceil(n/blocksize) */
  absmax: Float32Array;
  rows: number;
  cols: number;
  /** power of two, 32..4096; 64 by default */
  blocksize: number;
}

export interface Backend {
  readonly name: string;
  /** worker threads the backend uses (1 for the reference) */
  readonly threads: number;

  /** C[M,N] = alpha * op(A) · op(B) + beta * C.
   *  op(A) is [M,K]: A is stored [M,K], or [K,M] when transA.
   *  op(B) is [K,N]: B is stored [K,N], or [N,K] when transB.
   *  beta = 0 ignores C's previous contents (even NaN). */
  gemm(transA: boolean, transB: boolean, M: number, N: number, K: number,
    alpha: number, A: Float32Array, B: Float32Array, beta: number, C: Float32Array): Promise<void>;

  /** Y[M,N] = X[M,K] · Wᵀ + beta * Y, with W the NF4 weight [N,K] dequantized on the fly
   *  (never materialized whole). N = W.rows, K = W.cols. */
  gemmNF4(M: number, X: Float32Array, W: NF4Weight, beta: number, Y: Float32Array): Promise<void>;

  /** DX[M,K] = DY[M,N] · W + beta * DX, W the NF4 weight [N,K] (input gradient of x·Wᵀ). */
  gemmNF4T(M: number, DY: Float32Array, W: NF4Weight, beta: number, DX: Float32Array): Promise<void>;

  /** out[rows*cols] = dequantized W (for merge, tests and benchmarks). */
  dequantNF4(W: NF4Weight, out: Float32Array): Promise<void>;

  /** out[T,C] = x / sqrt(mean(x²) + eps) * w;  rstd[T] saved for backward. */
  rmsnormForward(out: Float32Array, rstd: Float32Array, x: Float32Array, w: Float32Array,
    T: number, C: number, eps: number): Promise<void>;
  /** dx[T,C] = (assign); dw[C] += when dw is given (frozen norms pass null). */
  rmsnormBackward(dx: Float32Array, dw: Float32Array | null, dout: Float32Array, x: Float32Array,
    w: Float32Array, rstd: Float32Array, T: number, C: number): Promise<void>;

  /** In place HF rotate-half RoPE on x[T, nHeads, D]; token t uses row positions[t] of
   *  cos/sin tables [maxPos, D/2]. inverse=true applies the transpose rotation (backward). */
  rope(x: Float32Array, cos: Float32Array, sin: Float32Array, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void>;

  /** Causal GQA attention over B sequences of length S (T = B*S).
   *  q[T,H,D], k,v[T,KV,D] → out[T,H,D]; lse[B,H,S] (log-sum-exp of scaled scores) saved.
   *  scale = 1/sqrt(D). Query head h uses kv head floor(h / (H/KV)). */
  attentionForward(out: Float32Array, lse: Float32Array, q: Float32Array, k: Float32Array,
    v: Float32Array, B: number, S: number, H: number, KV: number, D: number): Promise<void>;
  /** dq, dk, dv assigned. */
  attentionBackward(dq: Float32Array, dk: Float32Array, dv: Float32Array, dout: Float32Array,
    q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, lse: Float32Array,
    B: number, S: number, H: number, KV: number, D: number): Promise<void>;

  /** out[n] = silu(gate) * up */
  swigluForward(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): Promise<void>;
  /** dgate, dup assigned */
  swigluBackward(dgate: Float32Array, dup: Float32Array, dout: Float32Array, gate: Float32Array,
    up: Float32Array, n: number): Promise<void>;

  /** out[T,C] = table[ids[t], :]  (table [V,C] float32; ids checked < V) */
  embeddingForward(out: Float32Array, ids: Int32Array, table: Float32Array, T: number, C: number,
    V: number): Promise<void>;

  /** One vocabulary chunk of chunked cross-entropy, forward. logits[T,Vc] holds columns
   *  [v0, v0+Vc) of the full logits. Updates the running online-softmax state per row:
   *  m[t] (max), s[t] (sum of exp(l - m)), and sets picked[t] = logit of labels[t] when the label
   *  falls in this chunk. Rows with label < 0 (ignore index -100) are skipped entirely. */
  crossEntropyChunkForward(logits: Float32Array, labels: Int32Array, v0: number, T: number,
    Vc: number, m: Float32Array, s: Float32Array, picked: Float32Array): Promise<void>;
  /** In place: logits[T,Vc] ← scale[t] * (softmax - onehot) using the final lse[t]; rows with
   *  label < 0 become 0. */
  crossEntropyChunkBackward(logits: Float32Array, labels: Int32Array, v0: number, T: number,
    Vc: number, lse: Float32Array, scale: Float32Array): Promise<void>;

  /** release threads/handles */
  dispose(): void;
}
