// Float64 reference backend: every Backend op written plainly (llm.c style) as the truth the fast backends are tested against.
//
// Every op accumulates in float64 and writes float32 outputs once at the end, so its own rounding error
// is at most half an ulp of float32 per output. Speed is irrelevant here; readability is the point.
// Buffers may be longer than the op needs (callers reuse scratch buffers); shorter is an error.
import type { AttentionOptions, Backend } from '../backend.ts';
import { attentionOptions } from '../backend.ts';
import type { NF4Weight } from '../formats/nf4.ts';
import { checkNF4Absmax, isDoubleQuant } from '../formats/nf4.ts';

/** bitsandbytes NF4 code table (get_4bit_type("nf4")), index = 4-bit code (facts §1). All values are
 *  exactly representable in float32, so float64 products lut·absmax of float32 absmax are exact. */
export const NF4_CODES: readonly number[] = Object.freeze([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
  -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
  0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]);

/** √(2/π), the constant of the tanh-approximated GELU (torch gelu(approximate="tanh")) */
const GELU_C = Math.sqrt(2 / Math.PI);

/** An op was called with arguments that do not fit its contract (lengths vs dims, ids, blocksize). */
export class RefOpError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RefOpError';
  }
}

function need(op: string, what: string, arr: ArrayLike<number>, n: number): void {
  if (!Number.isFinite(n) || n < 0) throw new RefOpError(`RefBackend.${op}: size of ${what} is ${n}, not a valid element count`);
  if (arr.length < n) throw new RefOpError(`RefBackend.${op}: ${what} has length ${arr.length}, expected at least ${n}`);
}

function dims(op: string, d: Record<string, number>): void {
  for (const [k, v] of Object.entries(d)) {
    if (!Number.isInteger(v) || v < 0) throw new RefOpError(`RefBackend.${op}: ${k}=${v} must be a non-negative integer`);
  }
}

/** Checks an NF4Weight's fields against each other; returns its element count. */
export function checkNF4Weight(op: string, W: NF4Weight): number {
  dims(op, { 'W.rows': W.rows, 'W.cols': W.cols });
  const bs = W.blocksize;
  if (!Number.isInteger(bs) || bs < 32 || bs > 4096 || (bs & (bs - 1)) !== 0) {
    throw new RefOpError(`RefBackend.${op}: W.blocksize=${bs} must be a power of two in 32..4096`);
  }
  const n = W.rows * W.cols;
  if (W.packed.length < Math.ceil(n / 2)) {
    throw new RefOpError(`RefBackend.${op}: W.packed has length ${W.packed.length}, expected ${Math.ceil(n / 2)} for [${W.rows},${W.cols}]`);
  }
  try {
    checkNF4Absmax(W, `RefBackend.${op}: W [${W.rows},${W.cols}] blocksize ${bs}`, true);
  } catch (e) {
    throw new RefOpError((e as Error).message);
  }
  return n;
}

/** Block b's absmax as bitsandbytes holds it: the float32 value, or for double quantization
 *  f32(f32(code[codes[b]] · nestedAbsmax[b / nestedBlocksize]) + offset) — bitsandbytes' dequantize_blockwise
 *  product, then its float32 `absmax += offset` (two roundings, never fused). */
export function nf4AbsmaxRef(W: NF4Weight, b: number): number {
  const a = W.absmax;
  if (!isDoubleQuant(a)) return a[b];
  const product = Math.fround(a.code[a.codes[b]] * a.nestedAbsmax[Math.floor(b / a.nestedBlocksize)]);
  return Math.fround(product + a.offset);
}

/** Dequantizes an NF4 weight to float64 (exact: lut·absmax of two float32 values). Flat blocks over the
 *  whole tensor, element 2j in the high nibble of byte j (facts §1). Returns [rows*cols] row-major. */
