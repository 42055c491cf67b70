// The volunteer's session with its coordinator, as a state machine: starting → joining → loading
// (fetching the shard's weights) → serving → lost (rejoin, keeping the stage) | released (rejoin
// later) → joining …, or left. Leaving is an abort of the session's own signal.
import type { Backend } from '../engine/backend.ts';
import { parseMultiaddr, request } from '../protocol/net.ts';
import { StagePeerClient } from '../protocol/stage-client.ts';
import { COMPUTE_TIMEOUT_MS, CONTROL_TIMEOUT_MS, HEARTBEAT_TIMEOUT_MS } from '../protocol/constants.ts';
import type { SwarmNode } from '../protocol/net.ts';
import type { BlobStore } from '../protocol/blobs.ts';
import type { AggregateRequest, AggregateResponse, Assignment, Capabilities, FinishRequest, HeartbeatRequest, HeartbeatResponse, JoinResponse, MicroBatchRequest, MicroBatchResponse, RecallRequest, RecallResponse } from '../protocol/messages.ts';
import { HopInbox } from '../protocol/hop.ts';
import { AuthError, StaleError, SwarmError } from '../protocol/errors.ts';
import { silentLogger } from '../protocol/log.ts';
import type { Logger } from '../protocol/log.ts';
import type { StageHost, KeptOffer } from './stage-host.ts';
import type { OptimizerFactory } from './optimizer.ts';
import { loadAssignedStage } from './assignment.ts';
import { pullWhenNamed } from './step-gradients.ts';
import { recallTensor, runMicroBatch } from './pipeline.ts';
import type { PipelineDeps } from './pipeline.ts';
import type { VolunteerConfig } from './config.ts';
import { reportProgress } from './events.ts';
import type { VolunteerEvents } from './events.ts';
import { EXIT_FAILED, EXIT_OK, EXIT_REJECTED, VOLUNTEER_RELAY_RETRY_MS, VOLUNTEER_RELAY_WINDOW_MS } from './constants.ts';
import { listenOnRelay, peerIdOf, relayIdOf, routeAddrs } from '../protocol/nat.ts';
import type { PathBook, RelayMembers } from '../protocol/nat.ts';
import { MAX_HOP_PATHS } from '../protocol/messages.ts';
import { HEARTBEAT_INTERVAL_MS } from '../protocol/constants.ts';

/** The reason of the session's abort: the volunteer leaves with `exitCode`. */
export class LeavingError extends SwarmError {
  override name = 'LeavingError';
  readonly exitCode: number;
  constructor(exitCode: number, why: string) {
    super(`this volunteer is leaving: ${why}`);
    this.exitCode = exitCode;
  }
}

/** A stage kept after losing the coordinator, with what it offers the restarted one. */
interface KeptStage { host: StageHost; offer: KeptOffer }

/** Why a serving stage stopped serving (the reason of its `ended` abort). */
type StageEnd = { why: 'lost' } | { why: 'released'; rejoinAfterMs: number };

/** The states, each holding what it owns (disposed if the session leaves in it). */
export type SessionState =
  | { name: 'starting' }
  | { name: 'joining'; kept: KeptStage | null }
  | { name: 'loading'; assignment: Assignment; kept: KeptStage | null }
  | { name: 'serving'; assignment: Assignment; host: StageHost; ended: AbortController }
  | { name: 'lost'; host: StageHost }
  | { name: 'released'; host: StageHost | null; rejoinAfterMs: number }
  | { name: 'left' };
export type SessionStateName = SessionState['name'];

/** Every transition there is. */
const TRANSITIONS: Readonly<Record<SessionStateName, readonly SessionStateName[]>> = {
  starting: ['joining', 'left'],
  joining: ['loading', 'left'],
  loading: ['serving', 'left'],
  serving: ['lost', 'released', 'left'],
  lost: ['joining', 'left'],
  released: ['joining', 'left'],
  left: [],
};

