// Micro-batch scheduling over routes (one peer per stage): how many routes, how many micro-batches each
// keeps in flight and how many a peer may hold, each route's share of a step.
import { MAX_IN_FLIGHT_PER_ROUTE } from './planner.ts';
import type { StageMemoryFn } from './planner.ts';

/** One peer id per stage: the path a micro-batch attempt takes forward and back. */
export type Route = string[];

/** Micro-batches in flight per route: one per stage, so every stage of a pipeline has work (GPipe/1F1B
 *  fill), at most MAX_IN_FLIGHT_PER_ROUTE. A route's commit rounds run behind its window (they hold no
 *  slot), and PeerSlots keeps every peer within inFlightPerPeer however many routes share it. */
export function pipelineDepth(numStages: number): number {
  return Math.max(1, Math.min(numStages, MAX_IN_FLIGHT_PER_ROUTE));
}

/** Micro-batches in flight per peer: what the stage memory model (coordinator/spec.ts) budgets
 *  activations for on every peer, min(MAX_IN_FLIGHT_PER_ROUTE, micro-batches per step); PeerSlots holds
 *  every peer to it however many routes share the peer (R routes × pipelineDepth may exceed it). */
export function inFlightPerPeer(microBatchesPerStep: number): number {
  return Math.max(1, Math.min(MAX_IN_FLIGHT_PER_ROUTE, microBatchesPerStep));
}

/** Most micro-batches in flight on one peer when its own memory sizes it (inFlightByMemory). */
export const MAX_IN_FLIGHT_BY_MEMORY = 16;

/** Micro-batches a peer with `memoryBytes` can hold in flight on stage [a, b): the most k ≤ `max`
 *  (MAX_IN_FLIGHT_BY_MEMORY, and at most the step's micro-batches) whose stage memory (`memory`, the
 *  planner's model with k in flight) fits, at least 1 (placement already checked the default fits). */
export function inFlightByMemory(memoryBytes: number, memory: StageMemoryFn, a: number, b: number, max: number): number {
  let k = 1;
  while (k < max && memory(a, b, k + 1) <= memoryBytes) k++;
  return k;
}

/** Micro-batch attempts in flight on each peer (from the control messages out to the last report,
 *  a superset of the time a stage keeps the attempt's activations), at most `limit` per peer. A route
 *  takes one slot on every one of its peers at once or waits (all or none: routes that share peers
 *  never hold part of what another needs, so they cannot deadlock). */
export class PeerSlots {
  readonly limit: number;
  private readonly limitOf: (id: string) => number;
  private readonly held = new Map<string, number>();
  private waiters: Array<() => void> = [];
  /** the most slots any one peer held at once (tests and the bench read it) */
  maxHeld = 0;

  /** `limitOf`: a peer's own limit (inFlightByMemory), `limit` when absent */
  constructor(limit: number, limitOf?: (id: string) => number) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`PeerSlots: limit ${limit} is not a positive integer`);
    this.limit = limit;
    this.limitOf = limitOf ?? (() => limit);
  }

  heldBy(id: string): number { return this.held.get(id) ?? 0; }

  /** Take a slot on every peer of `route` if each has one free. */
  tryTake(route: readonly string[]): boolean {
    if (route.some((id) => this.heldBy(id) >= this.limitOf(id))) return false;
    for (const id of route) {
      const n = this.heldBy(id) + 1;
      this.held.set(id, n);
      if (n > this.maxHeld) this.maxHeld = n;
    }
    return true;
  }

  /** Take a slot on every peer of `route`, waiting until each has one free; rejects with the
   *  signal's reason when it aborts first. */
  async take(route: readonly string[], signal: AbortSignal): Promise<void> {
    while (!this.tryTake(route)) {
      signal.throwIfAborted();
      await new Promise<void>((resolve) => {
        const wake = () => { signal.removeEventListener('abort', wake); this.waiters = this.waiters.filter((w) => w !== wake); resolve(); };
        signal.addEventListener('abort', wake, { once: true });
        this.waiters.push(wake);
      });
    }
  }

  /** Run `fn` holding a slot on every peer of `route`. */
  async during<T>(route: readonly string[], signal: AbortSignal, fn: () => Promise<T>): Promise<T> {
    await this.take(route, signal);
    try { return await fn(); } finally { this.release(route); }
  }

  /** Give back the slots `route` took. */
  release(route: readonly string[]): void {
    for (const id of route) {
      const n = this.heldBy(id) - 1;
      if (n < 0) throw new RangeError(`PeerSlots: ${id} released more slots than it took`);
      if (n === 0) this.held.delete(id); else this.held.set(id, n);
    }
    const w = this.waiters;
    this.waiters = [];
    for (const wake of w) wake();
  }
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

