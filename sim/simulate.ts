// A run at scale in simulated time: simulated volunteers and links, the coordinator's real decisions.
// The planner (planStages), the routes, windows and quotas (routeFor, pipelineDepth, PeerSlots, routeQuotas), the
// late-joiner and lost-stage choices and the re-run rule (coordinator/decide.ts), the heartbeat verdict and
// the peer registry itself (PeerRegistry: replicas, liveness, routable peers) are the coordinator's own code;
// the step below follows OptimizerStep (coordinator/step.ts) call for call, with each request replaced by
// its simulated time and bytes (sim/cost.ts).
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { coordinatorConfig } from '../coordinator/config.ts';
import type { CoordinatorConfig } from '../coordinator/config.ts';
import { CHECKPOINT_EVERY_STEP_MAX_BYTES } from '../coordinator/constants.ts';
import { planStages, type StageMemoryFn, type StageRange } from '../coordinator/planner.ts';
import { wiring } from './wiring.ts';
import { BehindWindow, pipelineDepth, preferDirectHops, routeFor, routeQuotas, routeRate, type Route } from '../coordinator/routes.ts';
import { brokenMicroBatches, donorForEmptyStage, heartbeatVerdict, stageForLateJoiner, stageThroughput } from '../coordinator/decide.ts';
import { PeerRegistry } from '../coordinator/peers.ts';
import type { PeerState } from '../coordinator/peers.ts';
import { RunStatus } from '../coordinator/status.ts';
import { stageMemoryFn } from '../coordinator/spec.ts';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { RunStore } from '../coordinator/store.ts';
import { SimClock } from './clock.ts';
import { drawPeer, hopBytes, layerTrainFlopsPerToken, headTrainFlopsPerToken, rng, stageCosts } from './cost.ts';
import type { StageCosts } from './cost.ts';
import { allreduceMs, pullReduceMs } from './tail-cost.ts';
import { PeerGoneError, SimPeer } from './peer.ts';
import { SimLinks, heartbeatTiming } from './links.ts';
import type { HeartbeatTiming } from './links.ts';
import { avg, q, r3, type SimResult } from './result.ts';
export type { SimResult } from './result.ts';
import type { Scenario } from './scenario.ts';

/** The scenario's max_hours passed (a run that cannot go on: joins backed up behind blocking loads). */
class TimeCapError extends Error { override name = 'TimeCapError'; }

export class Simulation {
  private readonly sc: Scenario;
  private readonly clock = new SimClock();
  private readonly net: SimLinks;
  private readonly config: CoordinatorConfig = coordinatorConfig({});
  private readonly status: RunStatus;
  private readonly peers: PeerRegistry;
  private readonly sim = new Map<string, SimPeer>();
  private readonly rand: () => number;
  private nextPeer = 0; private stages: StageRange[] = [];
  private costs: StageCosts[] = []; private need: number[] = []; private memory: StageMemoryFn = () => 0;
  private readonly hop: number;
  private readonly waitingJoins: SimPeer[] = []; private readonly loadedJoins: SimPeer[] = [];
  private readonly joinDelays: number[] = [];
  /** background joins: arrival to loaded (the shard at the joiner's link) */
  private readonly joinLoads: number[] = [];
  private retries = 0; private joins = 0; private leaves = 0; private rejected = 0;
  private readonly commits = new Map<number, number>();
  private lostSteps = 0; private plannerMs = 0;
  private stageBusyMs: number[] = [];
  private readonly stepTimes: number[] = [];
  private readonly computePhaseMs: number[] = []; private readonly tailMs: number[] = [];
  private done = false; private capped = false;
  /** between a step's start and its tail: a 'mid-step' joiner that loaded enters the routes now */
  private inComputePhase = false;
  private onEntered: ((id: string, s: number) => void) | null = null;

  constructor(sc: Scenario) {
    this.sc = sc;
    this.rand = rng(sc.seed);
    this.hop = hopBytes(sc);
    this.net = new SimLinks({
      clock: this.clock, sc,
      onComputed: (p, stage, ms, backward) => {
        this.stageBusyMs[stage]! += ms;
        // the volunteer's tokens/s, as its heartbeat reports it (node/stage-host.ts)
        if (backward) this.state(p.id).tokensPerSecond = p.computeTokens / (p.computeMs / 1000);
      },
      onHop: (a, b, path) => {
        // the sender reports the path in its next heartbeat (node/: hopPaths); routes use it from then on
        const st = this.peers.get(a.id);
        if (st !== undefined && st.hopPaths?.some((h) => h.peerId === b.id) !== true) {
          (st.hopPaths ??= []).push({ peerId: b.id, path: path === 'punched' ? 'hole-punched' : path });
          this.hopReports++;
        }
      },
    });
    const silent = () => {};
    this.status = new RunStatus({ runId: 'sim', modelName: sc.modelName, totalSteps: sc.steps, minPeers: sc.peers.count, step: 0, eventHistory: 1, emit: silent, log: silent });
    // the registry's own requests (heartbeat rounds, probes, ban notices) are not used: the simulation
    // times them itself; a ban's store write goes nowhere
    const store = { putBans: async () => {} } as unknown as RunStore;
    // reachability as the relay knows it (a NATed peer holds a reservation): routes pair replicas with
    // preferDirectHops over PeerRegistry.hopCost, from it and the hop paths peers report (transfer below)
    this.peers = new PeerRegistry({ runId: 'sim', client: {} as StagePeerClient, config: this.config, status: this.status, store, signal: new AbortController().signal,
      reachability: (id) => (this.sim.get(id)?.spec.nat === 'public' ? 'public' : 'relay') });
  }

