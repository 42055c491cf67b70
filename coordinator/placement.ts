// Placement: the stage plan over the first peers, resuming it after a restart, placing late joiners, covering stages that lost every replica.
import type { StagePeerClient } from '../protocol/stage-client.ts';
import { SwarmError } from '../protocol/errors.ts';
import type { PeerHealth } from './dashboard/state.ts';
import { planStages } from './planner.ts';
import type { Plan, StageMemoryFn, StageRange } from './planner.ts';
import { placeResumed } from './resume.ts';
import { donorForEmptyStage, stageForLateJoiner, stageThroughput } from './decide.ts';
import type { AdapterState } from './adapter.ts';
import type { Admission, PendingJoin } from './admission.ts';
import type { Assignments } from './assignments.ts';
import type { CoordinatorConfig } from './config.ts';
import type { PeerRegistry } from './peers.ts';
import type { StageStates } from './stage-states.ts';
import type { RunStatus } from './status.ts';
import type { RunStore } from './store.ts';
import { sleep, until } from './wait.ts';

export interface PlacementInit {
  runId: string;
  numLayers: number;
  memory: StageMemoryFn;
  pipelineStages?: number;
  /** a restarted coordinator: the step of the optimizer checkpoint it resumed with (null: none); null for a new run */
  resume: { checkpointStep: number | null } | null;
  config: CoordinatorConfig;
  /** releases of a replica moved to another stage (notices) */
  client: StagePeerClient;
  peers: PeerRegistry;
  admission: Admission;
  assignments: Assignments;
  adapter: AdapterState;
  states: StageStates;
  status: RunStatus;
  store: RunStore;
}

type Why = 'late' | 'lost' | 'rebalance';

const gib = (bytes: number) => (bytes / 2 ** 30).toFixed(2);

export class Placement {
  private readonly o: PlacementInit;
  private planned: StageRange[] | null = null;
  /** peers released from a stage to take another one (rebalance), by the stage they are meant for */
  private readonly moving = new Map<string, number>();

  constructor(o: PlacementInit) {
    this.o = o;
  }

  /** the run's stages once planned (fixed for the run), else null */
  get stages(): readonly StageRange[] | null { return this.planned; }

  private stageNeed(s: number): number {
    const st = this.planned![s]!;
    return this.o.memory(st.layerStart, st.layerEnd);
  }

  /** Plan the stages over the peers that joined first and assign each its stage. False when nobody
   *  fits a stage: every waiting peer is told why, and the run waits for bigger ones. */
  async plan(joined: PendingJoin[]): Promise<boolean> {
    const { peers, status } = this.o;
    let plan: Plan;
    try {
      plan = planStages(this.o.numLayers,
        joined.map((j) => { const p = peers.get(j.peerId)!; return { peerId: p.peerId, memoryBytes: p.caps.memoryBytes, gemmGflops: p.caps.gemmGflops }; }),
        this.o.memory, this.o.pipelineStages);
    } catch (e) {
      for (const j of joined) { j.resolve({ status: 'rejected', reason: (e as Error).message, assignment: null }); peers.forget(j.peerId); }
      status.event('error', `planning failed: ${(e as Error).message}`);
      return false;
    }
    // from here on, joiners are late joiners
    this.planned = plan.stages;
    peers.setReplicas(plan.replicas);
    this.o.adapter.resetStages(plan.stages);
    const resumed = this.o.resume !== null ? this.placeResumed(plan) : null;
    for (const j of joined) {
      const reason = plan.rejected.get(j.peerId);
      if (reason !== undefined) {
        j.resolve({ status: 'rejected', reason, assignment: null });
        peers.forget(j.peerId);
        status.event('plan', `peer ${j.peerId} rejected: ${reason}`);
        continue;
      }
      // after a restart, a peer whose stage another peer kept joins at the first step boundary,
      // with that peer's optimizer state
      if (resumed !== null && resumed.deferred.includes(j.peerId)) { this.o.admission.defer(j); continue; }
      const s = peers.allReplicas().findIndex((r) => r.includes(j.peerId));
      const p = peers.get(j.peerId)!;
      p.stageIndex = s;
      p.health = 'ok';
      const keep = resumed !== null && resumed.keep.has(j.peerId) ? this.o.adapter.stageDigest(plan.stages[s]!) : undefined;
      j.resolve({ status: 'assigned', reason: null, assignment: await this.o.assignments.forStage(j.peerId, plan.stages, s, { keep }) });
    }
    const meta = await this.o.store.getMeta();
    if (meta !== null) await this.o.store.putMeta({ ...meta, numStages: plan.stages.length, stages: plan.stages });
    const desc = plan.stages.map((st, i) => `stage ${i} layers [${st.layerStart}, ${st.layerEnd}) on ${peers.replicasOf(i).length} peer(s)`).join('; ');
    status.event('plan', `planned ${plan.stages.length} stage(s): ${desc}`);
    status.emit({ event: 'plan', stages: plan.stages.map((st, i) => ({ ...st, replicas: peers.replicasOf(i) })) });
    return true;
  }

