// Micro-batch scheduling over routes (one peer per stage): how many routes, how deep each pipeline runs, each route's share of a step.
import { MAX_IN_FLIGHT_PER_ROUTE } from './planner.ts';

/** One peer id per stage: the path a micro-batch attempt takes forward and back. */
export type Route = string[];

/** Micro-batches in flight per route: one per stage, so every stage of a pipeline has work (GPipe/1F1B
 *  fill), at most MAX_IN_FLIGHT_PER_ROUTE — the figure the stage memory model (coordinator/spec.ts)
 *  budgets activations for. */
export function pipelineDepth(numStages: number): number {
  return Math.max(1, Math.min(numStages, MAX_IN_FLIGHT_PER_ROUTE));
}

/** Micro-batches per route for one step, proportional to each route's measured throughput (largest
 *  remainder, so they sum to n). While any route's throughput is unknown (0, e.g. a peer that has not
 *  computed yet) or not finite, the split is even. */
export function routeQuotas(n: number, throughputs: number[]): number[] {
  const R = throughputs.length;
  if (R === 0) return [];
  const known = throughputs.every((t) => Number.isFinite(t) && t > 0);
  const w = known ? throughputs : throughputs.map(() => 1);
  const total = w.reduce((a, b) => a + b, 0);
  const exact = w.map((x) => (n * x) / total);
  const q = exact.map((x) => Math.floor(x));
  let left = n - q.reduce((a, b) => a + b, 0);
  // the largest remainders get the rest; ties go to the lower route index (deterministic)
  const order = exact.map((x, r) => [x - Math.floor(x), r] as const).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  for (const [, r] of order) { if (left === 0) break; q[r]! += 1; left--; }
  return q;
}

/** The stages' routable replicas reordered so that route k's neighbours (replica k of stage s and of
 *  s+1) hop over the cheapest paths: stage by stage, each position takes the not yet placed replica of
 *  the next stage with the lowest `cost` to the previous stage's replica at that position (ties keep
 *  the registry's order, so with no path information — every cost equal — nothing moves). `cost`:
 *  0 for a hop known or expected direct (a publicly reachable end, or a direct or hole-punched
 *  connection reported), 1 unknown (both ends behind NATs), 2 known relayed. */
export function preferDirectHops(routable: readonly (readonly string[])[], cost: (a: string, b: string) => number): string[][] {
  const out: string[][] = routable.length > 0 ? [[...routable[0]!]] : [];
  for (let s = 1; s < routable.length; s++) {
    const prev = out[s - 1]!, left = [...routable[s]!], mine: string[] = [];
    for (let k = 0; left.length > 0; k++) {
      const a = prev.length > 0 ? prev[k % prev.length]! : null;
      let best = 0;
      if (a !== null) for (let i = 1; i < left.length; i++) if (cost(a, left[i]!) < cost(a, left[best]!)) best = i;
      mine.push(left.splice(best, 1)[0]!);
    }
    out.push(mine);
  }
  return out;
}

/** Route k over the stages' routable replicas (route k takes replica k mod n of each stage); null
 *  while a stage has none (it gets one first). */
export function routeFor(k: number, routable: readonly (readonly string[])[]): Route | null {
  const r: Route = [];
  for (const live of routable) {
    if (live.length === 0) return null;
    r.push(live[k % live.length]!);
  }
  return r;
}

/** Route r's rate: its slowest peer's tokens/s, shared among the routes that peer serves. */
export function routeRate(routes: ReadonlyArray<Route | null>, r: number, tokensPerSecond: (id: string) => number): number {
  const rt = routes[r];
  if (rt === null || rt === undefined) return 0;
  return Math.min(...rt.map((id, s) => tokensPerSecond(id) / routes.filter((o) => o?.[s] === id).length));
}