  private get now(): number { return this.clock.now; }
  private pastCap(): boolean { return this.now > this.sc.maxHours * 3_600_000; }
  // ---- peers

  private addPeer(late: boolean): SimPeer {
    const spec = drawPeer(this.sc, this.rand, this.nextPeer++);
    const p = new SimPeer(spec, this.now, late);
    this.sim.set(p.id, p);
    this.peers.join(p.id, {
      backend: spec.cls.name.startsWith('cpu') ? 'cpu' : 'cuda', deviceName: spec.cls.name, memoryBytes: spec.memoryBytes,
      memoryTotalBytes: spec.memoryBytes, memoryFreeBytes: spec.memoryBytes, hostMemoryBytes: spec.memoryBytes, cores: 8,
      gemmGflops: spec.flops / 1e9, computeCapability: null, memoryBandwidthGBs: null,
    } as never, [], undefined, this.stages.length > 0);
    this.joins++;
    if (this.sc.churn !== null && this.sc.churn.leavePerHour > 0) {
      const afterMs = -Math.log(1 - this.rand()) / (this.sc.churn.leavePerHour / 3_600_000);
      this.clock.at(afterMs, () => this.leave(p));
    }
    return p;
  }

  private state(id: string): PeerState { return this.peers.get(id)!; }
  private startServing(p: SimPeer): void { if (p.servingSinceMs === null) p.servingSinceMs = this.now; }
  private stopServing(p: SimPeer): void {
    if (p.servingSinceMs !== null) { p.servingMs += this.now - p.servingSinceMs; p.servingSinceMs = null; }
  }

  /** A volunteer leaves (Ctrl-C, a crash, a preemption): requests in flight to it fail one round trip
   *  later; when it was idle, the heartbeat timeout finds it. */
  private leave(p: SimPeer): void {
    if (p.left || this.done) return;
    p.left = true;
    this.leaves++;
    const st = this.peers.get(p.id);
    const wasServing = st !== undefined && st.stageIndex !== null && !this.peers.gone(p.id);
    this.stopServing(p);
    for (const fail of p.waiting) this.clock.at(p.spec.rttMs, () => fail(new PeerGoneError(p.id)));
    p.waiting.clear();
    const wi = this.waitingJoins.indexOf(p);
    if (wi >= 0) this.waitingJoins.splice(wi, 1);
    const li = this.loadedJoins.indexOf(p);
    if (li >= 0) this.loadedJoins.splice(li, 1);
    if (wasServing) {
      // its beats come once a period (at its own phase); once the silence since its last answered beat
      // passes the limit, the next failed beat drops it (unless a failed request found it first)
      const { periodMs, silenceMs, extraMs } = this.heartbeatTiming();
      const sinceLastBeat = periodMs * p.phase;
      const k = Math.floor(silenceMs / periodMs) + 1;
      const delay = k * periodMs - sinceLastBeat + p.spec.rttMs + extraMs;
      this.detectIdleMs.push(delay);
      const lastSeen = this.now - sinceLastBeat;
      this.clock.at(delay, () => {
        const s = this.peers.get(p.id);
        if (s !== undefined && !this.peers.gone(p.id) && heartbeatVerdict(this.now - lastSeen, silenceMs) === 'dead') this.peers.markDead(s, 'no heartbeat');
      });
    }
  }

  private readonly detectIdleMs: number[] = [];
  /** serving replicas now (the peers heartbeats go to) */
  private serving(): number { return this.stages.reduce((a, _, s) => a + this.peers.liveReplicas(s).length, 0); }
  private heartbeatTiming(n = this.serving()): HeartbeatTiming { return heartbeatTiming(this.sc, this.config, n); }

  // ---- placement (coordinator/placement.ts)