export function nf4DequantizeRef(W: NF4Weight): Float64Array {
  const n = checkNF4Weight('nf4DequantizeRef', W);
  const out = new Float64Array(n);
  const nBlocks = Math.ceil(n / W.blocksize);
  for (let b = 0; b < nBlocks; b++) {
    const absmax = nf4AbsmaxRef(W, b);
    for (let i = b * W.blocksize; i < Math.min(n, (b + 1) * W.blocksize); i++) {
      const byte = W.packed[i >> 1];
      const code = (i & 1) === 0 ? byte >> 4 : byte & 0x0f;
      out[i] = NF4_CODES[code] * absmax;
    }
  }
  return out;
}

/** C[M,N] = alpha·op(A)·op(B) + beta·C in float64, A/B any array-likes (float64 allowed). */
export function gemmRef(transA: boolean, transB: boolean, M: number, N: number, K: number, alpha: number,
  A: ArrayLike<number>, B: ArrayLike<number>, beta: number, C: Float32Array | Float64Array): void {
  for (let i = 0; i < M; i++) {
    for (let j = 0; j < N; j++) {
      let acc = 0;
      for (let p = 0; p < K; p++) {
        const a = transA ? A[p * M + i] : A[i * K + p];
        const b = transB ? B[j * K + p] : B[p * N + j];
        acc += a * b;
      }
      // beta = 0 must ignore old contents even when they are NaN (BLAS convention)
      C[i * N + j] = beta === 0 ? alpha * acc : alpha * acc + beta * C[i * N + j];
    }
  }
}

/** Causal GQA attention forward in float64 for one (b, h): fills P (S×S, lower triangle) and returns
 *  per-row lse; shared by forward and backward so both use the same probabilities. */
/** P (S, S): row i the softmax over keys [lo_i, i] of one (b, h) (0 elsewhere), lse its log-sum-exp; F (S, S)
 *  the soft-cap's derivative 1 − tanh²(s/cap) per score (1 without a cap), all float64. */
function attentionProbs(P: Float64Array, lse: Float64Array, F: Float64Array, q: Float32Array, k: Float32Array,
  b: number, h: number, S: number, H: number, KV: number, D: number, o: AttnOpts): void {
  const kvh = Math.floor(h / (H / KV));
  P.fill(0);
  for (let i = 0; i < S; i++) {
    const qo = ((b * S + i) * H + h) * D;
    const lo = o.window > 0 ? Math.max(0, i - o.window + 1) : 0;
    let max = -Infinity;
    for (let j = lo; j <= i; j++) {
      const ko = ((b * S + j) * KV + kvh) * D;
      let dot = 0;
      for (let d = 0; d < D; d++) dot += q[qo + d] * k[ko + d];
      let sc = dot * o.scale;
      if (o.softcap > 0) {
        const th = Math.tanh(sc / o.softcap);
        sc = o.softcap * th;
        F[i * S + j] = 1 - th * th;
      } else {
        F[i * S + j] = 1;
      }
      P[i * S + j] = sc;
      if (sc > max) max = sc;
    }
    let sum = 0;
    for (let j = lo; j <= i; j++) sum += Math.exp(P[i * S + j] - max);
    const l = max + Math.log(sum);
    lse[i] = l;
    for (let j = lo; j <= i; j++) P[i * S + j] = Math.exp(P[i * S + j] - l);
  }
}

type AttnOpts = ReturnType<typeof attentionOptions>;

export class RefBackend implements Backend {
  readonly name = 'ref';
  readonly threads = 1;

  async gemm(transA: boolean, transB: boolean, M: number, N: number, K: number,
    alpha: number, A: Float32Array, B: Float32Array, beta: number, C: Float32Array): Promise<void> {
    dims('gemm', { M, N, K });
    need('gemm', 'A', A, M * K);
    need('gemm', 'B', B, K * N);
    need('gemm', 'C', C, M * N);
    gemmRef(transA, transB, M, N, K, alpha, A, B, beta, C);
  }