export interface SessionComponents {
  node: SwarmNode;
  /** NAT traversal on: each connection's path (heartbeats report them); null or absent: off */
  paths?: PathBook | null;
  /** a volunteer relay (join --relay): the members its relay serves, as the coordinator lists them */
  members?: RelayMembers | null;
  /** the volunteer relays this peer reserves on (their direct addresses stay in the peer store) */
  relayIds?: Set<string>;
  blobs: BlobStore;
  backend: Backend;
  createOptimizer: OptimizerFactory;
  events: VolunteerEvents;
  /** swarmtune:node; the session logs to :session, its stage hosts to :stage, requests to :rpc */
  log?: Logger;
  /** called with each stage host as it starts serving (tests instrument it) */
  onHost?: (host: StageHost) => void;
}

/** Resolves false at once if `signal` aborts first. */
function sleep(ms: number, signal: AbortSignal): Promise<boolean> {
  if (signal.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const done = (slept: boolean) => { clearTimeout(t); signal.removeEventListener('abort', onAbort); resolve(slept); };
    const onAbort = () => done(false);
    const t = setTimeout(() => done(true), ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

/** Resolves when any of the signals aborts. */
function aborted(...signals: AbortSignal[]): Promise<void> {
  const any = AbortSignal.any(signals);
  if (any.aborted) return Promise.resolve();
  return new Promise((resolve) => any.addEventListener('abort', () => resolve(), { once: true }));
}

export class VolunteerSession {
  private readonly config: VolunteerConfig;
  private readonly c: SessionComponents;
  private readonly log: Logger;
  private readonly rpcLog: Logger;
  private readonly stageLog: Logger;
  private readonly leaving = new AbortController();
  private state: SessionState = { name: 'starting' };
  /** the Noise-authenticated peer id that may drive the stage, heartbeat or end this peer */
  private coordinatorId: string | null;
  /** a private run's peer-id allowlist: who besides token holders may fetch this peer's blobs */
  private allowPeers: Set<string> | null = null;
  private previousRunId: string | null = null;
  private lastCoordinatorMs = Date.now();
  /** the coordinator's heartbeat period, as its last heartbeat said */
  private coordinatorPeriodMs = HEARTBEAT_INTERVAL_MS;
  /** when the coordinator was first lost (rejoins retry within a window from then) */
  private lostSinceMs: number | null = null;
  private rss = { bytes: process.memoryUsage.rss(), atMs: Date.now() };
  /** where this peer's hop inputs arrive (registered on the node by hopsOn) */
  readonly hops: HopInbox;
  /** NAT traversal: this peer's route addresses once it holds a reservation on a volunteer relay (that
   *  circuit first), sent with heartbeats; null: the ones it joined with stand */
  private routeAddrsNow: string[] | null = null;

  /** `signal`: the process's stop (Ctrl-C, a test's crash), whose reason is a LeavingError. */
  constructor(config: VolunteerConfig, components: SessionComponents, opts: { signal?: AbortSignal } = {}) {
    this.config = config;
    this.c = components;
    const log = components.log ?? silentLogger;
    this.log = log.child('session');
    this.rpcLog = log.child('rpc');
    this.stageLog = log.child('stage');
    this.coordinatorId = config.coordinatorId;
    this.hops = new HopInbox({ log: this.rpcLog });
    const stop = opts.signal;
    if (stop !== undefined) {
      const onStop = () => this.leave(stop.reason instanceof LeavingError ? stop.reason : new LeavingError(EXIT_FAILED, String(stop.reason)));
      if (stop.aborted) onStop();
      else stop.addEventListener('abort', onStop, { once: true });
    }
  }

  /** aborted when the volunteer leaves: every request it makes and every job it queued stops */
  get signal(): AbortSignal { return this.leaving.signal; }
  get stateName(): SessionStateName { return this.state.name; }
  /** the exit code the volunteer leaves with (EXIT_OK until it leaves) */
  get exitCode(): number { return this.signal.aborted ? (this.signal.reason as LeavingError).exitCode : EXIT_OK; }

  /** Leave the run; the first reason wins. */
  leave(reason: LeavingError): void {
    if (this.signal.aborted) return;
    this.log('%s', reason.message);
    this.leaving.abort(reason);
  }

  private to(next: SessionState): void {
    const from = this.state.name;
    if (!TRANSITIONS[from].includes(next.name)) throw new SwarmError(`volunteer session: no transition from ${from} to ${next.name}`);
    const a = next.name === 'loading' || next.name === 'serving' ? next.assignment : null;
    this.log('%s -> %s%s', from, next.name, a !== null ? ` (run ${a.runId} stage ${a.stageIndex} step ${a.step})` : '');
    this.state = next;
  }

  /** the run this peer is in: assigned (loading or serving), else null */
  private get runId(): string | null {
    const s = this.state;
    return s.name === 'loading' || s.name === 'serving' ? s.assignment.runId : null;
  }

  // ---- what the handlers ask

  /** Only the coordinator may drive the stage, heartbeat or end this peer. */
  isCoordinator(peerId: string): boolean { return peerId === this.coordinatorId; }

  /** The light tail's reduce at the serving stage: the partners' step gradients pulled from them
   *  (aggregate collect, paged, f32), summed in the coordinator's order (StageHost.reduce). */
  reduce(req: AggregateRequest, opts: { signal: AbortSignal }): Promise<AggregateResponse> {
    const host = this.stageHost();
    const client = new StagePeerClient({ node: this.c.node, runId: host.runId, log: this.rpcLog, timeouts: {
      computeTimeoutMs: COMPUTE_TIMEOUT_MS, controlTimeoutMs: CONTROL_TIMEOUT_MS, heartbeatTimeoutMs: HEARTBEAT_TIMEOUT_MS,
      probeTimeoutMs: HEARTBEAT_TIMEOUT_MS, noticeTimeoutMs: CONTROL_TIMEOUT_MS,
    } });
    return host.reduce(req, this.c.node.peerId.toString(),
      (peer, signal) => pullWhenNamed(() => client.collect(peer.addrs.map(parseMultiaddr), req.step, { signal }), signal), opts);
  }

  checkCoordinator(proto: string, peerId: string): void {
    if (peerId !== this.coordinatorId) throw new AuthError(`${proto}: only the coordinator ${this.coordinatorId ?? '(not yet known)'} may send this, not ${peerId}`);
  }

  /** Verified blobs go to anyone in a public run; a private run's only to its token holders, allowlisted peers and the coordinator. */
  checkBlobAccess(peerId: string, token: string | undefined): void {
    const own = this.config.token;
    const open = own === null && this.allowPeers === null;
    if (!open && peerId !== this.coordinatorId && !(own !== null && token === own) && !(this.allowPeers?.has(peerId) ?? false)) {
      throw new AuthError('weights: this run is private: blobs go only to peers with its join token or on its allowlist');
    }
  }

  /** The stage host, while serving. */
  stageHost(): StageHost {
    if (this.state.name !== 'serving') throw new StaleError('this peer has no stage loaded yet');
    return this.state.host;
  }

  /** One micro-batch attempt at the serving stage (node/pipeline.ts). */
  microBatch(req: MicroBatchRequest, opts: { signal: AbortSignal }): Promise<MicroBatchResponse> {
    return runMicroBatch(this.pipelineDeps('microbatch'), req, opts);
  }

  /** A spot check's recall of a tensor an attempt received (node/pipeline.ts). */
  recall(req: RecallRequest, opts: { signal: AbortSignal }): Promise<RecallResponse> {
    return recallTensor(this.pipelineDeps('recall'), req, { signal: opts.signal, timeoutMs: this.config.handlerTimeoutMs.recall });
  }

  private pipelineDeps(what: string): PipelineDeps {
    const host = this.stageHost();
    if (this.coordinatorId === null) throw new StaleError(`${what}: the coordinator is not known yet`);
    return {
      node: this.c.node, inbox: this.hops, host, log: this.rpcLog,
      coordinator: { addrs: [this.config.coordinatorAddr], peerId: this.coordinatorId },
    };
  }

  /** NAT traversal: a reservation on the first volunteer relay of the assignment that gives one (it learns of
   *  this peer's admission with its next heartbeat: refusals are retried for a while), so routes name its
   *  circuit before the coordinator's. Bounded; without one the coordinator's relay serves alone. */
  private async reserveOnVolunteer(relays: readonly string[], coordinatorCircuit: string): Promise<void> {
    const { node, events } = this.c;
    const me = node.peerId.toString();
    const cands = relays.filter((r) => { const id = peerIdOf(r); return id !== undefined && id !== me; });
    if (cands.length === 0) return;
    for (const r of cands) this.c.relayIds?.add(peerIdOf(r)!);
    const deadline = Date.now() + VOLUNTEER_RELAY_WINDOW_MS;
    let last = '';
    while (Date.now() < deadline && !this.signal.aborted) {
      for (const relay of cands) {
        try {
          // a rejoin keeps the reservation it holds (listening again would add a second listener)
          const held = node.getMultiaddrs().map(String).filter((a) => a.startsWith(`${relay}/p2p-circuit`));
          const circuits = held.length > 0 ? held : await listenOnRelay(node, relay, { signal: AbortSignal.any([this.signal, AbortSignal.timeout(Math.max(1, deadline - Date.now()))]) });
          const mine = circuits.filter((a) => a.startsWith(`${relay}/p2p-circuit`));
          if (mine.length === 0) { last = `no circuit address through ${relay}`; continue; }
          const own = node.getMultiaddrs().map((m) => m.toString()).filter((a) => !a.includes('/p2p-circuit'));
          this.routeAddrsNow = routeAddrs(own, this.config.nat?.announce ?? [], [mine[0]!, coordinatorCircuit]);
          events.say('relay', { address: mine[0], relay: relayIdOf(mine[0]!) ?? null, volunteer: true }, `reachable through the volunteer relay at ${mine[0]}`);
          return;
        } catch (e) {
          if (this.signal.aborted) return;
          last = (e as Error).message;
        }
      }
      if (!(await sleep(VOLUNTEER_RELAY_RETRY_MS, this.signal))) return;
    }
    events.say('relay_refused', { reason: last, volunteer: true }, `no reservation on a volunteer relay (the coordinator's relay serves): ${last}`);
  }

  /** NAT traversal: a reservation on the coordinator's relay, now that it admitted this peer. Without one this
   *  peer is reachable only where it is reachable directly (a public peer needs none). */
  private async reserve(circuit: string): Promise<void> {
    const { node, events } = this.c;
    if (node.getMultiaddrs().some((m) => m.toString() === circuit)) return;
    try {
      await listenOnRelay(node, this.config.coordinator, { signal: AbortSignal.any([this.signal, AbortSignal.timeout(this.config.joinTimeoutMs)]) });
      events.say('relay', { address: circuit }, `reachable through the coordinator's relay at ${circuit}`);
    } catch (e) {
      if (this.signal.aborted) return;
      events.say('relay_refused', { reason: (e as Error).message }, `no reservation on the coordinator's relay (reachable only directly): ${(e as Error).message}`);
    }
  }

  /** A coordinator heartbeat: it is alive; say how this peer is doing. A volunteer relay takes the run's
   *  members from it (a newer list: a peer dropped from it is hung up on). `periodMs`: the coordinator's
   *  heartbeat period, when it grew past the base interval (a large swarm). */
  heartbeat(req?: HeartbeatRequest): HeartbeatResponse {
    this.lastCoordinatorMs = Date.now();
    this.coordinatorPeriodMs = req?.periodMs ?? HEARTBEAT_INTERVAL_MS;
    if (req?.members !== undefined && this.c.members != null) {
      // the list applies at once; the hang-ups finish after the answer (it has a 200 ms budget)
      void this.c.members.update(req.members.version, req.members.peers, this.c.node).then((dropped) => {
        if (dropped.length > 0) this.log('relay: %d peer(s) no longer members, hung up: %s', dropped.length, dropped.join(', '));
      }, (e: Error) => this.log('relay: hanging up on former members failed: %s', e.message));
    }
    if (this.lastCoordinatorMs - this.rss.atMs > this.config.rssSampleMs) this.rss = { bytes: process.memoryUsage.rss(), atMs: this.lastCoordinatorMs };
    const host = this.state.name === 'serving' ? this.state.host : null;
    return {
      runId: this.runId, ready: host !== null, step: host?.step ?? 0, tokensPerSecond: host?.tokensPerSecond ?? 0,
      inflight: host?.inflight ?? 0, busy: host?.busy ?? false, memoryRssBytes: this.rss.bytes,
      ...(this.c.paths != null ? { hopPaths: this.c.paths.peers(new Set(this.coordinatorId !== null ? [this.coordinatorId] : []), MAX_HOP_PATHS) } : {}),
      ...(this.routeAddrsNow !== null ? { listenAddrs: this.routeAddrsNow } : {}),
    };
  }

  /** The run is over (leave), or this peer is released from its stage (join again after rejoinAfterMs). */
  finish(req: FinishRequest): void {
    const runId = this.runId;
    if (req.runId !== runId) throw new StaleError(`finish for run ${req.runId}, this peer is in run ${runId}`);
    const { events } = this.c;
    // acted on after the answer goes out
    if (req.rejoinAfterMs !== undefined) {
      const ms = req.rejoinAfterMs;
      events.say('released', { run_id: runId, reason: req.reason, rejoin_after_ms: ms }, `released from the stage: ${req.reason}; joining again in ${Math.round(ms / 1000)} s`);
      // only a serving stage can be released: one still loading keeps loading
      const s = this.state;
      if (s.name === 'serving') setImmediate(() => s.ended.abort({ why: 'released', rejoinAfterMs: ms } satisfies StageEnd));
      return;
    }
    events.say('finished', { run_id: runId, reason: req.reason }, `run finished: ${req.reason}`);
    setImmediate(() => this.leave(new LeavingError(EXIT_OK, `run finished: ${req.reason}`)));
  }

  // ---- the session

  /** Join, serve, rejoin as the coordinator asks, until the volunteer leaves; returns its exit code.
   *  Whatever the session still holds is disposed before it returns. */
  async run(caps: Capabilities): Promise<number> {
    let next: SessionState = { name: 'joining', kept: null };
    try {
      for (;;) {
        this.to(next);
        const after = await this.phase(next, caps);
        if (typeof after === 'number') return after;
        next = after;
      }
    } catch (e) {
      // what failed because the volunteer is leaving is no error
      if (this.signal.aborted) return this.exitCode;
      throw e;
    } finally {
      await this.disposeHeld(this.state);
      this.to({ name: 'left' });
    }
  }

  /** Run one state; returns the next one, or the exit code. */
  private phase(s: SessionState, caps: Capabilities): Promise<SessionState | number> {
    switch (s.name) {
      case 'joining': return this.join(s, caps);
      case 'loading': return this.load(s);
      case 'serving': return this.serve(s);
      case 'lost': return this.lose(s);
      case 'released': return this.rejoinLater(s);
      case 'starting': case 'left': throw new SwarmError(`volunteer session: nothing runs in state ${s.name}`);
    }
  }

  private async join(s: Extract<SessionState, { name: 'joining' }>, caps: Capabilities): Promise<SessionState | number> {
    const { node, events } = this.c;
    const cfg = this.config;
    // NAT traversal: the circuit address through the coordinator's relay too (the reservation follows admission);
    // a volunteer relay is publicly reachable (the operator's word): its own addresses, no reservation
    const relay = cfg.nat?.relay === true;
    const circuit = this.c.paths != null && !relay ? `${cfg.coordinator}/p2p-circuit/p2p/${node.peerId.toString()}` : null;
    const own = node.getMultiaddrs().map((m) => m.toString());
    const listenAddrs = circuit !== null ? routeAddrs(own, cfg.nat?.announce ?? [], circuit) : own;
    this.routeAddrsNow = null;
    for (;;) {
      events.say('joining', { coordinator: cfg.coordinator, peer_id: node.peerId.toString() }, `joining ${cfg.coordinator} as ${node.peerId.toString()}`);
      let res: JoinResponse;
      try {
        res = await request(node, cfg.coordinatorAddr, 'join', {
          token: cfg.token, capabilities: caps, listenAddrs, previousRunId: this.previousRunId, ...(s.kept !== null ? { kept: s.kept.offer } : {}), ...(relay ? { relay: true } : {}),
        }, { timeoutMs: cfg.joinTimeoutMs, signal: this.signal, log: this.rpcLog });
      } catch (e) {
        if (this.signal.aborted) return this.exitCode;
        // a restarting coordinator refuses connections for a while: keep trying within the window
        if (this.lostSinceMs !== null && Date.now() - this.lostSinceMs < cfg.rejoinWindowMs && (e as Error).name !== 'AuthError') {
          if (!(await sleep(cfg.rejoinRetryMs, this.signal))) return this.exitCode;
          continue;
        }
        throw e;
      }
      // an address without /p2p/: the coordinator is the peer this join reached
      this.coordinatorId ??= node.getConnections().find((c) => c.remoteAddr.toString().startsWith(cfg.coordinatorAddr.toString()))?.remotePeer.toString() ?? null;
      if (res.status === 'rejected' || res.assignment === null) {
        events.say('rejected', { reason: res.reason }, `the coordinator did not give this peer a stage: ${res.reason ?? 'no reason given'}`);
        return EXIT_REJECTED;
      }
      const a = res.assignment;
      if (circuit !== null) {
        await this.reserve(circuit);
        // before loading: the heartbeat that reports the stage ready carries the volunteer relay's circuit
        await this.reserveOnVolunteer(a.relays ?? [], circuit);
      }
      this.allowPeers = a.allowPeers !== undefined ? new Set(a.allowPeers) : null;
      this.previousRunId = a.runId;
      this.lastCoordinatorMs = Date.now();
      events.assigned(a);
      return { name: 'loading', assignment: a, kept: s.kept };
    }
  }

  private async load(s: Extract<SessionState, { name: 'loading' }>): Promise<SessionState> {
    const a = s.assignment;
    let host: StageHost;
    if (a.keep !== undefined) {
      // the restarted coordinator resumes the stage this peer kept, at its last committed step
      const k = s.kept;
      if (k === null || k.offer.runId !== a.runId || k.offer.stageIndex !== a.stageIndex || k.offer.layerStart !== a.layerStart || k.offer.layerEnd !== a.layerEnd) {
        throw new SwarmError(`the coordinator asked this peer to keep stage ${a.stageIndex} layers [${a.layerStart}, ${a.layerEnd}) of run ${a.runId}, but it ${k === null ? 'kept no stage' : `kept stage ${k.offer.stageIndex} layers [${k.offer.layerStart}, ${k.offer.layerEnd}) of run ${k.offer.runId}`}`);
      }
      const from = k.host.step;
      const { rolledBack } = await k.host.resumeAt(a.step, a.keep.adapterSha256);
      s.kept = null;
      host = k.host;
      this.c.events.say('resumed', { stage: a.stageIndex, step: a.step, from_step: from, rolled_back: rolledBack },
        rolledBack ? `kept stage ${a.stageIndex}: rolled back the uncommitted update of step ${from} to the committed step ${a.step}`
          : `kept stage ${a.stageIndex} at the committed step ${a.step}`);
    } else {
      if (s.kept !== null) { await disposeHost(s.kept.host); s.kept = null; }
      host = await loadAssignedStage(a, this.c, {
        dataDir: this.config.dataDir, snapshotResidentBytes: this.config.snapshotResidentBytes, aids: this.config.aids, log: this.stageLog, signal: this.signal,
      });
    }
    return { name: 'serving', assignment: a, host, ended: new AbortController() };
  }

  private async serve(s: Extract<SessionState, { name: 'serving' }>): Promise<SessionState | number> {
    this.c.onHost?.(s.host);
    this.c.events.say('ready', { stage: s.assignment.stageIndex, params: s.host.stage.params.length }, `stage loaded (${s.host.stage.params.length} LoRA tensors); serving`);
    const unwatch = this.watchCoordinator(s.ended);
    const a = s.assignment, host = s.host;
    const stopProgress = reportProgress(this.c.events, () => ({
      stage: a.stageIndex, layerStart: a.layerStart, layerEnd: a.layerEnd, step: host.step, totalSteps: a.totalSteps,
      microBatches: host.microBatchesServed, tokensPerSecond: host.tokensPerSecond,
    }), this.config.progressIntervalMs);
    try {
      await aborted(this.signal, s.ended.signal);
    } finally {
      stopProgress();
      unwatch();
    }
    if (this.signal.aborted) return this.exitCode;
    const end = s.ended.signal.reason as StageEnd;
    return end.why === 'released' ? { name: 'released', host: s.host, rejoinAfterMs: end.rejoinAfterMs } : { name: 'lost', host: s.host };
  }

  /** Silence after which the coordinator is lost: coordinatorLostMs, plus what its heartbeat period grew
   *  by past the base interval (a large swarm beats each peer less often, coordinator/decide.ts). */
  coordinatorLostAfterMs(): number {
    return this.config.coordinatorLostMs + Math.max(0, this.coordinatorPeriodMs - HEARTBEAT_INTERVAL_MS);
  }

  /** Ends the stage's serving with 'lost' once the coordinator is silent for coordinatorLostMs(). */
  private watchCoordinator(ended: AbortController): () => void {
    let timer: NodeJS.Timeout;
    const check = () => {
      const lostMs = this.coordinatorLostAfterMs();
      const silentMs = Date.now() - this.lastCoordinatorMs;
      if (silentMs > lostMs) ended.abort({ why: 'lost' } satisfies StageEnd);
      else timer = setTimeout(check, lostMs - silentMs + 1);
    };
    timer = setTimeout(check, Math.max(0, this.coordinatorLostAfterMs() - (Date.now() - this.lastCoordinatorMs) + 1));
    return () => clearTimeout(timer);
  }

  /** The coordinator went silent: abandon the step in flight, keep the stage, rejoin offering it. */
  private async lose(s: Extract<SessionState, { name: 'lost' }>): Promise<SessionState> {
    const offer = await s.host.detach();
    const cfg = this.config;
    const steps = offer.states.map((x) => x.step);
    this.c.events.say('coordinator_lost', { kept_steps: steps },
      `no heartbeat from the coordinator for ${this.coordinatorLostAfterMs() / 1000} s; keeping stage ${offer.stageIndex} (restorable at step ${steps.join(' or ')}) and rejoining (for up to ${cfg.rejoinWindowMs / 60_000} min)`);
    this.lostSinceMs = Date.now();
    return { name: 'joining', kept: { host: s.host, offer } };
  }

  /** Released from the stage: drop it and join again as a new peer of the run (the coordinator places it). */
  private async rejoinLater(s: Extract<SessionState, { name: 'released' }>): Promise<SessionState | number> {
    const host = s.host!;
    await host.detach(); // waits for the job computing now and drops the step in flight
    await host.idle();
    s.host = null;
    await disposeHost(host);
    if (!(await sleep(s.rejoinAfterMs, this.signal))) return this.exitCode;
    return { name: 'joining', kept: null };
  }

  /** Dispose what a state holds (the session is leaving in it). */
  private async disposeHeld(s: SessionState): Promise<void> {
    const host = s.name === 'serving' || s.name === 'lost' || s.name === 'released' ? s.host
      : s.name === 'joining' || s.name === 'loading' ? s.kept?.host ?? null : null;
    if (host !== null) await disposeHost(host, true);
  }
}

/** A host's snapshot and its stage; `quiet` ignores a failing snapshot dispose (the volunteer is exiting). */
async function disposeHost(host: StageHost, quiet = false): Promise<void> {
  if (quiet) await host.dispose().catch(() => {});
  else await host.dispose();
  host.stage.dispose();
}
