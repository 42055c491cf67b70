// Global gradient-norm computation and clipping with torch.nn.utils.clip_grad_norm_ semantics (facts §9).

/** Sum of squares of every element of every gradient, accumulated in float64 so the coordinator can
 *  add per-shard partial sums and get the same total as one machine. */
export function gradSquaredSum(grads: readonly Float32Array[]): number {
  let s = 0;
  for (const g of grads) for (let i = 0; i < g.length; i++) s += g[i] * g[i];
  return s;
}

/** L2 norm over all tensors together. */
export function gradNorm(grads: readonly Float32Array[]): number {
  return Math.sqrt(gradSquaredSum(grads));
}

/** The factor clip_grad_norm_ multiplies gradients by: min(1, maxNorm / (total + 1e-6)).
 *  A non-finite total gives NaN so the caller sees it instead of silently scaling by 0. */
export function clipCoefficient(totalNorm: number, maxNorm: number): number {
  if (!Number.isFinite(totalNorm)) return Number.NaN;
  const coef = maxNorm / (totalNorm + 1e-6);
  return coef < 1 ? coef : 1;
}

/** Scale gradients in place by `coef` (no-op when coef === 1). */
export function scaleGrads(grads: readonly Float32Array[], coef: number): void {
  if (coef === 1) return;
  for (const g of grads) for (let i = 0; i < g.length; i++) g[i] *= coef;
}

/** clip_grad_norm_: returns the total norm before clipping. maxNorm <= 0 disables clipping (HF
 *  skips clipping when max_grad_norm is 0/None) but the norm is still reported. */
export function clipGradNorm(grads: readonly Float32Array[], maxNorm: number): number {
  const total = gradNorm(grads);
  if (maxNorm > 0 && Number.isFinite(total)) scaleGrads(grads, clipCoefficient(total, maxNorm));
  return total;
}
