// The peer registry: who joined, which stage each replica serves, heartbeats, health after failures, bans with backoff.
import type { Capabilities, HopPath, PeerStatus } from '../protocol/messages.ts';
import { parseMultiaddr } from '../protocol/net.ts';
import type { Multiaddr } from '../protocol/net.ts';
import type { StagePeerClient } from '../protocol/stage-client.ts';
import type { PeerHealth } from './dashboard/state.ts';
import type { StageRange } from './planner.ts';
import type { KeptOffer } from './resume.ts';
import type { RunStore } from './store.ts';
import type { RunStatus } from './status.ts';
import type { CoordinatorConfig } from './config.ts';
import { BanList, inWords } from './bans.ts';
import { judge, judgeDigests } from './verdicts.ts';
import type { DigestReport, EvidenceKind, JudgeLimits, Verdict } from './verdicts.ts';
import { SwarmError } from '../protocol/errors.ts';
import { heartbeatPeriodMs, heartbeatSilenceMs, heartbeatVerdict, silenceAllowedMs } from './decide.ts';
import { sleep } from './wait.ts';

/** An error in words for a drop or a note: never empty (an aborted stream can carry no message). */
function reasonOf(e: unknown): string {
  if (!(e instanceof Error)) return String(e) || 'no reason given';
  const code = (e as NodeJS.ErrnoException).code;
  return e.message.trim() !== '' ? e.message : code !== undefined ? `${e.name} ${code}` : e.name !== 'Error' ? e.name : 'no reason given';
}

export interface PeerState {
  peerId: string;
  caps: Capabilities;
  addrs: Multiaddr[];
  stageIndex: number | null;
  health: PeerHealth;
  ready: boolean;
  lastSeenMs: number;
  tokensPerSecond: number;
  /** error answers and protocol violations since this peer's last committed micro-batch (the
   *  verdict bans it at ERROR_STREAK_BAN in a row, coordinator/verdicts.ts) */
  failures: number;
  /** microBatches when `failures` last counted: a committed micro-batch since then resets it */
  failuresMark?: number;
  microBatches: number;
  /** the stage state this peer kept from before a coordinator restart (join.kept) */
  kept?: KeptOffer;
  /** failed micro-batch attempts at this peer */
  retries?: number;
  /** compute requests to this peer that timed out */
  timeouts?: number;
  /** deprioritised (out of routes while a stage has other replicas) until then, after repeated timeouts */
  slowUntilMs?: number;
  /** placements after the plan (late join, lost stage, rebalance) */
  reassignments?: number;
  /** its connections' paths to other peers, from its last heartbeat (NAT traversal on) */
  hopPaths?: HopPath[];
  /** NAT traversal: it serves circuit relay v2 to the run's members (join --relay) */
  relay?: boolean;
  /** the members version this relay last took with a heartbeat */
  membersSent?: number;
  /** when the last heartbeat to it went out (the heartbeat schedule: each is due a period later) */
  beatSentMs?: number;
}

/** errors that mean the peer broke the protocol (they count against it), not that it is slow or gone */
const VIOLATIONS = ['SchemaError', 'TensorError', 'DecodeError', 'FrameTooLargeError'];
/** what the coordinator found wrong itself in what a peer sent: proof enough for a ban */
const DIRECT: Readonly<Record<string, EvidenceKind>> = { BadOutputError: 'bad-tensor', BadUploadError: 'bad-upload' };

export interface PeerRegistryInit {
  runId: string;
  /** heartbeats, probes and notices (its logger names this component) */
  client: StagePeerClient;
  config: CoordinatorConfig;
  status: RunStatus;
  store: RunStore;
  /** the run's signal: heartbeats and notices end when it aborts */
  signal: AbortSignal;
  /** NAT traversal on: whether a peer is publicly reachable or behind a NAT (holds a reservation on the
   *  coordinator's relay); absent or undefined: unknown */
  reachability?: (peerId: string) => 'public' | 'relay' | undefined;
}

export class PeerRegistry {
  private readonly peers = new Map<string, PeerState>();
  /** per stage, its replica peer ids in aggregation order (empty before the plan) */
  private replicas: string[][] = [];
  private readonly banList: BanList;
  private banWrite: Promise<void> = Promise.resolve();
  private readonly o: PeerRegistryInit;
  private readonly limits: JudgeLimits;
  /** the run's members as volunteer relays are told them: admitted and not banned, with a version */
  private members = { key: '', version: 0, peers: [] as string[] };