  /** After a restart: volunteers that kept their stage at the committed step keep it; the rest load
   *  the committed adapter (coordinator/resume.ts). */
  private placeResumed(plan: Plan) {
    const { peers, status, adapter } = this.o;
    const step = status.step;
    const r = placeResumed({
      runId: this.o.runId, step, stages: plan.stages, planned: plan.replicas,
      stageDigests: plan.stages.map((st) => adapter.stageDigest(st)),
      offers: new Map(peers.all().map((p) => [p.peerId, p.kept])),
      memoryOf: (id) => peers.get(id)!.caps.memoryBytes,
      need: plan.stages.map((st) => this.o.memory(st.layerStart, st.layerEnd)),
    });
    peers.setReplicas(r.replicas);
    for (const n of r.notes) status.note(`resume: ${n}`);
    for (const [id, s] of r.keep) status.event('plan', `resume: peer ${id} keeps stage ${s} at the committed step ${step} (adapter verified by sha256)`);
    const c = this.o.resume!.checkpointStep;
    for (const s of r.stagesWithoutState) {
      status.event('checkpoint', `resume: no peer kept stage ${s} at step ${step}; it loads the committed adapter of step ${step} and ` + (
        c === step ? `the optimizer checkpoint of step ${c} (exact)`
          : c !== null ? `the optimizer checkpoint of step ${c} (the moments miss steps ${c + 1}..${step}; no step is redone)`
            : 'fresh optimizer moments (no checkpoint was written; no step is redone)'));
    }
    status.emit({
      event: 'resume_plan', step, kept: Object.fromEntries(r.keep), deferred: r.deferred,
      stages_from_checkpoint: r.stagesWithoutState, checkpoint_step: c,
    });
    return r;
  }

  /** Until every planned peer has loaded its stage (before the first step). */
  async waitReady(signal: AbortSignal): Promise<void> {
    const { peers, config } = this.o;
    const deadline = Date.now() + config.readyDeadlineMs;
    for (;;) {
      const assigned = peers.all().filter((p) => p.stageIndex !== null && p.health !== 'dead');
      if (assigned.length > 0 && assigned.every((p) => p.ready)) return;
      if (Date.now() > deadline) throw new SwarmError(`peers did not become ready within ${config.readyDeadlineMs / 60_000} minutes`);
      for (let s = 0; s < this.planned!.length; s++) {
        if (peers.liveReplicas(s).length === 0) throw new SwarmError(`stage ${s} lost all its peers before training started`);
      }
      await sleep(config.readyPollMs, signal);
    }
  }

  /** At a step boundary: give each late joiner the fitting stage with the lowest throughput, with that
   *  stage's current adapter and optimizer state, and add it to the stage's replicas once loaded. */
  async admitLateJoiners(signal: AbortSignal): Promise<void> {
    const { peers, status } = this.o;
    const stages = this.planned!;
    for (const j of this.o.admission.takeLate()) {
      const p = peers.get(j.peerId);
      if (p === undefined) continue;
      const need = stages.map((st) => this.o.memory(st.layerStart, st.layerEnd));
      const speed = (s: number) => stageThroughput(peers.liveReplicas(s).map((id) => peers.get(id)?.tokensPerSecond ?? 0));
      const s = stageForLateJoiner(p.caps.memoryBytes, need, (x) => peers.liveReplicas(x).length, speed);
      if (s === null) {
        const reason = `this peer offers ${gib(p.caps.memoryBytes)} GiB but the smallest stage of this run needs ${gib(Math.min(...need))} GiB`;
        j.resolve({ status: 'rejected', reason, assignment: null });
        peers.forget(j.peerId);
        status.event('plan', `late peer ${j.peerId} rejected: ${reason}`);
        continue;
      }
      await this.placeOn(j, s, 'late', signal);
    }
  }