  async gemmNF4(M: number, X: Float32Array, W: NF4Weight, beta: number, Y: Float32Array): Promise<void> {
    checkNF4Weight('gemmNF4', W);
    dims('gemmNF4', { M });
    const N = W.rows, K = W.cols;
    need('gemmNF4', 'X', X, M * K);
    need('gemmNF4', 'Y', Y, M * N);
    gemmRef(false, true, M, N, K, 1, X, nf4DequantizeRef(W), beta, Y); // (M,K)·(N,K)ᵀ
  }

  async gemmNF4T(M: number, DY: Float32Array, W: NF4Weight, beta: number, DX: Float32Array): Promise<void> {
    checkNF4Weight('gemmNF4T', W);
    dims('gemmNF4T', { M });
    const N = W.rows, K = W.cols;
    need('gemmNF4T', 'DY', DY, M * N);
    need('gemmNF4T', 'DX', DX, M * K);
    gemmRef(false, false, M, K, N, 1, DY, nf4DequantizeRef(W), beta, DX); // (M,N)·(N,K)
  }

  async dequantNF4(W: NF4Weight, out: Float32Array): Promise<void> {
    const n = checkNF4Weight('dequantNF4', W);
    need('dequantNF4', 'out', out, n);
    out.set(nf4DequantizeRef(W));
  }

  async rmsnormForward(out: Float32Array, rstd: Float32Array, x: Float32Array, w: Float32Array,
    T: number, C: number, eps: number): Promise<void> {
    dims('rmsnormForward', { T, C });
    need('rmsnormForward', 'out', out, T * C); need('rmsnormForward', 'x', x, T * C);
    need('rmsnormForward', 'rstd', rstd, T); need('rmsnormForward', 'w', w, C);
    for (let t = 0; t < T; t++) {
      let ss = 0;
      for (let c = 0; c < C; c++) ss += x[t * C + c] * x[t * C + c];
      const r = 1 / Math.sqrt(ss / C + eps);
      for (let c = 0; c < C; c++) out[t * C + c] = x[t * C + c] * r * w[c];
      rstd[t] = r;
    }
  }

  async rmsnormBackward(dx: Float32Array, dw: Float32Array | null, dout: Float32Array, x: Float32Array,
    w: Float32Array, rstd: Float32Array, T: number, C: number): Promise<void> {
    dims('rmsnormBackward', { T, C });
    need('rmsnormBackward', 'dx', dx, T * C); need('rmsnormBackward', 'dout', dout, T * C);
    need('rmsnormBackward', 'x', x, T * C); need('rmsnormBackward', 'w', w, C);
    need('rmsnormBackward', 'rstd', rstd, T);
    if (dw) need('rmsnormBackward', 'dw', dw, C);
    const dwAcc = new Float64Array(C);
    for (let t = 0; t < T; t++) {
      const r = rstd[t];
      // y_c = w_c x_c r with r = (mean(x²)+eps)^-½ ⇒ dx_j = r w_j g_j − (r³ x_j / C) Σ_c g_c w_c x_c
      let dot = 0;
      for (let c = 0; c < C; c++) dot += dout[t * C + c] * w[c] * x[t * C + c];
      const k = r * r * r * dot / C;
      for (let c = 0; c < C; c++) {
        dx[t * C + c] = r * w[c] * dout[t * C + c] - k * x[t * C + c];
        dwAcc[c] += dout[t * C + c] * x[t * C + c] * r;
      }
    }
    if (dw) for (let c = 0; c < C; c++) dw[c] += dwAcc[c];
  }