  constructor(o: PeerRegistryInit) {
    this.o = o;
    this.banList = new BanList(o.config.banBaseMs, o.config.banMaxMs);
    this.limits = { errorStreakBan: o.config.errorStreakBan };
  }

  get(id: string): PeerState | undefined { return this.peers.get(id); }
  all(): PeerState[] { return [...this.peers.values()]; }
  addrs(id: string): Multiaddr[] { return this.peers.get(id)!.addrs; }
  forget(id: string): void { this.peers.delete(id); }

  /** A peer joined (again). Known after the plan, it restarted or was released: its old self is gone
   *  (micro-batches it held are re-run) and it is placed like any late joiner. */
  join(peerId: string, caps: Capabilities, addrs: Multiaddr[], kept: KeptOffer | undefined, planned: boolean): void {
    const known = this.peers.get(peerId);
    if (known !== undefined && planned) {
      // a peer released from its stage to take another one, or whose ban ended, is a spare again
      if (known.health !== 'spare' && known.health !== 'banned') this.markDead(known, 'it joined again (restarted)');
      else known.health = 'spare';
      this.removeFromStages(peerId);
      Object.assign(known, { caps, addrs, stageIndex: null, ready: false, lastSeenMs: Date.now(), tokensPerSecond: 0, kept });
    } else {
      this.peers.set(peerId, {
        peerId, caps, addrs, stageIndex: null, health: 'spare', ready: false,
        lastSeenMs: Date.now(), tokensPerSecond: 0, failures: 0, microBatches: 0, kept,
      });
    }
  }

  // ---- stage membership

  setReplicas(replicas: string[][]): void { this.replicas = replicas; }
  replicasOf(s: number): readonly string[] { return this.replicas[s] ?? []; }
  allReplicas(): readonly (readonly string[])[] { return this.replicas; }

  /** a newly loaded replica joins its stage's routes (kept in peer id order: the aggregation order) */
  addReplica(s: number, id: string): void {
    this.replicas[s]!.push(id);
    this.replicas[s]!.sort();
  }

  removeFromStages(id: string): void {
    for (const r of this.replicas) { const i = r.indexOf(id); if (i >= 0) r.splice(i, 1); }
  }

  liveReplicas(s: number): string[] {
    return this.replicas[s]!.filter((id) => !this.gone(id));
  }

  /** dropped (dead) or banned: out of every route */
  gone(id: string): boolean {
    const h = this.peers.get(id)?.health;
    return h === 'dead' || h === 'banned';
  }

  /** What a hop between peers a and b is expected to cost (coordinator/routes.ts preferDirectHops):
   *  0 direct — a reported direct or hole-punched connection, or an end that is publicly reachable
   *  (the other dials it); 2 a connection reported relayed; 1 unknown (both behind NATs, never hopped).
   *  Without NAT traversal every hop is direct. */
  hopCost(a: string, b: string): number {
    const reported = this.peers.get(a)?.hopPaths?.find((h) => h.peerId === b)?.path ?? this.peers.get(b)?.hopPaths?.find((h) => h.peerId === a)?.path;
    if (reported !== undefined) return reported === 'relayed' ? 2 : 0;
    const reach = this.o.reachability;
    if (reach === undefined) return 0;
    return reach(a) === 'relay' && reach(b) === 'relay' ? 1 : 0;
  }

  /** replicas of stage s that routes should use: the live ones, without deprioritised slow peers
   *  unless the stage has nothing else */
  routable(s: number): string[] {
    const live = this.liveReplicas(s);
    const now = Date.now();
    const fast = live.filter((id) => (this.peers.get(id)!.slowUntilMs ?? 0) <= now);
    return fast.length > 0 ? fast : live;
  }

  // ---- health

  markDead(p: PeerState, why: string): void {
    // a banned peer is out of the routes already; its ban (what status shows) outlives its process
    if (p.health === 'dead' || p.health === 'banned') return;
    p.health = 'dead';
    this.o.status.event('drop', `peer ${p.peerId} (stage ${p.stageIndex}) dropped from routes: ${why}`);
    this.o.status.emit({ event: 'peer_dropped', peer_id: p.peerId, reason: why });
  }

  /** A request from this peer failed validation: it counts against the peer. */
  countViolation(peerId: string, proto: string, err: Error): void {
    if (!VIOLATIONS.includes(err.name)) return;
    const p = this.peers.get(peerId);
    this.o.status.note(`peer ${peerId} sent a bad ${proto} request: ${err.name}: ${err.message}`);
    if (p !== undefined) this.countError(p, err);
  }

