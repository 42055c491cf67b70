// How long the step tail's reductions among a stage's replicas take in the simulator (sim/simulate.ts).

/** What a reduction needs of a peer: its latency and its link rate. */
export interface LinkSpec { rttMs: number; bytesPerSecond: number }

/** The design's reduction (docs/scale.md): recursive halving/doubling, 2·log2(n) rounds of the slowest
 *  member's latency and twice the gradient over the slowest link. */
export function allreduceMs(ps: readonly LinkSpec[], bytes: number): number {
  if (ps.length <= 1) return 0;
  const rounds = 2 * Math.ceil(Math.log2(ps.length));
  const slow = Math.min(...ps.map((p) => p.bytesPerSecond));
  const lat = Math.max(...ps.map((p) => p.rttMs));
  return rounds * lat + 1000 * 2 * bytes * (ps.length - 1) / ps.length / slow;
}

/** The light tail as built (node/stage-host.ts reduce): replica p pulls each partner's step gradient in
 *  turn, one round trip and the gradient over the slower of the two links each. */
export function pullReduceMs(p: LinkSpec, partners: readonly LinkSpec[], bytes: number): number {
  return partners.reduce((t, q) => t + Math.max(p.rttMs, q.rttMs) + 1000 * bytes / Math.min(p.bytesPerSecond, q.bytesPerSecond), 0);
}
