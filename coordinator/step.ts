// One optimizer step through the swarm as an object: routes and micro-batches, commits, the light
// tail (peer-to-peer reduce, norm, clip, parallel apply), screens, commit to the store.
import { dropoutSeedFor } from '../engine/train/data.ts';
import { labelTokensOf, planStep, stepLoss } from '../engine/train/step-plan.ts';
import type { MicroBatch, StepPlan } from '../engine/train/step-plan.ts';
import type { AppliedDigests, ReducedGradient, StagePeerClient } from '../protocol/stage-client.ts';
import { SwarmError } from '../protocol/errors.ts';
import type { HopInbox } from '../protocol/hop.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { BadOutputError } from '../protocol/screen.ts';
import { FalseReportError, referee, runAttempt } from './attempt.ts';
import { RecallError, spotCheck } from './spot-check.ts';
import { VerifyError } from './verify.ts';
import type { Verifier } from './verify.ts';
import type { AttemptContext, AttemptSpec } from './attempt.ts';
import { clipScaleFor, majorityOf, normFromStageSums } from './aggregate.ts';
import type { AdapterState } from './adapter.ts';
import type { CoordinatorConfig } from './config.ts';
import { crashPoint } from './crash.ts';
import type { PeerRegistry } from './peers.ts';
import type { StageRange } from './planner.ts';
import { BehindWindow, inFlightPerPeer, PeerSlots, pipelineDepth, preferDirectHops, routeFor, routeQuotas, routeRate } from './routes.ts';
import { brokenMicroBatches } from './decide.ts';
import type { Route } from './routes.ts';
import type { ReplicaGradient, Screens } from './screening.ts';
import type { CheckpointPlan, StageStates } from './stage-states.ts';
import type { RunStatus } from './status.ts';
import type { RunStore, StepRecord } from './store.ts';
import { abortable, sleep } from './wait.ts';

/** Where the run's micro-batches come from. */
export interface RunData {
  totalSteps: number;
  /** the micro-batches of optimizer step `step` (0-based), in order */
  microBatchesForStep(step: number): Promise<MicroBatch[]>;
  /** data cursor after `step` steps (for the commit record) */
  cursorAfter(step: number): number;
}

/** What a step works with; the same for every step of a run. */
export interface StepContext {
  hiddenSize: number;
  seed: number;
  maxGradNorm: number;
  config: CoordinatorConfig;
  /** the step's requests (its logger names the step) */
  client: StagePeerClient;
  peers: PeerRegistry;
  screens: Screens;
  adapter: AdapterState;
  states: StageStates;
  store: RunStore;
  status: RunStatus;
  data: RunData;
  stages: readonly StageRange[];
  /** give every stage a live replica before micro-batches are routed (placement) */
  cover: (signal: AbortSignal) => Promise<void>;
  /** the coordinator's end of hop streams, for referee attempts */
  hops: HopInbox;
  coordinatorId: string;
  /** the coordinator's node (a spot check sends a checker its inputs by hop) */
  node: SwarmNode;
  /** spot checks of stage computations (coordinator/verify.ts, spot-check.ts); absent: none */
  verifier?: Verifier;
}

/** A replica's reduce cancelled because another replica of the round failed first (not its fault). */
class CancelledReduce extends SwarmError {
  override name = 'CancelledReduce';
  override readonly cause: Error;
  constructor(cause: Error) { super(cause.message); this.cause = cause; }
}

/** A micro-batch attempt that failed at one peer of its route. */
class RouteFailure extends SwarmError {
  override name = 'RouteFailure';
  readonly peerId: string;
  override readonly cause: Error;
  constructor(peerId: string, cause: Error) {
    super(`at peer ${peerId}: ${cause.name}: ${cause.message}`);
    this.peerId = peerId;
    this.cause = cause;
  }
}