  /** tokens/s of a peer at stage s counting its link: compute and its hops' transfer one after the other */
  private effectiveRate(id: string, s: number): number {
    const p = this.sim.get(id)!;
    const T = this.sc.microBatch * this.sc.seqLen;
    const c = this.costs[s]!;
    const computeS = (c.forwardFlops + c.backwardFlops) / p.spec.flops;
    const hops = (s > 0 ? 2 : 0) + (s < this.stages.length - 1 ? 2 : 0);
    const linkS = hops * this.hop / 2 / p.spec.bytesPerSecond; // sent and received at once (full duplex)
    return T / (computeS + linkS);
  }

  /** each stage's routable replicas (PeerRegistry.routable); under the 'speed-matched' design the
   *  fastest first, so route k pairs the k-th fastest replica of every stage */
  private routable(): string[][] {
    const r = this.stages.map((_, s) => this.peers.routable(s));
    if (this.sc.routes === 'speed-matched') {
      r.forEach((ids, s) => ids.sort((a, b) => this.effectiveRate(b, s) - this.effectiveRate(a, s) || (a < b ? -1 : 1)));
      return r;
    }
    // as the real coordinator (step.ts routeFor): replicas paired over the cheapest expected hops; the
    // same registry state gives the same pairing, so it is kept until a replica or a hop report changes
    const key = `${this.hopReports}|${r.map((ids) => ids.join(',')).join(';')}`;
    if (key !== this.routableKey) { this.routableKey = key; this.routableCache = preferDirectHops(r, (a, b) => this.peers.hopCost(a, b)); }
    return this.routableCache;
  }
  private hopReports = 0; private routableKey = ''; private routableCache: string[][] = [];

  private async plan(): Promise<void> {
    const { sc } = this;
    const train = resolveTrainConfig({ flags: { per_device_train_batch_size: sc.microBatch, gradient_accumulation_steps: sc.accumulation, max_seq_length: sc.seqLen, lora_r: sc.loraR, target_modules: 'all-linear', max_steps: sc.steps } });
    const memory = this.memory = stageMemoryFn(sc.model, train, loraConfigOf(train));
    const joined = [...this.sim.values()];
    const t0 = performance.now();
    const plan = planStages(sc.model.numHiddenLayers, joined.map((p) => ({ peerId: p.id, memoryBytes: p.spec.memoryBytes, gemmGflops: p.spec.flops / 1e9 })), memory, sc.pipelineStages);
    this.plannerMs = performance.now() - t0;
    this.stages = plan.stages;
    this.need = plan.stages.map((s) => memory(s.layerStart, s.layerEnd));
    this.costs = plan.stages.map((s) => stageCosts(sc, s.layerStart, s.layerEnd));
    this.stageBusyMs = plan.stages.map(() => 0);
    this.rejected += plan.rejected.size;
    for (const id of plan.rejected.keys()) this.peers.forget(id);
    this.peers.setReplicas(plan.replicas);
    // every planned peer downloads its shard from the other peers at its own link speed; the run starts
    // when all have loaded (placement.waitReady)
    await Promise.all(plan.replicas.flatMap((ids, s) => ids.map(async (id) => {
      const p = this.sim.get(id)!;
      const st = this.state(id);
      st.stageIndex = s; st.health = 'ok';
      try { await this.download(p, s); st.ready = true; } catch { this.peers.markDead(st, 'left while loading'); }
    })));
    for (const ids of plan.replicas) for (const id of ids) if (!this.peers.gone(id)) this.startServing(this.sim.get(id)!);
  }

  /** The stage's shard from peers (at the joiner's link speed) and its adapter + optimizer state. */
  private download(p: SimPeer, s: number): Promise<void> {
    const c = this.costs[s]!;
    return this.net.guard<void>(p, (ok) => this.clock.at(2 * p.spec.rttMs + 1000 * c.shardBytes / p.spec.bytesPerSecond, () => ok(undefined)));
  }

  /** optimizer state and adapter for a new replica, through the coordinator (stage-states.forNewReplica) */
  private async stageState(p: SimPeer, s: number): Promise<void> {
    const c = this.costs[s]!;
    const donor = this.peers.liveReplicas(s)[0];
    if (donor !== undefined) await this.net.request(this.sim.get(donor)!, 200, c.optimizerBytes).catch(() => {});
    await this.net.request(p, c.optimizerBytes + 4 * c.loraParams, 200);
  }

  private async placeOn(p: SimPeer, s: number): Promise<boolean> {
    const st = this.state(p.id);
    st.stageIndex = s; st.health = 'ok'; st.ready = false;
    try {
      await this.stageState(p, s);
      if (this.sc.lateJoin === 'as-built' || !p['loadedStage' as never]) {
        // the step loop waits here until the joiner has loaded (placement.placeOn), at most loadDeadlineMs
        const loaded = this.download(p, s).then(() => true, () => false);
        const timeout = this.clock.sleep(this.config.loadDeadlineMs).then(() => false);
        if (!(await Promise.race([loaded, timeout]))) { this.peers.markDead(st, 'did not load its stage in time'); return false; }
      }
    } catch { this.peers.markDead(st, 'left while loading'); return false; }
    st.ready = true;
    this.peers.addReplica(s, p.id); this.startServing(p);
    return true;
  }