  /** An error answer (or violation) of a peer that is still up counts against it; the verdict bans
   *  it after ERROR_STREAK_BAN in a row without a committed micro-batch between. */
  private countError(p: PeerState, cause: Error): void {
    if (p.health === 'banned') return;
    if (p.microBatches !== p.failuresMark) { p.failures = 0; p.failuresMark = p.microBatches; }
    p.failures++;
    this.applyVerdict(judge({ kind: 'error-answers', peerId: p.peerId, streak: p.failures, last: `${cause.name}: ${cause.message}` }, this.limits));
  }

  /** Carry out a verdict of coordinator/verdicts.ts: its bans, and its strikes as error answers. */
  applyVerdict(v: Verdict): void {
    if (v.kind === 'ban') for (const b of v.bans) { const p = this.peers.get(b.peerId); if (p !== undefined) this.ban(p, b.reason, b.evidence); }
    if (v.kind === 'clear' || v.kind === 'ban') {
      for (const id of v.strikes ?? []) { const p = this.peers.get(id); if (p !== undefined) this.countError(p, new Error('a wrong accusation')); }
    }
  }

  /** Heartbeats: every base interval, the beats that are due go out, each on its own so one silent peer
   *  never delays the others'. Up to heartbeatMaxPerSecond × interval peers every peer is beaten every
   *  interval; above that the period grows with the peer count (decide.heartbeatPeriodMs), each tick
   *  sends the share that is due (oldest first), so the coordinator's heartbeat rate stays bounded and
   *  even, and a peer is dropped after heartbeatSilenceMs of silence. */
  async runHeartbeats(active: () => boolean): Promise<void> {
    const signal = this.o.signal;
    try {
      for (;;) {
        await sleep(this.o.config.heartbeatIntervalMs, signal, { ref: false });
        // a finished run has released its peers: their last health stays what it was
        if (active()) void this.heartbeatDue(Date.now());
      }
    } catch (e) {
      if (!signal.aborted) throw e;
    }
  }

  /** One heartbeat round to every peer now (the run's end: status keeps each peer's last report, hop paths
   *  included, even of a run shorter than a heartbeat interval). */
  heartbeatNow(): Promise<void> { return this.heartbeatAll(this.beatable()); }

  /** Admitted, unbanned peers: whom volunteer relays serve (a new version whenever the list changes). */
  private currentMembers(): { version: number; peers: string[] } {
    const peers = this.all().filter((p) => p.health !== 'banned').map((p) => p.peerId).sort();
    const key = peers.join(',');
    if (key !== this.members.key) this.members = { key, version: this.members.version + 1, peers };
    return this.members;
  }

  /** the peers heartbeats go to: placed on a stage and neither dropped nor banned */
  private beatable(): PeerState[] {
    return this.all().filter((p) => p.stageIndex !== null && p.health !== 'dead' && p.health !== 'banned');
  }

  /** The heartbeat period now (the volunteers are told it, so they wait as long for the next beat). */
  heartbeatPeriodMs(): number {
    const c = this.o.config;
    return heartbeatPeriodMs(this.beatable().length, c.heartbeatIntervalMs, c.heartbeatMaxPerSecond);
  }

  /** The peers whose beat is due at `now` (half a tick early counts: timers drift), oldest first, at
   *  most the share of one tick. */
  dueForHeartbeat(now: number): PeerState[] {
    const c = this.o.config;
    const all = this.beatable();
    const period = heartbeatPeriodMs(all.length, c.heartbeatIntervalMs, c.heartbeatMaxPerSecond);
    const share = Math.ceil((all.length * c.heartbeatIntervalMs) / period);
    const due = all.filter((p) => (p.beatSentMs ?? -Infinity) + period <= now + c.heartbeatIntervalMs / 2);
    due.sort((a, b) => (a.beatSentMs ?? -Infinity) - (b.beatSentMs ?? -Infinity));
    return due.slice(0, share);
  }

  private heartbeatDue(now: number): Promise<void> { return this.heartbeatAll(this.dueForHeartbeat(now)); }