/** Step `plan.step` until it is committed (step + 1 durable in the store and announced). Everything it
 *  sends goes under its own signal: when the step fails or the run stops, every request still pending
 *  is cancelled with it and no worker is left running. */
export class OptimizerStep {
  private readonly ctx: StepContext;
  private readonly plan: StepPlan;
  private readonly lr: number;
  private readonly startedMs: number;
  private readonly abort = new AbortController();
  private readonly signal: AbortSignal;
  private readonly S: number;
  private readonly lossSums: Float64Array;
  /** per micro-batch: its current attempt number */
  private readonly attempts: Int32Array;
  /** per micro-batch: failures at peers that stayed up (bounded by maxAttempts) */
  private readonly strikes: Int32Array;
  /** per micro-batch: the route whose attempt committed, and that attempt's number (a spot check
   *  numbers its checkers' attempts after it) */
  private readonly committedRoute: Array<Route | null>;
  private readonly committedAttempt: Int32Array;
  /** micro-batches not yet committed, taken off in order by the route workers */
  private readonly todo: number[];
  private quota: number[] = [];
  /** per stage: the replicas whose reduce of this step counted (they apply it) */
  private reducedBy: string[][] = [];
  private taken: number[] = [];
  /** micro-batches in flight per peer, at most what the planner budgets activations for */
  private readonly slots: PeerSlots;
  /** commit rounds under way (off the routes' critical path): each settles to null or the failure to retry */
  private readonly commits = new BehindWindow<{ mb: number; failure: RouteFailure }>();

  private constructor(ctx: StepContext, plan: StepPlan, lr: number, startedMs: number, signal: AbortSignal) {
    this.ctx = ctx;
    this.plan = plan;
    this.lr = lr;
    this.startedMs = startedMs;
    this.signal = AbortSignal.any([signal, this.abort.signal]);
    this.S = ctx.stages.length;
    const n = plan.microBatches.length;
    this.lossSums = new Float64Array(n);
    this.attempts = new Int32Array(n);
    this.strikes = new Int32Array(n);
    this.committedRoute = plan.microBatches.map(() => null);
    this.committedAttempt = new Int32Array(n);
    this.todo = plan.microBatches.map((_, i) => i);
    this.slots = new PeerSlots(inFlightPerPeer(n));
  }

  /** Run step `step` with learning rate `lr` to its commit. */
  static async run(ctx: StepContext, step: number, lr: number, opts: { signal: AbortSignal }): Promise<StepRecord> {
    const startedMs = performance.now();
    const plan = planStep(step, await abortable(ctx.data.microBatchesForStep(step), opts.signal));
    const s = new OptimizerStep(ctx, plan, lr, startedMs, opts.signal);
    try {
      return await s.execute();
    } catch (e) {
      s.cancel(e as Error);
      throw e;
    } finally {
      s.cancel(new SwarmError(`step ${step} is over`));
    }
  }

  /** The one cancel path: every pending request and wait of this step rejects with `reason`. */
  cancel(reason: Error): void {
    if (!this.abort.signal.aborted) this.abort.abort(reason);
  }

  private get step(): number { return this.plan.step; }

  private async execute(): Promise<StepRecord> {
    // the light tail (docs/swarm.md "One optimizer step"): replicas reduce peer to peer, the
    // coordinator gets each stage's Σ g², computes the norm and the clip coefficient, and every stage
    // applies in parallel; nothing LoRA-sized comes here except the adapter (and state) at its cadence
    const stageSumSq = await this.reduced();
    const norm = normFromStageSums(stageSumSq);
    const clip = clipScaleFor(norm, this.ctx.maxGradNorm);
    crashPoint(this.ctx.config.crash, 'before-apply', this.step + 1);
    const states = await this.apply(clip);
    return this.commit(norm, states.plan, states.bytes);
  }

