// Stage planner: contiguous layer ranges and replica assignment from advertised peer memory.
import { CapacityError } from '../protocol/errors.ts';

export interface PlanPeer {
  peerId: string;
  memoryBytes: number;
  gemmGflops: number;
}

export interface StageRange { layerStart: number; layerEnd: number }

export interface Plan {
  stages: StageRange[];
  /** per stage, its replica peer ids in a fixed order (the aggregation order) */
  replicas: string[][];
  /** peers that fit no stage, with the reason in words */
  rejected: Map<string, string>;
}

/** Most micro-batches in flight on one peer (coordinator/routes.ts inFlightPerPeer, PeerSlots), and so
 *  in one route's window; each holds its checkpointed layer inputs on every stage it has passed until
 *  its backward. */
export const MAX_IN_FLIGHT_PER_ROUTE = 4;

/** bytes a stage [a, b) needs on a peer (the trainer's memory model, bound to the run's settings), with
 *  `inFlight` micro-batches in flight on it (default: the run's inFlightPerPeer) */
export type StageMemoryFn = (layerStart: number, layerEnd: number, inFlight?: number) => number;

/** Split [0, L) into n contiguous ranges whose sizes differ by at most one (earlier stages take the
 *  extra layer: the last stage also carries the head and the loss). */
export function evenRanges(numLayers: number, n: number): StageRange[] {
  if (!Number.isInteger(n) || n < 1 || n > numLayers) throw new CapacityError(`cannot cut ${numLayers} layers into ${n} pipeline stages`);
  const out: StageRange[] = [];
  let a = 0;
  for (let i = 0; i < n; i++) {
    const size = Math.floor(numLayers / n) + (i < numLayers % n ? 1 : 0);
    out.push({ layerStart: a, layerEnd: a + size });
    a += size;
  }
  return out;
}

function fmtGiB(b: number): string {
  return `${(b / 2 ** 30).toFixed(2)} GiB`;
}

/** Assign peers to fixed ranges: larger peers first, each to the fitting stage with the fewest
 *  replicas (ties: the stage needing the most memory, so small peers keep the easy stages). */
function assign(peers: PlanPeer[], stages: StageRange[], need: number[]): { replicas: string[][]; rejected: Map<string, string> } {
  const replicas: string[][] = stages.map(() => []);
  const rejected = new Map<string, string>();
  const minNeed = Math.min(...need);
  const sorted = [...peers].sort((x, y) => y.memoryBytes - x.memoryBytes || (x.peerId < y.peerId ? -1 : 1));
  // first make sure every stage gets one peer, hardest stage first, taking the smallest peer that fits
  const order = stages.map((_, i) => i).sort((x, y) => need[y]! - need[x]!);
  const free = new Set(sorted.map((p) => p.peerId));
  for (const s of order) {
    const fit = sorted.filter((p) => free.has(p.peerId) && p.memoryBytes >= need[s]!);
    const pick = fit[fit.length - 1];
    if (pick !== undefined) { replicas[s]!.push(pick.peerId); free.delete(pick.peerId); }
  }
  for (const p of sorted) {
    if (!free.has(p.peerId)) continue;
    let best = -1;
    for (let s = 0; s < stages.length; s++) {
      if (p.memoryBytes < need[s]!) continue;
      if (best < 0 || replicas[s]!.length < replicas[best]!.length || (replicas[s]!.length === replicas[best]!.length && need[s]! > need[best]!)) best = s;
    }
    if (best < 0) {
      rejected.set(p.peerId, `this peer offers ${fmtGiB(p.memoryBytes)} but the smallest stage of this run needs ${fmtGiB(minNeed)}; ` +
        'start it with a larger --max-memory or on a bigger device');
    } else {
      replicas[best]!.push(p.peerId);
    }
  }
  // replica order = peer id order, so aggregation sums in an order every restart reproduces
  for (const r of replicas) r.sort();
  return { replicas, rejected };
}

/** Plan with a fixed number of stages (--pipeline-stages), or the fewest stages for which every
 *  stage has a peer that fits (fewer stages = fewer hops per micro-batch). */
export function planStages(numLayers: number, peers: PlanPeer[], memory: StageMemoryFn, pipelineStages?: number): Plan {
  if (peers.length === 0) throw new CapacityError('no peers to plan for');
  const tryN = (n: number) => {
    const stages = evenRanges(numLayers, n);
    const need = stages.map((s) => memory(s.layerStart, s.layerEnd));
    return { stages, need, ...assign(peers, stages, need) };
  };
  if (pipelineStages !== undefined) {
    const p = tryN(pipelineStages);
    const empty = p.replicas.findIndex((r) => r.length === 0);
    if (empty >= 0) {
      const s = p.stages[empty]!;
      throw new CapacityError(`no peer fits stage ${empty} (layers [${s.layerStart}, ${s.layerEnd}), needs ${fmtGiB(p.need[empty]!)}); ` +
        `largest peer offers ${fmtGiB(Math.max(...peers.map((x) => x.memoryBytes)))}`);
    }
    return { stages: p.stages, replicas: p.replicas, rejected: p.rejected };
  }
  const maxN = Math.min(numLayers, peers.length);
  for (let n = 1; n <= maxN; n++) {
    const p = tryN(n);
    if (p.replicas.every((r) => r.length > 0)) return { stages: p.stages, replicas: p.replicas, rejected: p.rejected };
  }
  const need1 = memory(0, Math.ceil(numLayers / maxN));
  throw new CapacityError(`the ${peers.length} peers cannot hold the model: even ${maxN} stages need about ${fmtGiB(need1)} each; ` +
    `largest peer offers ${fmtGiB(Math.max(...peers.map((x) => x.memoryBytes)))}`);
}