  private async heartbeatAll(list: PeerState[]): Promise<void> {
    const signal = this.o.signal;
    const c = this.o.config;
    const periodMs = this.heartbeatPeriodMs();
    const silenceMs = heartbeatSilenceMs(periodMs, c.heartbeatTimeoutMs);
    const members = this.all().some((p) => p.relay === true) ? this.currentMembers() : null;
    await Promise.all(list.map(async (p) => {
      p.beatSentMs = Date.now();
      try {
        const send = members !== null && p.relay === true && p.membersSent !== members.version ? { version: members.version, peers: members.peers } : undefined;
        const r = await this.o.client.heartbeat(p.addrs, this.o.status.step, { signal, members: send, ...(periodMs > c.heartbeatIntervalMs ? { periodMs } : {}) });
        if (send !== undefined) p.membersSent = send.version;
        p.lastSeenMs = Date.now();
        p.ready = r.ready;
        p.tokensPerSecond = r.tokensPerSecond;
        if (r.hopPaths !== undefined) p.hopPaths = r.hopPaths;
        // NAT traversal: a reservation on a volunteer relay puts that circuit first (only this peer's own addresses)
        if (r.listenAddrs !== undefined) {
          const mine = r.listenAddrs.filter((a) => a.endsWith(`/p2p/${p.peerId}`)).map((a) => parseMultiaddr(a));
          if (mine.length > 0 && mine.map(String).join(' ') !== p.addrs.map(String).join(' ')) p.addrs = mine;
        }
        if (p.health === 'slow' && (p.slowUntilMs ?? 0) <= Date.now()) p.health = 'ok';
      } catch (e) {
        if (signal.aborted) return;
        const silentMs = Date.now() - p.lastSeenMs;
        const allowMs = silenceAllowedMs(silenceMs, !p.ready, (e as Error).name === 'TimeoutError', c.loadingSilenceMs);
        if (heartbeatVerdict(silentMs, allowMs) === 'dead') this.markDead(p, `no heartbeat for ${silentMs} ms${allowMs > silenceMs ? ' while loading its stage' : ''}`);
        else { if (p.health === 'ok') this.o.status.note(`peer ${p.peerId} missed a heartbeat: ${reasonOf(e)}`); p.health = 'slow'; }
      }
    }));
  }

  /** After a failed request: a peer that does not answer a short heartbeat is dropped from routes
   *  at once (waiting for the heartbeat timeout would burn the micro-batch's retries); a peer that
   *  answered with a protocol violation has it counted against it. */
  private async probe(peerId: string, cause: Error, signal: AbortSignal): Promise<void> {
    const p = this.peers.get(peerId);
    if (p === undefined || p.health === 'dead' || p.health === 'banned') return;
    try {
      const hb = await this.o.client.heartbeat(p.addrs, this.o.status.step, { signal, probe: true });
      p.lastSeenMs = Date.now();
      // alive but without its stage (a restarted process): as good as gone for this run's routes
      if (!hb.ready || hb.runId !== this.o.runId) this.markDead(p, 'it answers but no longer holds its stage');
      // up and serving, yet it failed the request: an error answer (a timeout is slowness, counted apart)
      else if (cause.name !== 'TimeoutError') this.countError(p, cause);
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      this.markDead(p, `failed a request (${reasonOf(cause)}) and then a heartbeat (${reasonOf(e)})`);
    }
  }

  /** After a failed micro-batch attempt at peer id: bad output bans it; a timeout counts (repeated
   *  ones mark it slow: out of routes while its stage has other replicas); a peer that also fails a
   *  short heartbeat is dropped. */
  async afterFailure(id: string, cause: Error, signal: AbortSignal): Promise<void> {
    const p = this.peers.get(id);
    if (p === undefined) return;
    if (this.direct(id, cause)) return;
    if (cause.name === 'TimeoutError') {
      const c = this.o.config;
      p.timeouts = (p.timeouts ?? 0) + 1;
      if (p.timeouts >= c.slowAfterTimeouts && (p.slowUntilMs ?? 0) <= Date.now()) {
        p.slowUntilMs = Date.now() + c.slowPenaltyMs;
        p.health = 'slow';
        this.o.status.event('drop', `peer ${id} (stage ${p.stageIndex}) timed out ${p.timeouts} times; marked slow: routes avoid it for ${inWords(c.slowPenaltyMs)} while its stage has other replicas`);
        this.o.status.emit({ event: 'peer_slow', peer_id: id, timeouts: p.timeouts });
      }
    }
    await this.probe(id, cause, signal);
  }

  /** A peer failed a step-level request (collect, apply, upload, optimizer state): whatever state it
   *  holds for this step is now unknown, so it leaves the routes even if it still answers heartbeats. */
  async dropAfterFailure(id: string, cause: Error, why: string, signal: AbortSignal): Promise<void> {
    if (signal.aborted) throw signal.reason;
    if (this.direct(id, cause)) return;
    await this.probe(id, cause, signal);
    const p = this.peers.get(id);
    if (p !== undefined && !this.gone(id)) this.markDead(p, `${why} (${cause.name}: ${reasonOf(cause)})`);
  }