  /** Every micro-batch committed, every stage's replicas reduced peer to peer and screened: each
   *  stage's Σ g² of its reduced gradient (float64), in stage order. */
  private async reduced(): Promise<number[]> {
    const { peers, screens } = this.ctx;
    for (;;) {
      await this.computeAll();
      const got = await this.reduceAll();
      if (got === null) continue; // its micro-batches run again elsewhere
      let banned = false;
      for (let s = 0; s < this.S; s++) {
        for (const bad of screens.gradients(s, this.step, got.replicas[s]!)) {
          peers.ban(peers.get(bad.id)!, bad.reason, 'bad-tensor');
          banned = true;
        }
      }
      if (banned) continue;
      if (this.committedRoute.some((r) => r === null || this.routeBroken(r))) continue; // a peer went away meanwhile
      screens.accept(got.replicas);
      this.reducedBy = got.replicas.map((rs) => rs.map((r) => r.id));
      return got.sumSq;
    }
  }

  /** route[s] is no longer a live replica of stage s: what it held for this step is gone */
  private routeBroken(r: Route): boolean {
    return r.some((id, s) => !this.ctx.peers.liveReplicas(s).includes(id));
  }

  private routeFor(k: number): Route | null {
    const { peers } = this.ctx;
    // routes pair replicas over direct (or hole-punched) hops where the paths allow it
    return routeFor(k, preferDirectHops(this.ctx.stages.map((_, s) => peers.routable(s)), (a, b) => peers.hopCost(a, b)));
  }

  /** Run every micro-batch not yet committed to its commit. */
  private async computeAll(): Promise<void> {
    const { peers, status, client } = this.ctx;
    for (;;) {
      // a stage that lost every replica gets one first (or the run waits for a volunteer)
      await this.ctx.cover(this.signal);
      // R routes, each with a window of up to `depth` micro-batches in flight, and every peer holding
      // at most what the planner budgets activations for however many routes share it (PeerSlots):
      // while stage 1 works on one micro-batch, stage 0 already runs the next, and the hops and
      // reports of one overlap the compute of others (the stage hosts queue backward before forward,
      // so a route settles into one-forward-one-backward). Commit rounds run behind the window.
      // Results do not depend on the order: every stage folds its committed micro-batches in
      // micro-batch order.
      const R = Math.max(...this.ctx.stages.map((_, s) => peers.routable(s).length));
      const depth = pipelineDepth(this.S);
      const routes = Array.from({ length: R }, (_, r) => this.routeFor(r));
      this.quota = routeQuotas(this.todo.length, routes.map((_, r) => routeRate(routes, r, (id) => peers.get(id)?.tokensPerSecond ?? 0)));
      this.taken = this.quota.map(() => 0);
      try {
        await Promise.all(Array.from({ length: R * depth }, (_, k) => this.worker(k, R)));
      } catch (e) {
        await this.commits.drain(); // no commit round outlives the step's failure
        throw e;
      }
      // every micro-batch's commit round is done before the tail; one that failed (its attempt was
      // discarded on its route) runs its micro-batch again with a fresh attempt number
      await this.commits.settle(async (x) => { await this.failedAttempt(x.mb, x.failure); this.todo.push(x.mb); });
      if (this.todo.length > 0) continue; // a stage lost its last replica mid-step, or a commit failed
      // a replica lost (or banned, or moved) after some micro-batches committed on it took their
      // gradient with it: take those micro-batches back from the other peers of their route, run them again
      const lost = brokenMicroBatches(this.committedRoute, (s, id) => peers.liveReplicas(s).includes(id));
      if (lost.length === 0) return;
      for (const mb of lost) {
        const route = this.committedRoute[mb]!;
        await Promise.allSettled(route.filter((id, s) => peers.liveReplicas(s).includes(id)).map((id) =>
          client.discard(peers.addrs(id), { step: this.step, mb, attempt: this.committedAttempt[mb]! }, { signal: this.signal })));
        this.committedRoute[mb] = null;
        this.attempts[mb]! += 1;
        status.totals.retries++;
        this.todo.push(mb);
      }
      status.event('retry', `step ${this.step}: re-running micro-batches ${lost.join(', ')} whose gradient was held by a dropped, banned or moved peer`);
    }
  }