  /** admitLateJoiners: each waiting joiner takes stageForLateJoiner's stage */
  private async admitLateJoiners(): Promise<void> {
    const list = this.sc.lateJoin === 'as-built' ? this.waitingJoins.splice(0) : this.loadedJoins.splice(0);
    for (const p of list) {
      if (p.left) continue;
      if (this.pastCap()) throw new TimeCapError();
      const speed = (s: number) => stageThroughput(this.peers.liveReplicas(s).map((id) => this.state(id).tokensPerSecond));
      const s = this.sc.lateJoin === 'as-built'
        ? stageForLateJoiner(p.spec.memoryBytes, this.need, (x) => this.peers.liveReplicas(x).length, speed)
        : (p as unknown as { stageChosen: number }).stageChosen;
      if (s === null) { this.rejected++; this.peers.forget(p.id); } else await this.placeOn(p, s);
    }
  }

  /** 'background' late joins: the stage is chosen at arrival, the shard loads while steps go on */
  private arriveInBackground(p: SimPeer): void {
    const speed = (s: number) => stageThroughput(this.peers.liveReplicas(s).map((id) => this.state(id).tokensPerSecond));
    const s = stageForLateJoiner(p.spec.memoryBytes, this.need, (x) => this.peers.liveReplicas(x).length, speed);
    if (s === null) { this.rejected++; this.peers.forget(p.id); return; }
    (p as unknown as { stageChosen: number }).stageChosen = s;
    this.download(p, s).then(() => {
      (p as unknown as Record<string, boolean>).loadedStage = true;
      this.joinLoads.push((this.now - p.joinedAtMs) / 1000);
      if (this.sc.lateJoin === 'mid-step' && this.inComputePhase && !this.done) void this.placeOn(p, s).then((ok) => { if (ok) this.onEntered?.(p.id, s); });
      else this.loadedJoins.push(p);
    }, () => {});
  }

  /** coverLostStages: a waiting joiner, else a donor replica, else wait for a volunteer */
  private async cover(): Promise<void> {
    for (;;) {
      const empty = this.stages.map((_, s) => s).filter((s) => this.peers.liveReplicas(s).length === 0);
      if (empty.length === 0) return;
      const s = empty[0]!;
      const pool = this.sc.lateJoin === 'as-built' ? this.waitingJoins : this.loadedJoins;
      const ji = pool.findIndex((p) => !p.left && p.spec.memoryBytes >= this.need[s]!);
      if (ji >= 0) { const p = pool.splice(ji, 1)[0]!; (p as unknown as Record<string, boolean>).loadedStage = false; await this.placeOn(p, s); continue; }
      const donor = donorForEmptyStage(this.stages.map((_, t) => this.peers.liveReplicas(t)), this.need[s]!,
        (id) => this.state(id).caps.memoryBytes, (id) => this.state(id).tokensPerSecond);
      if (donor !== null) {
        const p = this.sim.get(donor.id)!;
        this.peers.removeFromStages(donor.id);
        this.stopServing(p);
        (p as unknown as Record<string, boolean>).loadedStage = false;
        await this.net.request(p, 500, 100).catch(() => {});
        await this.placeOn(p, s);
        continue;
      }
      if (this.pastCap()) throw new TimeCapError();
      await this.clock.sleep(this.config.coverPollMs);
    }
  }

  // ---- the step (coordinator/step.ts)

