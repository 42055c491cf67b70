// Step aggregation: replica sums in a fixed order, global gradient norm over all shards, clipping.

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

/** sqrt(Σ g²) over every tensor of every stage (torch clip_grad_norm_ total norm, L2). */
export function globalGradNorm(stages: Float32Array[][]): number {
  let ss = 0;
  for (const grads of stages) for (const g of grads) for (let j = 0; j < g.length; j++) ss += g[j]! * g[j]!;
  return Math.sqrt(ss);
}

/** torch clip_grad_norm_: coef = max / (norm + 1e-6), applied only when < 1. Returns the coef used. */
export function clipInPlace(stages: Float32Array[][], norm: number, maxGradNorm: number): number {
  if (!(maxGradNorm > 0)) return 1;
  const coef = maxGradNorm / (norm + 1e-6);
  if (coef >= 1) return 1;
  const c = Math.fround(coef);
  for (const grads of stages) for (const g of grads) for (let j = 0; j < g.length; j++) g[j]! *= c;
  return coef;
}