  /** Worker k of R routes: takes micro-batches off the queue up to its route's quota, retrying each on
   *  other routes until it commits. */
  private async worker(k: number, R: number): Promise<void> {
    const { peers, status, config } = this.ctx;
    const home = k % R;
    for (;;) {
      if (this.taken[home]! >= this.quota[home]!) return;
      const mb = this.todo.shift();
      if (mb === undefined) return;
      this.taken[home]! += 1;
      for (;;) {
        const route = this.routeFor(k + this.attempts[mb]!);
        if (route === null) { this.todo.unshift(mb); this.taken[home]! -= 1; return; }
        try {
          await this.runMicroBatch(mb, route);
          break;
        } catch (e) {
          if (!(e instanceof RouteFailure)) throw e;
          await this.failedAttempt(mb, e);
          await sleep(config.retryBackoffMs * Math.min(this.attempts[mb]!, 5), this.signal);
        }
      }
    }
  }

  /** Attempt `attempts[mb]` of micro-batch mb failed at f.peerId (already discarded on its route):
   *  the next attempt gets a fresh number; a peer that stayed up gets a strike toward maxAttempts. */
  private async failedAttempt(mb: number, f: RouteFailure): Promise<void> {
    const { peers, status, config } = this.ctx;
    this.attempts[mb]! += 1;
    status.totals.retries++;
    const p = peers.get(f.peerId);
    if (p !== undefined) p.retries = (p.retries ?? 0) + 1;
    status.event('retry', `step ${this.step} micro-batch ${mb} attempt ${this.attempts[mb]! - 1} failed at peer ${f.peerId} (${f.cause.name}: ${f.cause.message}); retrying with attempt ${this.attempts[mb]}`);
    await peers.afterFailure(f.peerId, f.cause, this.signal);
    if (!peers.gone(f.peerId)) this.strikes[mb]! += 1;
    if (this.strikes[mb]! >= config.maxAttempts) throw new SwarmError(`step ${this.step} micro-batch ${mb} failed ${config.maxAttempts} times at peers that stayed up; last: ${f.cause.message}`);
  }

  private attemptContext(): AttemptContext {
    const c = this.ctx;
    return {
      runId: c.client.runId, client: c.client, peers: c.peers, screens: c.screens, hiddenSize: c.hiddenSize,
      computeTimeoutMs: c.config.computeTimeoutMs, hops: c.hops, coordinatorId: c.coordinatorId,
    };
  }