  private async step(step: number): Promise<void> {
    const { sc } = this, M = sc.accumulation;
    const S = this.stages.length;
    const attempts = new Int32Array(M), strikes = new Int32Array(M);
    const committedRoute: Array<Route | null> = Array.from({ length: M }, () => null);
    const todo = Array.from({ length: M }, (_, i) => i);
    // per micro-batch: gradients of it that count (committed, not taken back); 1 each at the commit
    const counted = new Int32Array(M);
    const isLive = (s: number, id: string) => this.peers.liveReplicas(s).includes(id);
    const broken = (r: Route) => r.some((id, s) => !isLive(s, id));
    let quota: number[] = [], taken: number[] = [];
    const rounds = new BehindWindow<{ mb: number }>(), bps = (id: string) => this.sim.get(id)!.spec.bytesPerSecond; // as OptimizerStep: commits behind the window
    const { slots, balancer, workers } = wiring(sc, this.stages, this.memory, { memoryOf: (id) => this.sim.get(id)!.spec.memoryBytes, stageOf: (id) => this.state(id).stageIndex,
      measuredMs: (id, s) => this.state(id).tokensPerSecond > 0 ? 1000 * sc.microBatch * sc.seqLen / this.effectiveRate(id, s) : NaN, estimatedMs: (id, s) => 1000 * (this.costs[s]!.forwardFlops + this.costs[s]!.backwardFlops) / (this.state(id).caps.gemmGflops * 1e9),
      pairMs: (a, b) => (1 + Math.min(1, this.peers.hopCost(a, b))) * 2000 * this.hop / Math.min(bps(a), bps(b)) });

    const runMicroBatch = async (mb: number, route: Route): Promise<void> => {
      const ps = route.map((id) => this.sim.get(id)!);
      const T = sc.microBatch * sc.seqLen;
      // one control message per stage (ids to stage 0, labels to the last), answered by its report
      for (let s = 0; s < S; s++) this.net.coordCpu(2, sc.coordinator.controlBytesPerStage / 2 + (s === 0 ? 4 * T : 0) + (s === S - 1 ? 4 * T : 0));
      this.net.coordBytes += S * sc.coordinator.controlBytesPerStage * 2 / 3 + 8 * T;
      const at = async (s: number, f: () => Promise<void>) => { try { await f(); } catch (e) { throw Object.assign(new Error('route failure'), { peerId: (e as PeerGoneError).peerId ?? route[s] }); } };
      await at(0, () => this.net.guard<void>(ps[0]!, (ok) => this.clock.at(ps[0]!.spec.rttMs / 2, () => ok(undefined))));
      for (let s = 0; s < S; s++) {
        await at(s, () => this.net.job(ps[s]!, false, this.costs[s]!.forwardFlops, s));
        if (s < S - 1) await at(s, () => this.net.transfer(ps[s]!, ps[s + 1]!, this.hop));
      }
      for (let s = S - 1; s >= 0; s--) {
        await at(s, () => this.net.job(ps[s]!, true, this.costs[s]!.backwardFlops, s));
        if (s > 0) await at(s, () => this.net.transfer(ps[s]!, ps[s - 1]!, this.hop));
      }
      await at(0, () => this.net.guard<void>(ps[0]!, (ok) => this.clock.at(ps[0]!.spec.rttMs / 2, () => ok(undefined))));
      this.net.coordBytes += S * sc.coordinator.controlBytesPerStage / 3;
      const done = () => {
        committedRoute[mb] = route; counted[mb]! += 1;
        for (const p of ps) { if (p.firstMicroBatchMs === null) { p.firstMicroBatchMs = this.now; if (p.late) this.joinDelays.push((this.now - p.joinedAtMs) / 1000); } }
      };
      // as built: one commit round to every peer of the route in parallel, behind the route's window;
      // '1f1b': the commit rides the route's next control message (no round of its own); a peer that
      // left before it holds a gradient that brokenMicroBatches finds at the step's end
      if (sc.schedule === '1f1b') done();
      else rounds.add((async () => {
        const commits = await Promise.allSettled(ps.map((p) => this.net.request(p, 0, 0)));
        if (commits.some((c) => c.status === 'rejected')) return { mb };
        done();
        return null;
      })());
    };

    const worker = async (k: number, R: number): Promise<void> => {
      const home = k % R;
      for (;;) {
        if (taken[home]! >= quota[home]!) return;
        const mb = todo.shift();
        if (mb === undefined) return;
        taken[home]! += 1;
        for (;;) {
          if (this.pastCap()) throw new TimeCapError();
          const route = balancer !== null ? balancer.pick(this.routable()) : routeFor(k + attempts[mb]!, this.routable());
          if (route === null) { todo.unshift(mb); taken[home]! -= 1; return; }
          try { await slots.during(route, new AbortController().signal, () => runMicroBatch(mb, route)); balancer?.release(route); break; } catch (e) {
            balancer?.release(route);
            const id = (e as { peerId?: string }).peerId;
            if (id === undefined) throw e;
            attempts[mb]! += 1;
            this.retries++;
            this.net.coordCpu(S, 0); // discards
            // afterFailure → probe: a peer that left fails the short heartbeat and is dropped
            const p = this.sim.get(id)!;
            if (p.left) { await this.clock.sleep(Math.min(this.config.probeTimeoutMs, p.spec.rttMs)); if (!this.peers.gone(id)) this.peers.markDead(this.state(id), 'failed a request and then a heartbeat'); }
            if (!this.peers.gone(id)) strikes[mb]! += 1;
            if (strikes[mb]! >= this.config.maxAttempts) throw new Error(`step ${step} micro-batch ${mb} failed ${this.config.maxAttempts} times at peers that stayed up`);
            await this.clock.sleep(this.config.retryBackoffMs * Math.min(attempts[mb]!, 5));
          }
        }
      }
    };

    const computeAll = async (): Promise<void> => {
      for (;;) {
        if (this.pastCap()) throw new TimeCapError();
        await this.cover();
        const routable = this.routable();
        const R = Math.max(...routable.map((r) => r.length));
        const depth = sc.schedule === '1f1b' ? S : pipelineDepth(S);
        const routes = Array.from({ length: R }, (_, r) => routeFor(r, routable));
        const rate = this.sc.routes === 'speed-matched'
          ? (id: string) => (this.state(id).tokensPerSecond > 0 ? this.effectiveRate(id, this.state(id).stageIndex ?? 0) : 0)
          : (id: string) => this.peers.get(id)?.tokensPerSecond ?? 0;
        quota = balancer !== null ? routes.map(() => todo.length) : routeQuotas(todo.length, routes.map((_, r) => routeRate(routes, r, rate)));
        taken = quota.map(() => 0);
        // 'mid-step': a replica that entered now gets work at once, its own route (it and replica k of the
        // other stages, k its position), depth micro-batches in flight, from what is left of this step
        const extras: Array<Promise<void>> = [];
        this.onEntered = (id, s) => {
          const k = this.routable()[s]!.indexOf(id);
          if (k < 0) return;
          for (let d = 0; d < depth; d++) extras.push((async () => {
            for (;;) {
              const mb = todo.shift();
              if (mb === undefined) return;
              const route = routeFor(k, this.routable());
              if (route === null || route[s] !== id) { todo.unshift(mb); return; }
              try { await slots.during(route, new AbortController().signal, () => runMicroBatch(mb, route)); } catch { attempts[mb]! += 1; this.retries++; todo.push(mb); return; }
            }
          })());
        };
        try { await Promise.all(Array.from({ length: workers(routable, R, depth) }, (_, k) => worker(k, R))); } catch (e) { this.onEntered = null; await rounds.drain(); throw e; }
        this.onEntered = null;
        await Promise.all(extras);
        await rounds.settle((r) => { attempts[r.mb]! += 1; this.retries++; todo.push(r.mb); }); // a failed commit round: run it again
        if (todo.length > 0) continue;
        const lost = brokenMicroBatches(committedRoute, isLive);
        if (lost.length === 0) return;
        for (const mb of lost) { committedRoute[mb] = null; counted[mb]! -= 1; attempts[mb]! += 1; this.retries++; todo.push(mb); }
      }
    };

    const t0 = this.now;
    let tailStart = t0;
    for (;;) {
      this.inComputePhase = true;
      await computeAll();
      this.inComputePhase = false;
      tailStart = this.now;
      if (!(await this.tail())) continue;
      if (committedRoute.some((r) => r === null || broken(r))) continue;
      break;
    }
    // the gradients are collected: a sum that misses a micro-batch, counts one twice or holds one from a dropped peer is a lost step
    if (counted.some((n) => n !== 1) || committedRoute.some((r) => r === null || broken(r))) this.lostSteps++;
    await this.applyAndCommit();
    this.computePhaseMs.push(tailStart - t0);
    this.tailMs.push(this.now - tailStart);
    this.commits.set(step, (this.commits.get(step) ?? 0) + 1);
  }

