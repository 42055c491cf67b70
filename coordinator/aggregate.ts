// Step aggregation: replica sums in a fixed order, global gradient norm over all shards, clipping.
import { clipCoefficient, gradSquaredSum, scaleGrads } from '../engine/train/clip.ts';

/** Sum replica gradients of one stage in the given (fixed) order into a fresh array per param. */
export function sumReplicas(replicaGrads: Float32Array[][]): Float32Array[] {
  if (replicaGrads.length === 0) throw new Error('sumReplicas: no replicas');
  const out = replicaGrads[0]!.map((g) => Float32Array.from(g));
  for (let r = 1; r < replicaGrads.length; r++) {
    const rg = replicaGrads[r]!;
    if (rg.length !== out.length) throw new Error(`sumReplicas: replica ${r} has ${rg.length} tensors, replica 0 has ${out.length}`);
    for (let i = 0; i < out.length; i++) {
      const o = out[i]!, g = rg[i]!;
      if (g.length !== o.length) throw new Error(`sumReplicas: tensor ${i} of replica ${r} has ${g.length} elements, expected ${o.length}`);
      for (let j = 0; j < o.length; j++) o[j]! += g[j]!;
    }
  }
  return out;
}

/** sqrt(Σ g²) over every tensor of every stage: per-stage float64 partial sums added together,
 *  which is torch clip_grad_norm_'s total norm up to float64 rounding order. */
export function globalGradNorm(stages: Float32Array[][]): number {
  let ss = 0;
  for (const grads of stages) ss += gradSquaredSum(grads);
  return Math.sqrt(ss);
}

/** Clip every stage's gradient with the trainer's clip_grad_norm_ rule; returns the coefficient. */
export function clipInPlace(stages: Float32Array[][], norm: number, maxGradNorm: number): number {
  if (!(maxGradNorm > 0)) return 1;
  const coef = clipCoefficient(norm, maxGradNorm);
  if (!Number.isFinite(coef)) throw new Error(`the step's gradient norm is ${norm}: refusing to apply a non-finite update`);
  for (const grads of stages) scaleGrads(grads, coef);
  return coef;
}