  /** One attempt of micro-batch mb along `route`: every stage gets its control message at once (the
   *  activations and their gradients go stage to stage) while the route holds a slot on each of its
   *  peers; then, after any spot check, one commit round to every stage of the route in parallel (its
   *  gradients count now, exactly once), which runs behind the route's window: the worker takes its
   *  next micro-batch meanwhile and computeAll settles the round before the step's tail. A
   *  receiver's report of a bad tensor is refereed before anyone is banned. */
  private async runMicroBatch(mb: number, route: Route): Promise<void> {
    const { client, peers } = this.ctx;
    const signal = this.signal;
    const spec = (attempt: number): AttemptSpec => ({
      m: this.plan.microBatches[mb]!, route, key: { step: this.step, mb, attempt },
      lossScale: this.plan.lossScale, dropoutSeed: dropoutSeedFor(this.ctx.seed, this.step, mb),
    });
    const a = spec(this.attempts[mb]!);
    const discard = (key: AttemptSpec['key']) => Promise.allSettled(route.map((id) => client.discard(peers.addrs(id), key, { signal })));
    const actx = this.attemptContext();
    // every stage of the route has reported when this ends: none keeps the attempt's activations
    const out = await this.slots.during(route, signal, async () => {
      const out = await runAttempt(actx, a, signal);
      if (!out.ok) {
        await discard(a.key);
        const acc = out.accusation;
        if (acc === undefined) throw new RouteFailure(out.blame, out.cause);
        // a fresh attempt number: the referee's run never commits
        const r = spec(++this.attempts[mb]!);
        this.ctx.status.event('retry', `step ${this.step} micro-batch ${mb}: peer ${acc.accuser} reports a bad tensor from ${acc.accused} (${acc.message}); the coordinator checks it (attempt ${r.key.attempt})`);
        const v = await referee(actx, r, acc, signal);
        await discard(r.key);
        if (v.bad) throw new RouteFailure(acc.accused, new BadOutputError(v.message));
        if (v.failure !== undefined) throw new RouteFailure(v.failure.blame, v.failure.cause);
        throw new RouteFailure(acc.accuser, new FalseReportError(`it reported a bad tensor from ${acc.accused} (${acc.message}), which the coordinator found within every bound`));
      }
      return out;
    });
    const verifier = this.ctx.verifier;
    if (verifier !== undefined && verifier.selected(this.step, mb)) {
      // checked after the compute and before the commit; the selection is the coordinator's secret
      let v;
      try {
        v = await spotCheck({ ...actx, verifier, node: this.ctx.node }, a, out.responses, () => ++this.attempts[mb]!, signal);
      } catch (e) {
        if (signal.aborted || !(e instanceof RecallError)) throw e;
        await discard(a.key);
        throw new RouteFailure(e.peerId, e);
      }
      peers.applyVerdict({ kind: 'ban', bans: v.bans, strikes: v.strikes });
      if (!v.counts) {
        await discard(a.key);
        this.ctx.status.event('retry', v.detail);
        throw new RouteFailure(v.loser ?? route[0]!, new VerifyError(v.detail, v.loser));
      }
    }
    const lossSum = out.lossSum;
    this.commits.add((async (): Promise<{ mb: number; failure: RouteFailure } | null> => {
      const commits = await Promise.allSettled(route.map((id) => client.commit(peers.addrs(id), a.key, { signal })));
      const failed = commits.findIndex((c) => c.status === 'rejected');
      if (failed >= 0) {
        if (signal.aborted) throw signal.reason;
        await discard(a.key);
        return { mb, failure: new RouteFailure(route[failed]!, (commits[failed] as PromiseRejectedResult).reason as Error) };
      }
      this.lossSums[mb] = lossSum;
      this.committedRoute[mb] = route;
      this.committedAttempt[mb] = a.key.attempt;
      for (const id of route) { const p = peers.get(id); if (p !== undefined) p.microBatches++; }
      return null;
    })());
  }