  /** the light tail (coordinator/step.ts reduceAll: all stages at once, each replica pulls its partners'
   *  gradients in turn, sim/tail-cost.ts), collect (every replica's gradient, stage by stage) or
   *  stage-allreduce and one upload; false when one failed (dropped; broken micro-batches run again) */
  private async tail(): Promise<boolean> {
    const waitOn = (ps: SimPeer[], ms: number) => Promise.all(ps.map((p) => this.net.guard<void>(p, (ok) => this.clock.at(ms, () => ok(undefined)))));
    try {
      if (this.sc.tail === 'light') {
        const jobs = this.stages.flatMap((_, s) => this.peers.liveReplicas(s).map((id, _i, ids) => {
          const p = this.sim.get(id)!, qs = ids.filter((x) => x !== id).map((x) => this.sim.get(x)!);
          return waitOn(qs, pullReduceMs(p.spec, qs.map((q) => q.spec), 4 * this.costs[s]!.loraParams)).then(() => this.net.request(p, 100, 100));
        }));
        for (const r of await Promise.allSettled(jobs)) if (r.status === 'rejected') throw r.reason;
        return true;
      }
      for (let s = 0; s < this.stages.length; s++) {
        const bytes = 4 * this.costs[s]!.loraParams, live = this.peers.liveReplicas(s).map((id) => this.sim.get(id)!);
        if (this.sc.tail !== 'stage-allreduce') { for (const p of live) await this.net.request(p, 100, bytes); continue; }
        if (live.length > 1) await waitOn(live, allreduceMs(live.map((p) => p.spec), bytes));
        await this.net.request(live[0]!, 100, bytes);
      }
      return true;
    } catch (e) { return this.dropped(e); }
  }