  async rope(x: Float32Array, cos: Float32Array, sin: Float32Array, positions: Int32Array,
    T: number, nHeads: number, D: number, inverse: boolean): Promise<void> {
    dims('rope', { T, nHeads, D });
    if (D % 2 !== 0) throw new RefOpError(`RefBackend.rope: head dim D=${D} must be even`);
    const half = D / 2;
    need('rope', 'x', x, T * nHeads * D); need('rope', 'positions', positions, T);
    if (cos.length !== sin.length) throw new RefOpError(`RefBackend.rope: cos has length ${cos.length} but sin has ${sin.length}`);
    const maxPos = half > 0 ? Math.floor(cos.length / half) : 0;
    const sign = inverse ? -1 : 1; // inverse = rotation by −θ (transpose of the forward rotation)
    for (let t = 0; t < T; t++) {
      const p = positions[t];
      if (p < 0 || p >= maxPos) throw new RefOpError(`RefBackend.rope: positions[${t}]=${p} outside the cos/sin table of ${maxPos} rows`);
      for (let h = 0; h < nHeads; h++) {
        const o = (t * nHeads + h) * D;
        for (let i = 0; i < half; i++) {
          const c = cos[p * half + i], s = sign * sin[p * half + i];
          const a = x[o + i], b = x[o + i + half];
          // HF rotate_half: x' = x·cos + cat(−x[half:], x[:half])·sin
          x[o + i] = a * c - b * s;
          x[o + i + half] = b * c + a * s;
        }
      }
    }
  }

  private checkAttention(op: string, B: number, S: number, H: number, KV: number, D: number): void {
    dims(op, { B, S, H, KV, D });
    if (KV === 0 || H % KV !== 0) throw new RefOpError(`RefBackend.${op}: H=${H} must be a positive multiple of KV=${KV}`);
  }

