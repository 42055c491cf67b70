// The coordinator's placement and recovery decisions as pure functions: the real coordinator
// (placement.ts, step.ts, peers.ts) calls them, and so does the simulator (sim/), so both decide alike.
import type { Route } from './routes.ts';

/** The stage a late joiner takes: among the stages that fit its memory and still have a live replica,
 *  the one with the lowest summed throughput (ties: fewer live replicas, then the lower index); null
 *  when none fits. */
export function stageForLateJoiner(memoryBytes: number, need: readonly number[], liveCount: (s: number) => number, speed: (s: number) => number): number | null {
  const fits = need.map((_, s) => s).filter((s) => need[s]! <= memoryBytes && liveCount(s) > 0);
  if (fits.length === 0) return null;
  return fits.reduce((best, x) => (speed(x) < speed(best) || (speed(x) === speed(best) && liveCount(x) < liveCount(best)) ? x : best));
}

/** A stage's throughput for stageForLateJoiner: the sum of its live replicas' tokens/s, where a replica
 *  that has not reported one yet (0: a joiner just placed) counts as the stage's mean known replica.
 *  Counting it as 0 sent every joiner of one step boundary to the same stage (the sum did not move
 *  as they were added): in the simulated 64-churn run a stage reached 70 replicas while the others
 *  had one. */
export function stageThroughput(tokensPerSecond: readonly number[]): number {
  const known = tokensPerSecond.filter((t) => Number.isFinite(t) && t > 0);
  if (known.length === 0) return 0;
  const mean = known.reduce((a, b) => a + b, 0) / known.length;
  return mean * tokensPerSecond.length;
}

/** A replica to move onto an empty stage that needs `need` bytes: from the stage with the most live
 *  replicas (at least two), its slowest replica that fits; null when no stage can spare one. */
export function donorForEmptyStage(live: readonly (readonly string[])[], need: number, memoryOf: (id: string) => number, speedOf: (id: string) => number): { id: string; stage: number } | null {
  let donor: string | null = null, donorStage = -1;
  for (let t = 0; t < live.length; t++) {
    const l = live[t]!;
    if (l.length < 2 || (donorStage >= 0 && l.length <= live[donorStage]!.length)) continue;
    const fit = l.filter((id) => memoryOf(id) >= need).sort((a, b) => speedOf(a) - speedOf(b));
    if (fit.length > 0) { donor = fit[0]!; donorStage = t; }
  }
  return donor === null ? null : { id: donor, stage: donorStage };
}

/** Micro-batches whose committed route has a peer that is no longer a live replica of its stage:
 *  their gradient went with it, so they run again. */
export function brokenMicroBatches(committedRoute: ReadonlyArray<Route | null>, isLive: (s: number, id: string) => boolean): number[] {
  return committedRoute.flatMap((r, mb) => (r !== null && r.some((id, s) => !isLive(s, id)) ? [mb] : []));
}

/** The heartbeat period at n beaten peers: the base interval until n beats per interval would pass
 *  maxPerSecond, then n / maxPerSecond seconds, so the coordinator's heartbeat rate (its CPU and bytes)
 *  stays bounded at any swarm size. Each base tick sends the beats that are due, oldest first. */
export function heartbeatPeriodMs(n: number, baseMs: number, maxPerSecond: number): number {
  return Math.max(baseMs, Math.ceil((1000 * n) / maxPerSecond));
}

/** How long a peer may stay silent before it is dropped: the configured timeout, and at least two
 *  periods (one lost beat never drops a peer). An idle peer that left is found within silence + one
 *  period (+ the request timeout when its machine vanished without a reset). */
export function heartbeatSilenceMs(periodMs: number, timeoutMs: number): number {
  return Math.max(timeoutMs, 2 * periodMs);
}

/** The silence a peer is allowed. A peer still loading its stage whose heartbeats time out (its shard
 *  download fills a slow link, and the heartbeat waits behind it: 20 Mbit/s holds 5 s of a 12 MB
 *  queue) gets `loadingMs`; a loading peer whose beats are refused or reset (its process died) and a
 *  loaded one get `silenceMs`. */
export function silenceAllowedMs(silenceMs: number, loading: boolean, timedOut: boolean, loadingMs: number): number {
  return loading && timedOut ? Math.max(silenceMs, loadingMs) : silenceMs;
}

/** A heartbeat went unanswered: after `timeoutMs` of silence the peer is dropped, before that it is slow. */
export function heartbeatVerdict(silentMs: number, timeoutMs: number): 'dead' | 'slow' {
  return silentMs > timeoutMs ? 'dead' : 'slow';
}