  private async dropped(e: unknown): Promise<boolean> {
    const id = (e as PeerGoneError).peerId;
    if (id === undefined) throw e;
    await this.clock.sleep(Math.min(this.config.probeTimeoutMs, this.sim.get(id)!.spec.rttMs));
    if (!this.peers.gone(id)) this.peers.markDead(this.state(id), 'failed to send its step gradient');
    return false;
  }

  private async applyAndCommit(): Promise<void> {
    const S = this.stages.length, light = this.sc.tail === 'light';
    const one = async (s: number, bytes: number) => {
      for (const id of this.peers.liveReplicas(s)) try { await this.net.request(this.sim.get(id)!, 100, bytes); return; } catch { /* next replica */ }
    };
    if (light) {
      // all stages apply at once; then one adapter upload per stage (in parallel), the small states one by one
      await Promise.allSettled(this.stages.flatMap((_, s) => this.peers.liveReplicas(s)).map((id) => this.net.request(this.sim.get(id)!, 100, 100)));
      await Promise.all(this.stages.map((_, s) => one(s, 4 * this.costs[s]!.loraParams)));
    }
    for (let s = 0; s < S && !light; s++) {
      const bytes = 4 * this.costs[s]!.loraParams, live = this.peers.liveReplicas(s);
      if (this.sc.tail === 'stage-allreduce') {
        // the replicas already hold the sum: the coordinator sends the clip factor and the step's lr
        await Promise.allSettled(live.map((id) => this.net.request(this.sim.get(id)!, 100, 100)));
      } else {
        const res = await Promise.allSettled(live.map((id) => this.net.request(this.sim.get(id)!, bytes, 100)));
        res.forEach((r, i) => { if (r.status === 'rejected' && !this.peers.gone(live[i]!)) this.peers.markDead(this.state(live[i]!), 'failed to apply'); });
      }
    }
    for (let s = 0; s < S; s++) {
      const c = this.costs[s]!, small = c.optimizerBytes <= CHECKPOINT_EVERY_STEP_MAX_BYTES;
      if (!light) await one(s, 4 * c.loraParams + (small ? c.optimizerBytes : 0));
      else if (small) await one(s, c.optimizerBytes);
    }
    await this.clock.sleep(this.sc.coordinator.storeCommitMs);
  }

  // ---- the run

  private async train(): Promise<number> {
    const { sc } = this;
    for (let i = 0; i < sc.peers.count; i++) this.addPeer(false);
    await this.plan();
    const startup = this.now;
    if (sc.churn !== null && sc.churn.arrivePerHour > 0) {
      const rate = sc.churn.arrivePerHour * sc.peers.count / 3_600_000;
      const next = () => this.clock.at(-Math.log(1 - this.rand()) / rate, () => {
        if (this.done) return;
        const p = this.addPeer(true);
        if (sc.lateJoin === 'as-built') this.waitingJoins.push(p); else this.arriveInBackground(p);
        next();
      });
      next();
    }
    for (let step = 0; step < sc.steps; step++) {
      // a scenario that cannot finish (joins backed up behind blocking loads, a stage nobody can hold) stops at its time cap
      try {
        if (this.pastCap()) throw new TimeCapError();
        await this.cover();
        await this.admitLateJoiners();
      } catch (e) { if (!(e instanceof TimeCapError)) throw e; this.capped = true; break; }
      const t0 = this.now;
      try { await this.step(step); } catch (e) { if (!(e instanceof TimeCapError)) throw e; this.capped = true; break; }
      this.stepTimes.push((this.now - t0) / 1000);
      this.status.step = step + 1;
    }
    this.done = true;
    return startup;
  }