  /** One reduce round, every stage and replica at once: each live replica of stage s sums the step
   *  gradients of the stage's live replicas in peer-id order (the order the coordinator summed them
   *  in before), pulling its partners' from them. Null when a replica or a partner failed (dropped, or
   *  banned for a bad gradient; its micro-batches run again). */
  private async reduceAll(): Promise<{ replicas: ReplicaGradient[][]; sumSq: number[] } | null> {
    const { peers, status, client } = this.ctx;
    const step = this.step, signal = this.signal;
    const rosters = this.ctx.stages.map((_, s) => peers.liveReplicas(s));
    const jobs = rosters.flatMap((ids, s) => ids.map((id) => ({ s, id })));
    // the first failure gives the round up: the other replicas' reduces (and the pulls they wait on) are cancelled
    const round = new AbortController();
    const roundSignal = AbortSignal.any([signal, round.signal]);
    const res = await Promise.allSettled(jobs.map(({ s, id }) =>
      client.reduce(peers.addrs(id), step, rosters[s]!.map((peerId) => ({ peerId, addrs: peers.addrs(peerId).map((x) => x.toString()) })), { signal: roundSignal })
        .then((v) => { if (v.failed !== undefined) round.abort(new SwarmError(`step ${step}: the reduce round is given up`)); return v; },
          (e: unknown) => { if (!round.signal.aborted) { round.abort(new SwarmError(`step ${step}: the reduce round is given up`)); throw e; } throw new CancelledReduce(e as Error); })));
    if (signal.aborted) throw signal.reason;
    let ok = true;
    for (let k = 0; k < jobs.length; k++) {
      const r = res[k]!, { s, id } = jobs[k]!;
      if (r.status === 'rejected' && r.reason instanceof CancelledReduce) {
        ok = false; // given up because another replica failed first: nothing is known about this one
      } else if (r.status === 'rejected') {
        const e = r.reason as Error;
        status.event('retry', `step ${step}: stage ${s}'s reduce at peer ${id} failed (${e.name}: ${e.message})`);
        await peers.dropAfterFailure(id, e, `it failed to reduce its step ${step} gradient`, signal);
        ok = false;
      } else if (r.value.failed !== undefined) {
        const f = r.value.failed;
        status.event('retry', `step ${step}: peer ${id} could not take stage ${s}'s step gradient from ${f.peerId} (${f.message})`);
        if (!peers.gone(f.peerId)) {
          await peers.dropAfterFailure(f.peerId, f.bad ? new BadOutputError(`its step ${step} gradient as peer ${id} received it: ${f.message}`) : new SwarmError(f.message),
            `it failed to send its step ${step} gradient to its partner ${id}`, signal);
        }
        ok = false;
      }
    }
    if (!ok) return null;
    const replicas: ReplicaGradient[][] = rosters.map(() => []);
    const sums: Array<Array<number | undefined>> = rosters.map(() => []);
    const values = (k: number) => (res[k] as PromiseFulfilledResult<ReducedGradient>).value;
    for (let k = 0; k < jobs.length; k++) {
      const { s, id } = jobs[k]!, v = values(k);
      const labelTokens = this.committedRoute.reduce((n, r, mb) => n + (r?.[s] === id ? labelTokensOf(this.plan.microBatches[mb]!) : 0), 0);
      // what the screen judges of replica j: the largest Σ g² of its gradient that any replica of the
      // stage summed (its own report, and what each partner received from it)
      const j = rosters[s]!.indexOf(id);
      const seen = jobs.flatMap((x, kk) => (x.s === s ? [kk === k ? v.ownSumSq : values(kk).partsSumSq[j] ?? Number.NaN] : []));
      const sumSq = seen.some((x) => !Number.isFinite(x)) ? Number.NaN : Math.max(...seen);
      replicas[s]!.push({ id, sumSq, microBatches: v.microBatches, labelTokens });
      sums[s]!.push(v.sumSq);
    }
    // the replicas of a stage hold the same reduced bits; one that reports another sum is caught by
    // the digests after its apply (docs/security.md)
    return { replicas, sumSq: sums.map((xs) => majorityOf(xs) ?? Number.NaN) };
  }

