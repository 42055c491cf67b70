// Low-rank codec for stage-boundary tensors: a [rows, cols] matrix (cols = the last dimension, rows = the
// rest) is sent as factors U [rows, k] and V [cols, k] with X ≈ U Vᵀ, each in the int8 blockwise layout.
// Stateless and deterministic (a fixed-seed sketch, randomized subspace iteration), so retries, other
// routes and restarted peers need nothing kept; a tensor the rank captures loses only int8 rounding.
//
// Layout: k = min(rank, rows, cols); int8-blockwise(U, rows*k elements, row-major) then
// int8-blockwise(V, cols*k elements, row-major). U has orthonormal columns before rounding; V = Xᵀ U.
// Error: ‖X − U Vᵀ‖_F is the best rank-k error (the randomized range finder with POWER_ITERS subspace
// iterations comes within a small factor of it; tests check against an independent eigen-solver)
// plus the int8 rounding of the factors.
import { TensorError } from '../errors.ts';
import { blockByteLength, decodeBlockwise, encodeBlockwise } from './blockwise.ts';

/** subspace iterations after the sketch: 2 bring the range finder close to the SVD's subspace */
const POWER_ITERS = 2;
const SKETCH_SEED = 0x9e3779b9;

export function lowRankDims(shape: readonly number[], rank: number): { rows: number; cols: number; k: number } {
  const n = shape.reduce((a, b) => a * b, 1);
  const cols = shape.length === 0 ? 1 : shape[shape.length - 1]!;
  const rows = cols === 0 ? 0 : n / cols;
  return { rows, cols, k: Math.min(rank, rows, cols) };
}

export function lowRankByteLength(shape: readonly number[], rank: number): number {
  const { rows, cols, k } = lowRankDims(shape, rank);
  return blockByteLength('int8', rows * k) + blockByteLength('int8', cols * k);
}

/** orthonormalize the k columns of M [m, k] in place (modified Gram-Schmidt, twice); a dependent column becomes 0 */
function orthonormalize(M: Float64Array, m: number, k: number): void {
  for (let pass = 0; pass < 2; pass++) {
    for (let j = 0; j < k; j++) {
      for (let p = 0; p < j; p++) {
        let d = 0;
        for (let i = 0; i < m; i++) d += M[i * k + j]! * M[i * k + p]!;
        for (let i = 0; i < m; i++) M[i * k + j]! -= d * M[i * k + p]!;
      }
      let s = 0;
      for (let i = 0; i < m; i++) s += M[i * k + j]! ** 2;
      const norm = Math.sqrt(s);
      // relative cut: below it the column is rounding noise of the ones before it
      const inv = norm > 1e-300 ? 1 / norm : 0;
      for (let i = 0; i < m; i++) M[i * k + j] = inv === 0 ? 0 : M[i * k + j]! * inv;
    }
  }
}

/** Y [rows, k] = X [rows, cols] · Z [cols, k] */
function mul(X: Float32Array, Z: Float64Array, rows: number, cols: number, k: number): Float64Array {
  const Y = new Float64Array(rows * k);
  for (let r = 0; r < rows; r++) {
    const yo = r * k;
    for (let c = 0; c < cols; c++) {
      const x = X[r * cols + c]!;
      if (x === 0) continue;
      const zo = c * k;
      for (let j = 0; j < k; j++) Y[yo + j]! += x * Z[zo + j]!;
    }
  }
  return Y;
}

/** Z [cols, k] = Xᵀ · Q [rows, k] */
function mulT(X: Float32Array, Q: Float64Array, rows: number, cols: number, k: number): Float64Array {
  const Z = new Float64Array(cols * k);
  for (let r = 0; r < rows; r++) {
    const qo = r * k;
    for (let c = 0; c < cols; c++) {
      const x = X[r * cols + c]!;
      if (x === 0) continue;
      const zo = c * k;
      for (let j = 0; j < k; j++) Z[zo + j]! += x * Q[qo + j]!;
    }
  }
  return Z;
}

export function encodeLowRank(data: Float32Array, shape: readonly number[], rank: number, what: string): Uint8Array {
  const { rows, cols, k } = lowRankDims(shape, rank);
  const out = new Uint8Array(lowRankByteLength(shape, rank));
  if (k === 0) return out;
  let seed = SKETCH_SEED >>> 0;
  const omega = new Float64Array(cols * k);
  for (let i = 0; i < omega.length; i++) {
    seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0;
    omega[i] = seed / 0x80000000 - 1;
  }
  let Q = mul(data, omega, rows, cols, k);
  orthonormalize(Q, rows, k);
  for (let it = 0; it < POWER_ITERS; it++) {
    const Z = mulT(data, Q, rows, cols, k);
    orthonormalize(Z, cols, k);
    Q = mul(data, Z, rows, cols, k);
    orthonormalize(Q, rows, k);
  }
  const ub = encodeBlockwise('int8', Float32Array.from(Q));
  // V from the rounded U, so V absorbs part of U's rounding (UᵀU stays ≈ I)
  const Uq = decodeBlockwise('int8', ub, rows * k, 'lowrank U');
  const V = Float32Array.from(mulT(data, Float64Array.from(Uq), rows, cols, k));
  for (let i = 0; i < V.length; i++) {
    if (!Number.isFinite(V[i]!)) throw new TensorError(`${what}: values too large for a low-rank factor (overflow at factor element ${i})`);
  }
  out.set(ub, 0);
  out.set(encodeBlockwise('int8', V), ub.length);
  return out;
}

/** Decode the factors (byte length already checked) and multiply them out; bad factor bytes are TensorErrors. */
export function decodeLowRank(bytes: Uint8Array, shape: readonly number[], rank: number, what: string): Float32Array {
  const { rows, cols, k } = lowRankDims(shape, rank);
  const out = new Float32Array(rows * cols);
  if (k === 0) return out;
  const ul = blockByteLength('int8', rows * k);
  const U = decodeBlockwise('int8', bytes.subarray(0, ul), rows * k, `${what} (factor U)`);
  const V = decodeBlockwise('int8', bytes.subarray(ul), cols * k, `${what} (factor V)`);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      let s = 0;
      for (let j = 0; j < k; j++) s += U[r * k + j]! * V[c * k + j]!;
      out[r * cols + c] = s;
    }
  }
  return out;
}
