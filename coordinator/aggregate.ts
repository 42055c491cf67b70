// Step aggregation: replica sums in a fixed order, global gradient norm over all shards, clipping (the
// light tail: the norm from the stages' sums of squares, the coefficient every replica applies).
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

/** The light tail's global norm: the stages' float64 sums of squares (each the replica's
 *  gradSquaredSum of its reduced gradient) added in stage order, exactly as globalGradNorm adds them. */
export function normFromStageSums(stageSumSq: readonly number[]): number {
  let ss = 0;
  for (const x of stageSumSq) ss += x;
  return Math.sqrt(ss);
}

/** What every replica multiplies its gradient by: the trainer's clip_grad_norm_ coefficient
 *  (engine clip.ts, eps 1e-6), or no clipping when max_grad_norm ≤ 0. A non-finite norm with
 *  clipping on is refused. */
export function clipScaleFor(norm: number, maxGradNorm: number): { clip: boolean; clipScale: number } {
  if (!(maxGradNorm > 0)) return { clip: false, clipScale: 1 };
  const coef = clipCoefficient(norm, maxGradNorm);
  if (!Number.isFinite(coef)) throw new Error(`the step's gradient norm is ${norm}: refusing to apply a non-finite update`);
  return { clip: true, clipScale: coef };
}

/** Clip every stage's gradient with the trainer's clip_grad_norm_ rule; returns the coefficient. */
export function clipInPlace(stages: Float32Array[][], norm: number, maxGradNorm: number): number {
  const c = clipScaleFor(norm, maxGradNorm);
  if (!c.clip) return 1;
  for (const grads of stages) scaleGrads(grads, c.clipScale);
  return c.clipScale;
}

/** The value a strict majority of a stage's replicas reported (they hold the same reduced bits, so
 *  honest ones agree exactly), else the first one's; undefined stays undefined (not finite). */
export function majorityOf(values: ReadonlyArray<number | undefined>): number | undefined {
  for (const v of values) {
    if (values.filter((x) => Object.is(x, v)).length * 2 > values.length) return v;
  }
  return values[0];
}