  /** A failure that is itself proof (the coordinator found the peer's tensor or upload bad): banned. */
  private direct(id: string, cause: Error): boolean {
    const kind = DIRECT[cause.name];
    if (kind === undefined) return false;
    this.applyVerdict(judge(kind === 'bad-tensor' ? { kind, peerId: id, what: cause.message } : { kind: 'bad-upload', peerId: id, what: cause.message }));
    return true;
  }

  /** Stage s's replicas reported their digests after applying step `step`'s update: a minority is
   *  banned; replicas that disagree without a majority (1 vs 1) are all dropped (nobody can be blamed,
   *  none may be trusted: the stage is covered again from the committed adapter). The digests the
   *  stage now holds, or null. */
  async settleDigests(s: number, step: number, reports: readonly DigestReport[], signal: AbortSignal): Promise<{ adapterSha256: string; optimizerSha256: string } | null> {
    const what = `stage ${s}'s weights and optimizer state after the update of step ${step}`;
    const { verdict, agreed } = judgeDigests(what, reports);
    if (verdict.kind === 'unresolved') {
      this.o.status.event('ban', `${what}: replicas ${verdict.peers.join(', ')} disagree and no majority decides; all of them leave the stage`);
      for (const id of verdict.peers) await this.dropAfterFailure(id, new SwarmError('its weights disagree with another replica\'s'), `${what} disagree`, signal);
    } else this.applyVerdict(verdict);
    return agreed;
  }

  // ---- bans

  /** Bans outlive a coordinator restart (the run's LevelDB keeps them). */
  async restoreBans(): Promise<void> {
    const saved = await this.o.store.getBans();
    if (saved !== null) this.banList.restore(saved);
  }

  /** Why a join of this peer is refused now (banned), or null. */
  refusal(peerId: string): string | null { return this.banList.refusal(peerId); }

  /** Ban a peer with backoff (coordinator/bans.ts): out of every route now, its stage released; it
   *  is told to join again when the ban ends, and a join before then is refused. */
  ban(p: PeerState, why: string, evidence: EvidenceKind | 'operator' = 'operator'): void {
    if (p.health === 'banned') return;
    const rec = this.banList.ban(p.peerId, why);
    // durable, so a restarted coordinator still refuses the peer (and doubles its next ban)
    this.banWrite = this.banWrite.then(() => this.o.store.putBans(this.banList.entries())).catch((e: Error) => this.o.status.note(`could not save bans: ${e.message}`));
    const stage = p.stageIndex;
    p.health = 'banned';
    p.failures++;
    p.ready = false;
    this.o.status.totals.bans++;
    this.removeFromStages(p.peerId);
    p.stageIndex = null;
    this.o.status.event('ban', `peer ${p.peerId} (stage ${stage}) banned from the run for ${inWords(rec.durationMs)} (ban ${rec.count}): ${why}`);
    this.o.status.emit({ event: 'peer_banned', peer_id: p.peerId, stage, reason: why, evidence, ban: rec.count, duration_ms: rec.durationMs });
    void this.o.client.finish(p.addrs, `banned for ${inWords(rec.durationMs)}: ${why}`.slice(0, 4000), rec.durationMs, { signal: this.o.signal })
      .catch(() => { /* it may be gone already */ });
  }

  /** Wait until every ban is on disk. */
  async flushBans(): Promise<void> { await this.banWrite; }

  /** Every peer as status shows it. */
  statuses(stages: readonly StageRange[]): PeerStatus[] {
    return this.all().map((p) => ({
      peerId: p.peerId, stageIndex: p.stageIndex,
      layerStart: p.stageIndex !== null ? stages[p.stageIndex]!.layerStart : null,
      layerEnd: p.stageIndex !== null ? stages[p.stageIndex]!.layerEnd : null,
      device: p.caps.deviceName, memoryBytes: p.caps.memoryBytes, gemmGflops: p.caps.gemmGflops,
      tokensPerSecond: p.tokensPerSecond, microBatches: p.microBatches, health: p.health, lastSeenMs: p.lastSeenMs,
      retries: p.retries ?? 0, timeouts: p.timeouts ?? 0, bans: this.banList.get(p.peerId)?.count ?? 0,
      banRemainingMs: this.banList.remainingMs(p.peerId), banReason: this.banList.get(p.peerId)?.reason ?? null,
      reassignments: p.reassignments ?? 0,
      ...(p.hopPaths !== undefined ? { hopPaths: p.hopPaths } : {}),
    }));
  }
}
