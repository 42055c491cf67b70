// Shared helpers for the GPU op checks: the CUDA backend (or a skip reason), random inputs and tolerance comparison.
import assert from 'node:assert/strict';
import { Rng } from '../../engine/model/rng.ts';
import type { Stage } from '../../engine/types.ts';
import { cudaUnavailableReason, loadCudaBackend, type CudaBackend } from '../../cuda/index.ts';

export const cuda: CudaBackend | null = await loadCudaBackend();
export const cudaFp32: CudaBackend | null = cuda ? await loadCudaBackend({ gemmPrecision: 'fp32' }) : null;
/** node:test `skip` value: false on a GPU machine, else the reason (reported as skipped, never passed). */
export const skip: string | false = cuda ? false : `no usable CUDA backend: ${cudaUnavailableReason()}`;

export function rng(seed: number): Rng {
  return new Rng(seed, 0x43554441 /* "CUDA" */);
}

export function randn(r: Rng, n: number, std = 1): Float32Array {
  return r.fillNormal(new Float32Array(n), 0, std);
}

/** |got - ref| <= atol + rtol·|ref| elementwise, or <= bound[i] when a per-element bound is given;
 *  also fails on NaN/Inf. Reports the worst element with its index. */
export function assertClose(what: string, got: Float32Array, ref: ArrayLike<number>,
  tol: { rtol?: number; atol?: number; bound?: ArrayLike<number> }, n = ref.length): void {
  assert.ok(got.length >= n, `${what}: got ${got.length} values, expected ${n}`);
  let worst = -1, worstExcess = 0;
  for (let i = 0; i < n; i++) {
    const g = got[i], r = ref[i];
    if (!Number.isFinite(g)) assert.fail(`${what}[${i}] = ${g} (reference ${r})`);
    const limit = tol.bound ? tol.bound[i] : (tol.atol ?? 0) + (tol.rtol ?? 0) * Math.abs(r);
    const excess = Math.abs(g - r) - limit;
    if (excess > worstExcess) { worstExcess = excess; worst = i; }
  }
  if (worst >= 0) {
    const limit = tol.bound ? tol.bound[worst] : (tol.atol ?? 0) + (tol.rtol ?? 0) * Math.abs(ref[worst]);
    assert.fail(`${what}[${worst}]: got ${got[worst]}, reference ${ref[worst]}, |diff| ${Math.abs(got[worst] - ref[worst])} > tolerance ${limit}`);
  }
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** One training micro-batch of `stage` on random inputs (ids or hidden states, and a random gradOut for
 *  a stage that is not the last): loss sum, output hidden, LoRA grads and input gradient. */
export async function randomStageStep(stage: Stage, key: string, B: number, S: number, r: Rng): Promise<{ lossSum?: number; hidden?: Float32Array; grads: Float32Array[]; gradIn?: Float32Array }> {
  const C = stage.config.hiddenSize, V = stage.config.vocabSize;
  const ids = Int32Array.from({ length: B * S }, () => r.nextU32() % V);
  const labels = Int32Array.from({ length: B * S }, (_, i) => ((i + 1) % S === 0 ? -100 : ids[i + 1]));
  const hidden = stage.isFirst ? undefined : randn(r, B * S * C);
  const grads = stage.newGrads();
  const fwd = await stage.forward({ key, batch: B, seqLen: S, ids: stage.isFirst ? ids : undefined, hidden, labels, dropoutSeed: 7 }, { train: true });
  const gradOut = stage.isLast ? undefined : randn(r, B * S * C);
  const bwd = await stage.backward(key, grads, stage.isLast ? { lossScale: 1 / (fwd.tokens ?? 1) } : { gradOut });
  return { lossSum: fwd.lossSum, hidden: fwd.hidden, grads, gradIn: bwd.gradIn };
}