/** Work that runs behind the routes' windows (the commit rounds): started as each micro-batch reports,
 *  every one settled before the step's tail. A round resolves to null (done) or a failure to retry. */
export class BehindWindow<F> {
  private pending: Array<Promise<F | null>> = [];

  get size(): number { return this.pending.length; }

  /** Track `p` (its rejection is kept for settle, never unhandled meanwhile). */
  add(p: Promise<F | null>): void {
    p.catch(() => undefined);
    this.pending.push(p);
  }

  /** Wait for every round, those added meanwhile too; each failure goes to `onFailure` in the order
   *  the rounds started. A rejected round (the step was cancelled) rejects, after all have settled. */
  async settle(onFailure: (f: F) => void | Promise<void>): Promise<void> {
    while (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      const settled = await Promise.allSettled(batch);
      for (const r of settled) if (r.status === 'rejected') throw r.reason;
      for (const r of settled) {
        const f = (r as PromiseFulfilledResult<F | null>).value;
        if (f !== null) await onFailure(f);
      }
    }
  }

  /** Wait for every round, whatever its outcome (the step failed: none outlives it). */
  async drain(): Promise<void> {
    while (this.pending.length > 0) {
      const batch = this.pending;
      this.pending = [];
      await Promise.allSettled(batch);
    }
  }
}

/** Routes wired per micro-batch by load (the `balanced` design of docs/scale.md, after SWARM's
 *  stochastic wiring): for each stage, the replica whose queue would finish this micro-batch first,
 *  (micro-batches it holds + 1) × its time per micro-batch, ties to the earlier replica. A slow peer
 *  gets work only while every faster one has that much queued, so the step's end does not wait on it,
 *  and a fast peer is never paired with a slow one for a whole step as fixed routes pair them. The
 *  hop from the previous stage's pick adds `pairMs(prev, id)` (the transfer at the slower of the two
 *  links, a relayed hop's detour). What a peer holds counts from pick to release (a pick that waits
 *  for PeerSlots counts too). */
export class LoadRouter {
  private readonly held = new Map<string, number>();
  private readonly msPerMicroBatch: (id: string, stage: number) => number;
  private readonly pairMs: (prev: string, id: string) => number;
  /** `msPerMicroBatch(id, stage)`: the peer's time per micro-batch of its stage (compute and its link,
   *  from its reported speed); NaN, Infinity or ≤ 0 is unknown (a joiner before its first report) and
   *  counts as its stage's mean of the known ones (decide.stageThroughput's rule), 1 when none is known */
  constructor(msPerMicroBatch: (id: string, stage: number) => number, pairMs: (prev: string, id: string) => number = () => 0) {
    this.msPerMicroBatch = msPerMicroBatch;
    this.pairMs = pairMs;
  }

  heldBy(id: string): number { return this.held.get(id) ?? 0; }

  /** One replica per stage, or null when a stage has none; counts it held until release. */
  pick(routable: readonly (readonly string[])[]): Route | null {
    const route: Route = [];
    for (let s = 0; s < routable.length; s++) {
      const live = routable[s]!;
      if (live.length === 0) return null;
      const per = live.map((id) => this.msPerMicroBatch(id, s));
      const known = per.filter((x) => Number.isFinite(x) && x > 0);
      const mean = known.length > 0 ? known.reduce((a, b) => a + b, 0) / known.length : 1;
      let best = live[0]!, bestMs = Infinity;
      live.forEach((id, i) => {
        const ms = (this.heldBy(id) + 1) * (Number.isFinite(per[i]!) && per[i]! > 0 ? per[i]! : mean) + (s > 0 ? this.pairMs(route[s - 1]!, id) : 0);
        if (ms < bestMs) { best = id; bestMs = ms; }
      });
      route.push(best);
    }
    for (const id of route) this.held.set(id, this.heldBy(id) + 1);
    return route;
  }

  release(route: readonly string[]): void {
    for (const id of route) {
      const n = this.heldBy(id) - 1;
      if (n <= 0) this.held.delete(id); else this.held.set(id, n);
    }
  }
}