  /** Every replica that reduced applies its reduced gradient, clipped by the one coefficient, all
   *  stages in parallel (stage 0 first when the mid-apply crash point is armed); the replicas of a
   *  stage must agree on their digests (verdicts.ts). Then v_{t+1} comes from one replica per stage,
   *  and the optimizer state from one as the checkpoint policy asks. A stage left with no replica that
   *  applied (every one dropped or outvoted) fails the step: its reduced gradient lived only there. */
  private async apply(clip: { clip: boolean; clipScale: number }): Promise<{ plan: CheckpointPlan; bytes: Uint8Array[] | null }> {
    const { peers, client, adapter, states, config } = this.ctx;
    const step = this.step, next = step + 1, signal = this.signal;
    const plan = states.plan(step, this.ctx.stages);
    const applied = new Set<string>();
    const digests = new Map<string, AppliedDigests>();
    const applyStage = async (s: number): Promise<void> => {
      const ids = this.reducedBy[s]!.filter((id) => !peers.gone(id));
      const res = await Promise.allSettled(ids.map((id) => client.step(peers.addrs(id), step, clip, this.lr, { signal })));
      for (let i = 0; i < res.length; i++) {
        const r = res[i]!;
        if (r.status === 'fulfilled') { applied.add(ids[i]!); digests.set(ids[i]!, r.value); }
        else await peers.dropAfterFailure(ids[i]!, r.reason as Error, `it failed to apply the update of step ${next}`, signal);
      }
    };
    const crash = config.crash;
    const stages = this.ctx.stages.map((_, s) => s);
    if (crash !== null && crash.point === 'mid-apply' && crash.step === next) {
      await applyStage(0);
      crashPoint(crash, 'mid-apply', next);
      await Promise.all(stages.slice(1).map(applyStage));
    } else await Promise.all(stages.map(applyStage));
    const agreed: Array<{ adapterSha256: string; optimizerSha256: string } | null> = [];
    for (let s = 0; s < this.S; s++) {
      agreed[s] = await peers.settleDigests(s, next, peers.liveReplicas(s).filter((id) => applied.has(id)).map((id) => ({ peerId: id, ...digests.get(id) })), signal);
      if (!peers.liveReplicas(s).some((id) => applied.has(id))) {
        throw new SwarmError(`step ${step}: stage ${s} has no replica left that applied the update of step ${next} (its reduced gradient lived only on its replicas)`);
      }
    }
    // the adapter of step + 1 from one replica per stage, stages in parallel
    await Promise.all(stages.map(async (s) => {
      for (const id of peers.liveReplicas(s).filter((x) => applied.has(x))) {
        try { await adapter.upload(client, id, peers.addrs(id), s, { signal, digest: agreed[s]?.adapterSha256 }); return; } catch (e) {
          await peers.dropAfterFailure(id, e as Error, `it failed to upload its adapter of step ${next}`, signal);
        }
      }
      throw new SwarmError(`step ${step}: no replica of stage ${s} could upload its adapter of step ${next}`);
    }));
    return { plan, bytes: plan.fetch ? await states.fetch(next, this.S, applied, signal, agreed.map((a) => a?.optimizerSha256)) : null };
  }

  /** Durable before announced: the adapter of step + 1, the cursor (and at checkpoints every stage's
   *  optimizer state) land in one atomic batch; an every-step checkpoint replaces the previous one. */
  private async commit(norm: number, plan: CheckpointPlan, states: Uint8Array[] | null): Promise<StepRecord> {
    const { store, status, adapter, states: stageStates, config, data } = this.ctx;
    let lossSum = 0;
    for (const x of this.lossSums) lossSum += x;
    let seqTokens = 0;
    for (const mb of this.plan.microBatches) seqTokens += mb.batch * mb.seqLen;
    const seconds = (performance.now() - this.startedMs) / 1000;
    const rec: StepRecord = {
      step: this.step + 1, loss: stepLoss(this.plan, lossSum), lr: this.lr, gradNorm: norm, tokens: seqTokens, tokensPerSecond: seqTokens / seconds,
      timeMs: Date.now(), cursor: data.cursorAfter(this.step + 1),
    };
    crashPoint(config.crash, 'before-commit', rec.step);
    await store.commitStep(rec, adapter.bytes(), states, stageStates.replaced(states));
    crashPoint(config.crash, 'after-commit', rec.step);
    stageStates.committed(rec.step, states, plan);
    status.committed(rec, seqTokens);
    status.emit({ event: 'step', step: rec.step, loss: rec.loss, lr: rec.lr, grad_norm: rec.gradNorm, tokens_per_s: rec.tokensPerSecond, total_steps: data.totalSteps });
    return rec;
  }
}