  async run(): Promise<SimResult> {
    const wall0 = performance.now();
    const startupMs = await this.clock.drive(this.train());
    for (const p of this.sim.values()) this.stopServing(p);
    const { sc } = this;
    const S0 = this.stages.length;
    const tokensPerStep = sc.microBatch * sc.seqLen * sc.accumulation;
    const trainS = (this.now - startupMs) / 1000;
    // the ideal: every serving peer's achieved FLOP/s for the time it served, spent on the model's
    // training FLOPs alone (no bubble, no transfer, no tail, perfect balance across stages)
    const flopsPerToken = sc.model.numHiddenLayers * layerTrainFlopsPerToken(sc.model, sc.seqLen) + headTrainFlopsPerToken(sc.model);
    let peerFlopMs = 0, allFlops = 0;
    for (const p of this.sim.values()) { peerFlopMs += p.spec.flops * p.servingMs; if (!p.late) allFlops += p.spec.flops; }
    const ideal = peerFlopMs / 1000 / flopsPerToken / (this.now / 1000);
    const servingByStage = this.stages.map(() => 0);
    for (const p of this.sim.values()) {
      const st = this.peers.get(p.id);
      if (st?.stageIndex !== null && st?.stageIndex !== undefined) servingByStage[st.stageIndex]! += p.servingMs;
    }
    const steps = this.stepTimes.length;
    // heartbeats over the run, at the mean serving peer count
    const servingMsAll = [...this.sim.values()].reduce((a, p) => a + p.servingMs, 0);
    const meanServing = servingMsAll / Math.max(1, this.now);
    const hb = this.heartbeatTiming(Math.round(meanServing));
    const hbRequests = sc.heartbeats === 'hierarchical' ? S0 * this.now / this.config.heartbeatIntervalMs : servingMsAll / hb.periodMs;
    // hierarchical: a leader's answer carries its stage's members (id, health, tokens/s: ~64 B each)
    const hbBytes = hbRequests * (sc.coordinator.heartbeatBytes + (sc.heartbeats === 'hierarchical' ? 64 * meanServing / Math.max(1, S0) : 0));
    const cpuBefore = this.net.coordCpuMs;
    this.net.coordRequests += hbRequests;
    this.net.coordCpuMs += hbRequests * sc.coordinator.heartbeatCpuMs + hbBytes * sc.coordinator.cpuNsPerByte / 1e6;
    const hbCpu = this.net.coordCpuMs - cpuBefore;
    this.net.coordBytes += hbBytes;
    const wallS = this.now / 1000, mean = this.stepTimes.reduce((a, b) => a + b, 0) / Math.max(1, steps);
    const tokensPerS = steps * tokensPerStep / wallS;
    return {
      scenario: sc.name, peers: sc.peers.count, peers_used: this.stages.reduce((a, _, s) => a + this.peers.replicasOf(s).length, 0),
      peers_rejected: this.rejected,
      stages: this.stages.map((st, s) => {
        const u = servingByStage[s]! > 0 ? Math.min(1, this.stageBusyMs[s]! / servingByStage[s]!) : 0;
        return { layers: [st.layerStart, st.layerEnd], replicas_at_start: this.peers.replicasOf(s).length, utilization: r3(u), bubble: r3(1 - u) };
      }),
      steps, micro_batches_per_step: sc.accumulation, tokens_per_step: tokensPerStep,
      simulated_s: r3(wallS), startup_s: r3(startupMs / 1000),
      tokens_per_s: r3(tokensPerS), ideal_tokens_per_s: r3(ideal), ideal_fraction: r3(tokensPerS / ideal),
      ideal_all_peers_tokens_per_s: r3(allFlops / flopsPerToken),
      step_s: { mean: r3(mean), p50: r3(q(this.stepTimes, 0.5) ?? 0), p95: r3(q(this.stepTimes, 0.95) ?? 0) },
      micro_batch_phase_s: r3(avg(this.computePhaseMs) / 1000), tail_s: r3(avg(this.tailMs) / 1000),
      steps_per_hour: r3(steps / (trainS / 3600)),
      steps_target: sc.steps, stopped_at_time_cap: this.capped,
      lost_steps: this.lostSteps, repeated_steps: [...this.commits.values()].filter((n) => n > 1).length,
      micro_batch_retries: this.retries, joins: this.joins - sc.peers.count, leaves: this.leaves,
      join_to_first_microbatch_s: { p50: q(this.joinDelays, 0.5), p95: q(this.joinDelays, 0.95), n: this.joinDelays.length },
      join_to_loaded_s: { p50: q(this.joinLoads, 0.5), p95: q(this.joinLoads, 0.95), n: this.joinLoads.length },
      coordinator: {
        cpu_fraction: r3(this.net.coordCpuMs / this.now), bytes_per_step: Math.round(this.net.coordBytes / Math.max(1, steps)),
        link_fraction: r3(this.net.coordBytes / wallS / this.net.coordBps), relayed_bytes_per_step: Math.round(this.net.relayedBytes / Math.max(1, steps)),
        requests_per_s: r3(this.net.coordRequests / wallS),
      },
      hops: { ...this.net.hopPaths }, planner_ms: r3(this.plannerMs), sim_wall_s: r3((performance.now() - wall0) / 1000), events: this.clock.events,
      tail: sc.tail, routes: sc.routes, late_join: sc.lateJoin, heartbeats: sc.heartbeats, schedule: sc.schedule,
      heartbeat: {
        period_s: r3(hb.periodMs / 1000), silence_s: r3(hb.silenceMs / 1000),
        detect_idle_leave_s: this.detectIdleMs.length > 0 ? r3(avg(this.detectIdleMs) / 1000) : null,
        cpu_fraction: r3(hbCpu / this.now), requests_per_s: r3(hbRequests / (this.now / 1000)),
      },
    };
  }
}

export function simulate(sc: Scenario): Promise<SimResult> {
  return new Simulation(sc).run();
}