  async attentionForward(out: Float32Array, lse: Float32Array, q: Float32Array, k: Float32Array,
    v: Float32Array, B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    this.checkAttention('attentionForward', B, S, H, KV, D);
    const o = attentionOptions(D, opts);
    const F = new Float64Array(S * S);
    const T = B * S;
    need('attentionForward', 'out', out, T * H * D); need('attentionForward', 'q', q, T * H * D);
    need('attentionForward', 'k', k, T * KV * D); need('attentionForward', 'v', v, T * KV * D);
    need('attentionForward', 'lse', lse, B * H * S);
    const P = new Float64Array(S * S);             // (S, S) probabilities of one (b, h)
    const rowLse = new Float64Array(S);
    const kvGroup = H / KV;
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        attentionProbs(P, rowLse, F, q, k, b, h, S, H, KV, D, o);
        const kvh = Math.floor(h / kvGroup);
        for (let i = 0; i < S; i++) {
          const oo = ((b * S + i) * H + h) * D;
          for (let d = 0; d < D; d++) {
            let acc = 0;
            for (let j = 0; j <= i; j++) acc += P[i * S + j] * v[((b * S + j) * KV + kvh) * D + d];
            out[oo + d] = acc;
          }
          lse[(b * H + h) * S + i] = rowLse[i];
        }
      }
    }
  }

  /** Recomputes the probabilities in float64 from q and k (the exact gradient of the forward); `out`
   *  and `lse` are only length-checked, so the reference does not inherit a fast backend's rounding. */
  async attentionBackward(dq: Float32Array, dk: Float32Array, dv: Float32Array, dout: Float32Array,
    q: Float32Array, k: Float32Array, v: Float32Array, out: Float32Array, lse: Float32Array,
    B: number, S: number, H: number, KV: number, D: number, opts?: AttentionOptions): Promise<void> {
    this.checkAttention('attentionBackward', B, S, H, KV, D);
    const o = attentionOptions(D, opts);
    const F = new Float64Array(S * S);
    const T = B * S;
    for (const [name, a, n] of [['dq', dq, T * H * D], ['dout', dout, T * H * D], ['q', q, T * H * D],
      ['out', out, T * H * D], ['dk', dk, T * KV * D], ['dv', dv, T * KV * D], ['k', k, T * KV * D],
      ['v', v, T * KV * D], ['lse', lse, B * H * S]] as const) need('attentionBackward', name, a, n);
    const scale = o.scale;
    const kvGroup = H / KV;
    const P = new Float64Array(S * S);
    const rowLse = new Float64Array(S);
    const dP = new Float64Array(S);
    const dqAcc = new Float64Array(T * H * D);
    const dkAcc = new Float64Array(T * KV * D);    // GQA: query heads of a group sum into one kv head
    const dvAcc = new Float64Array(T * KV * D);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        attentionProbs(P, rowLse, F, q, k, b, h, S, H, KV, D, o);
        const kvh = Math.floor(h / kvGroup);
        for (let i = 0; i < S; i++) {
          const qo = ((b * S + i) * H + h) * D;
          // dP_ij = dout_i·v_j;  dS_ij = P_ij (dP_ij − Σ_l P_il dP_il), times the cap's derivative F_ij
          const lo = o.window > 0 ? Math.max(0, i - o.window + 1) : 0;
          let rowDot = 0;
          for (let j = lo; j <= i; j++) {
            const vo = ((b * S + j) * KV + kvh) * D;
            let acc = 0;
            for (let d = 0; d < D; d++) acc += dout[qo + d] * v[vo + d];
            dP[j] = acc;
            rowDot += P[i * S + j] * acc;
          }
          for (let j = lo; j <= i; j++) {
            const ko = ((b * S + j) * KV + kvh) * D;
            const p = P[i * S + j];
            const dS = p * (dP[j] - rowDot) * F[i * S + j] * scale;
            for (let d = 0; d < D; d++) {
              dqAcc[qo + d] += dS * k[ko + d];
              dkAcc[ko + d] += dS * q[qo + d];
              dvAcc[ko + d] += p * dout[qo + d];
            }
          }
        }
      }
    }
    dq.set(dqAcc); dk.set(dkAcc); dv.set(dvAcc);
  }

  async swigluForward(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): Promise<void> {
    dims('swigluForward', { n });
    need('swigluForward', 'out', out, n); need('swigluForward', 'gate', gate, n); need('swigluForward', 'up', up, n);
    for (let i = 0; i < n; i++) {
      const g = gate[i];
      out[i] = g / (1 + Math.exp(-g)) * up[i];
    }
  }

  async swigluBackward(dgate: Float32Array, dup: Float32Array, dout: Float32Array, gate: Float32Array,
    up: Float32Array, n: number): Promise<void> {
    dims('swigluBackward', { n });
    for (const [name, a] of [['dgate', dgate], ['dup', dup], ['dout', dout], ['gate', gate], ['up', up]] as const) {
      need('swigluBackward', name, a, n);
    }
    for (let i = 0; i < n; i++) {
      const g = gate[i];
      const sig = 1 / (1 + Math.exp(-g));
      // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
      dgate[i] = dout[i] * up[i] * sig * (1 + g * (1 - sig));
      dup[i] = dout[i] * g * sig;
    }
  }

  async gegluForward(out: Float32Array, gate: Float32Array, up: Float32Array, n: number): Promise<void> {
    dims('gegluForward', { n });
    need('gegluForward', 'out', out, n); need('gegluForward', 'gate', gate, n); need('gegluForward', 'up', up, n);
    for (let i = 0; i < n; i++) {
      const g = gate[i];
      out[i] = 0.5 * g * (1 + Math.tanh(GELU_C * (g + 0.044715 * g * g * g))) * up[i];
    }
  }

  async gegluBackward(dgate: Float32Array, dup: Float32Array, dout: Float32Array, gate: Float32Array,
    up: Float32Array, n: number): Promise<void> {
    dims('gegluBackward', { n });
    for (const [name, a] of [['dgate', dgate], ['dup', dup], ['dout', dout], ['gate', gate], ['up', up]] as const) {
      need('gegluBackward', name, a, n);
    }
    for (let i = 0; i < n; i++) {
      const g = gate[i];
      const th = Math.tanh(GELU_C * (g + 0.044715 * g * g * g));
      // d/dg 0.5·g·(1 + th) = 0.5·(1 + th) + 0.5·g·(1 − th²)·c·(1 + 3·0.044715·g²)
      const dgelu = 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * GELU_C * (1 + 3 * 0.044715 * g * g);
      dgate[i] = dout[i] * up[i] * dgelu;
      dup[i] = dout[i] * 0.5 * g * (1 + th);
    }
  }

  async softcapForward(y: Float32Array, x: Float32Array, cap: number, n: number): Promise<void> {
    dims('softcapForward', { n });
    need('softcapForward', 'y', y, n); need('softcapForward', 'x', x, n);
    if (!(cap > 0)) throw new RefOpError(`RefBackend.softcapForward: cap must be > 0, got ${cap}`);
    for (let i = 0; i < n; i++) y[i] = cap * Math.tanh(x[i] / cap);
  }

  async softcapBackward(dx: Float32Array, dy: Float32Array, x: Float32Array, cap: number, n: number): Promise<void> {
    dims('softcapBackward', { n });
    need('softcapBackward', 'dx', dx, n); need('softcapBackward', 'dy', dy, n); need('softcapBackward', 'x', x, n);
    if (!(cap > 0)) throw new RefOpError(`RefBackend.softcapBackward: cap must be > 0, got ${cap}`);
    for (let i = 0; i < n; i++) {
      const th = Math.tanh(x[i] / cap);
      dx[i] = dy[i] * (1 - th * th);
    }
  }

  async embeddingForward(out: Float32Array, ids: Int32Array, table: Float32Array, T: number, C: number,
    V: number): Promise<void> {
    dims('embeddingForward', { T, C, V });
    need('embeddingForward', 'out', out, T * C); need('embeddingForward', 'ids', ids, T);
    need('embeddingForward', 'table', table, V * C);
    for (let t = 0; t < T; t++) {
      const id = ids[t];
      if (id < 0 || id >= V) throw new RefOpError(`RefBackend.embeddingForward: ids[${t}]=${id} outside vocabulary [0, ${V})`);
      for (let c = 0; c < C; c++) out[t * C + c] = table[id * C + c];
    }
  }

  async crossEntropyChunkForward(logits: Float32Array, labels: Int32Array, v0: number, T: number,
    Vc: number, m: Float32Array, s: Float32Array, picked: Float32Array): Promise<void> {
    dims('crossEntropyChunkForward', { v0, T, Vc });
    need('crossEntropyChunkForward', 'logits', logits, T * Vc); need('crossEntropyChunkForward', 'labels', labels, T);
    need('crossEntropyChunkForward', 'm', m, T); need('crossEntropyChunkForward', 's', s, T);
    need('crossEntropyChunkForward', 'picked', picked, T);
    for (let t = 0; t < T; t++) {
      const label = labels[t];
      if (label < 0) continue;
      let chunkMax = -Infinity;
      for (let j = 0; j < Vc; j++) chunkMax = Math.max(chunkMax, logits[t * Vc + j]);
      const mNew = Math.max(m[t], chunkMax);
      // rescale the running sum to the new max (m = −∞ and s = 0 on the first chunk)
      let sum = s[t] === 0 ? 0 : s[t] * Math.exp(m[t] - mNew);
      for (let j = 0; j < Vc; j++) sum += Math.exp(logits[t * Vc + j] - mNew);
      m[t] = mNew;
      s[t] = sum;
      if (label >= v0 && label < v0 + Vc) picked[t] = logits[t * Vc + (label - v0)];
    }
  }

  async crossEntropyChunkBackward(logits: Float32Array, labels: Int32Array, v0: number, T: number,
    Vc: number, lse: Float32Array, scale: Float32Array): Promise<void> {
    dims('crossEntropyChunkBackward', { v0, T, Vc });
    need('crossEntropyChunkBackward', 'logits', logits, T * Vc); need('crossEntropyChunkBackward', 'labels', labels, T);
    need('crossEntropyChunkBackward', 'lse', lse, T); need('crossEntropyChunkBackward', 'scale', scale, T);
    for (let t = 0; t < T; t++) {
      const label = labels[t];
      for (let j = 0; j < Vc; j++) {
        const i = t * Vc + j;
        if (label < 0) { logits[i] = 0; continue; }
        const p = Math.exp(logits[i] - lse[t]);
        logits[i] = scale[t] * (p - (v0 + j === label ? 1 : 0));
      }
    }
  }

  dispose(): void {}
}
