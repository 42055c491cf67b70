// How a simulated step wires its micro-batches to peers: fixed routes (as built: routeFor, PeerSlots at
// inFlightPerPeer) or the `balanced` design (coordinator/routes.ts LoadRouter: each micro-batch's replicas
// picked by queue and time per micro-batch; every peer's in-flight bound sized by its own memory,
// inFlightByMemory, so a fast 24 GB GPU keeps more micro-batches in flight than an 8 GB one).
import { inFlightByMemory, inFlightPerPeer, LoadRouter, MAX_IN_FLIGHT_BY_MEMORY, PeerSlots } from '../coordinator/routes.ts';
import type { StageMemoryFn, StageRange } from '../coordinator/planner.ts';
import type { Scenario } from './scenario.ts';

export interface Wiring {
  slots: PeerSlots;
  /** null: fixed routes */
  balancer: LoadRouter | null;
  /** concurrent micro-batch workers for R routes of `depth` each (balanced: as many as the slots of the stage with the fewest) */
  workers(routable: readonly (readonly string[])[], R: number, depth: number): number;
}

export interface WiringPeers {
  memoryOf(id: string): number;
  stageOf(id: string): number | null;
  /** measured ms per micro-batch of stage s (compute and link), NaN before its first report */
  measuredMs(id: string, s: number): number;
  /** the estimate from its capability record (gemmGflops) before it reports */
  estimatedMs(id: string, s: number): number;
  /** the hop between two peers: both directions of one micro-batch at the slower link, a relayed one doubled */
  pairMs(a: string, b: string): number;
}

export function wiring(sc: Scenario, stages: readonly StageRange[], memory: StageMemoryFn, p: WiringPeers): Wiring {
  const M = sc.accumulation;
  if (sc.routes !== 'balanced') {
    return { slots: new PeerSlots(inFlightPerPeer(M)), balancer: null, workers: (_r, R, depth) => R * depth };
  }
  const max = Math.min(MAX_IN_FLIGHT_BY_MEMORY, M);
  const limits = new Map<string, number>();
  const limitOf = (id: string): number => {
    let k = limits.get(id);
    if (k === undefined) {
      const s = p.stageOf(id);
      k = s === null ? 1 : inFlightByMemory(p.memoryOf(id), memory, stages[s]!.layerStart, stages[s]!.layerEnd, max);
      limits.set(id, k);
    }
    return k;
  };
  const balancer = new LoadRouter((id, s) => { const m = p.measuredMs(id, s); return Number.isFinite(m) && m > 0 ? m : p.estimatedMs(id, s); }, p.pairMs);
  return {
    slots: new PeerSlots(inFlightPerPeer(M), limitOf),
    balancer,
    workers: (routable) => Math.max(1, Math.min(M, ...routable.map((ids) => ids.reduce((a, id) => a + limitOf(id), 0)))),
  };
}