  /** Give a waiting joiner stage s at the current step (its adapter, its optimizer state), wait until
   *  it has loaded, and add it to the stage's replicas. False when it did not make it. */
  private async placeOn(j: PendingJoin, s: number, why: Why, signal: AbortSignal): Promise<boolean> {
    const { peers, status, config } = this.o;
    const p = peers.get(j.peerId);
    if (p === undefined) return false;
    const st = this.planned![s]!;
    const state = await this.o.states.forNewReplica(s, signal);
    p.stageIndex = s;
    p.health = 'ok';
    p.ready = false;
    p.lastSeenMs = Date.now();
    p.slowUntilMs = 0;
    j.resolve({ status: 'assigned', reason: null, assignment: await this.o.assignments.forStage(j.peerId, this.planned!, s, { optimizerState: state.bytes }) });
    // the new replica joins the routes only once it has loaded the stage at this very step
    await until(() => p.ready || (p.health as PeerHealth) === 'dead', { timeoutMs: config.loadDeadlineMs, intervalMs: config.loadPollMs, signal });
    if (!p.ready) { peers.markDead(p, 'did not load its stage in time'); return false; }
    peers.addReplica(s, p.peerId);
    status.totals.reassignments++;
    p.reassignments = (p.reassignments ?? 0) + 1;
    const range = `layers [${st.layerStart}, ${st.layerEnd})`;
    const step = status.step;
    const msg = why === 'late' ? `late peer ${p.peerId} added to stage ${s} (${range}) at step ${step}`
      : `stage ${s} (${range}) had no live replica: peer ${p.peerId} ${why === 'rebalance' ? 'moved from another stage ' : ''}took it at step ${step} with the adapter of step ${step} and ${state.from}`;
    status.event('reassign', msg);
    status.emit({ event: why === 'late' ? 'peer_added' : 'stage_reassigned', peer_id: p.peerId, stage: s, step, how: why, optimizer_state: state.from });
    return true;
  }

  /** Make sure every stage has a live replica: give an empty stage a waiting joiner, or move a replica
   *  from a stage that has several; with neither, wait (status says for what) until a volunteer joins. */
  async coverLostStages(signal: AbortSignal): Promise<void> {
    const { peers, status, admission } = this.o;
    const stages = this.planned!;
    for (;;) {
      signal.throwIfAborted();
      const empty = stages.map((_, s) => s).filter((s) => peers.liveReplicas(s).length === 0);
      if (empty.length === 0) {
        if (status.waitingFor !== null) { status.waitingFor = null; status.note('every stage has a peer again; training goes on'); }
        return;
      }
      const s = empty[0]!;
      const need = this.stageNeed(s);
      const j = admission.takeLateWhere((id) => (peers.get(id)?.caps.memoryBytes ?? -1) >= need);
      if (j !== null) {
        const how = this.moving.has(j.peerId) ? 'rebalance' : 'lost';
        this.moving.delete(j.peerId);
        await this.placeOn(j, s, how, signal);
        continue;
      }
      // a replica of the stage with the most replicas (the slowest of them), when it fits
      const donor = donorForEmptyStage(stages.map((_, t) => peers.liveReplicas(t)), need,
        (id) => peers.get(id)!.caps.memoryBytes, (id) => peers.get(id)!.tokensPerSecond);
      if (donor !== null) {
        await this.moveReplica(donor.id, donor.stage, s, signal);
        continue;
      }
      const st = stages[s]!;
      const msg = `stage ${s} (layers [${st.layerStart}, ${st.layerEnd})) has no peer; waiting for a volunteer with ≥ ${gib(need)} GiB`;
      if (status.waitingFor !== msg) {
        status.waitingFor = msg;
        status.event('reassign', msg);
        status.emit({ event: 'waiting', stage: s, need_bytes: need, message: msg });
      }
      await sleep(this.o.config.coverPollMs, signal);
    }
  }

  /** Rebalance: release a replica of stage `from` (finish with rejoinAfterMs 0) and place it on `to`. */
  private async moveReplica(id: string, from: number, to: number, signal: AbortSignal): Promise<void> {
    const { peers, status, admission, config } = this.o;
    const p = peers.get(id)!;
    peers.removeFromStages(id);
    p.stageIndex = null;
    p.health = 'spare';
    p.ready = false;
    this.moving.set(id, to);
    status.event('reassign', `moving peer ${id} from stage ${from} to stage ${to}, which lost every replica`);
    try {
      await this.o.client.finish(p.addrs, `moved to stage ${to}, which lost every replica`, 0, { signal });
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      this.moving.delete(id);
      peers.markDead(p, `it did not take the release to move to stage ${to} (${(e as Error).message || (e as Error).name})`);
      return;
    }
    await until(() => admission.isWaiting(id), { timeoutMs: config.rejoinDeadlineMs, intervalMs: config.loadPollMs, signal });
    const j = admission.takeLateWhere((x) => x === id);
    this.moving.delete(id);
    if (j === null) { peers.markDead(p, `it did not join again within ${config.rejoinDeadlineMs / 1000} s to take stage ${to}`); return; }
    await this.placeOn(j, to, 'rebalance', signal);
  }
}
