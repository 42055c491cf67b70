// The run: the Coordinator wires admission, placement, the peer registry and serving together, and runs the step loop.
import { SwarmError } from '../protocol/errors.ts';
import { randomBytes } from 'node:crypto';
import type { LlamaConfig, LoraConfig, NamedTensor, WeightSource } from '../engine/types.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { learningRateAt, warmupStepsFor } from '../engine/train/schedule.ts';
import type { SwarmNode } from '../protocol/net.ts';
import type { BlobStore } from '../protocol/blobs.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { silentLogger } from '../protocol/log.ts';
import type { Logger } from '../protocol/log.ts';
import { StagePeerClient } from '../protocol/stage-client.ts';
import { HopInbox } from '../protocol/hop.ts';
import type { StageMemoryFn } from './planner.ts';
import type { RunStore, StepRecord } from './store.ts';
import type { DashboardState } from './dashboard/state.ts';
import { coordinatorConfig } from './config.ts';
import type { CoordinatorConfig } from './config.ts';
import { RunStatus } from './status.ts';
import type { RunEvent, RunView } from './status.ts';
import { PeerRegistry } from './peers.ts';
import type { PeerState } from './peers.ts';
import { AdapterState } from './adapter.ts';
import { ShardBlobs } from './shards.ts';
import { StageStates } from './stage-states.ts';
import { Assignments } from './assignments.ts';
import { Admission } from './admission.ts';
import type { AccessRules, PendingJoin } from './admission.ts';
import { Placement } from './placement.ts';
import { Screens } from './screening.ts';
import { OptimizerStep } from './step.ts';
import { CoordinatorReferee, stageVerifier } from './referee.ts';
import type { Verifier } from './verify.ts';
import type { StageRange } from './planner.ts';
import { createBackend } from '../engine/backends/registry.ts';
import type { Backend } from '../engine/backend.ts';
import type { RunData, StepContext } from './step.ts';
import { serveRun } from './serving.ts';
import { CoordinatorStoppedError } from './wait.ts';
import { reachabilityOf, withReachability } from '../protocol/nat.ts';

export type { MicroBatch } from '../engine/train/step-plan.ts';
export type { RunEvent } from './status.ts';
export type { RunData } from './step.ts';

export interface CoordinatorOptions {
  node: SwarmNode;
  store: RunStore;
  blobs: BlobStore;
  runId: string;
  modelName: string;
  llama: LlamaConfig;
  modelConfigJson: string;
  weights: WeightSource;
  train: TrainConfig;
  lora: LoraConfig;
  data: RunData;
  memory: StageMemoryFn;
  minPeers: number;
  pipelineStages?: number;
  wireCodec: FloatCodec;
  token: string | null;
  /** private runs: peer ids admitted (with the token too, when both are set); null = no allowlist */
  allowPeers?: Set<string> | null;
  /** a private run's adapter may still be pulled by anyone */
  publicPull?: boolean;
  /** initial LoRA tensors (--init-adapter), by PEFT name */
  initAdapter: Map<string, NamedTensor> | null;
  /** the last committed step to resume from (coordinator restart), with its adapter and the latest
   *  optimizer checkpoint (step `checkpointStep` ≤ step; for stages no volunteer kept) */
  resume: { step: number; adapter: Map<string, NamedTensor>; optimizerStates: Uint8Array[] | null; checkpointStep: number | null } | null;
  /** the run's JSON events (`launch --json` prints them) */
  emit: (e: RunEvent) => void;
  /** the human-readable log */
  log: (msg: string) => void;
  /** timeouts and policy (default: coordinatorConfig(), from the defaults and the environment knobs) */
  config?: CoordinatorConfig;
  /** debug lines, one per request, under swarmtune:coordinator:* (default silent) */
  logger?: Logger;
  /** the committed steps so far (a relaunch): status and the dashboard show them */
  history?: StepRecord[];
  /** the run finished before this process started: serve status and pulls only, plan nothing */
  alreadyFinished?: boolean;
  /** the run's stored config, one line, for status */
  runConfig?: string;
  /** after each committed step (checkpoint dirs, pruning under save_total_limit); a failure fails the run */
  afterCommit?: (step: number, signal: AbortSignal) => Promise<void>;
  /** the backend the coordinator referees spot checks on (default: the native CPU backend, if
   *  registered; null: it does not referee) */
  refereeBackend?: () => Promise<Backend | null>;
}

export class Coordinator {
  private readonly o: CoordinatorOptions;
  private readonly config: CoordinatorConfig;
  private readonly logger: Logger;
  /** the one stop: every loop, wait and request of the run takes this signal */
  private readonly abort = new AbortController();
  private readonly status: RunStatus;
  private readonly client: StagePeerClient;
  private readonly peers: PeerRegistry;
  private readonly adapter: AdapterState;
  private readonly shards: ShardBlobs;
  private readonly states: StageStates;
  private readonly access: AccessRules;
  private readonly admission: Admission;
  private readonly placement: Placement;
  /** the referee's end of hop streams (a receiver's bad-tensor report is checked here) */
  private readonly hops: HopInbox;
  private loop: Promise<void> | null = null;
  private referee: CoordinatorReferee | null = null;
  private finishedResolve!: () => void;
  readonly finished: Promise<void> = new Promise((r) => { this.finishedResolve = r; });

  constructor(o: CoordinatorOptions) {
    this.o = o;
    const config = this.config = o.config ?? coordinatorConfig();
    this.logger = o.logger ?? silentLogger;
    const status = this.status = new RunStatus({
      runId: o.runId, modelName: o.modelName, totalSteps: o.data.totalSteps, minPeers: o.minPeers,
      step: o.resume?.step ?? 0, eventHistory: config.eventHistory, emit: o.emit, log: o.log, runConfig: o.runConfig,
    });
    if (o.history !== undefined) status.history.push(...o.history);
    this.client = new StagePeerClient({ node: o.node, runId: o.runId, timeouts: config });
    this.hops = new HopInbox({ log: this.logger.child('referee') });
    const peers = this.peers = new PeerRegistry({
      runId: o.runId, client: this.clientFor('peers'), config, status, store: o.store, signal: this.abort.signal,
      reachability: (id) => reachabilityOf(o.node, id),
    });
    const adapter = this.adapter = new AdapterState(o.resume !== null ? o.resume.adapter : o.initAdapter, { llama: o.llama, lora: o.lora, seed: o.train.seed });
    const shards = this.shards = new ShardBlobs({ node: o.node, blobs: o.blobs, weights: o.weights, llama: o.llama, maxProviders: config.maxProviders, log: o.log });
    const states = this.states = new StageStates({
      client: this.clientFor('placement'), peers, store: o.store, status, adapter, train: o.train, totalSteps: o.data.totalSteps,
      checkpointEveryStepMaxBytes: config.checkpointEveryStepMaxBytes, resumeStates: o.resume?.optimizerStates ?? null,
    });
    const access = this.access = { token: o.token, allowPeers: o.allowPeers ?? null };
    const assignments = new Assignments({
      runId: o.runId, modelConfigJson: o.modelConfigJson, lora: o.lora, train: o.train, wireCodec: o.wireCodec,
      totalSteps: o.data.totalSteps, allowPeers: access.allowPeers, peers, shards, adapter, states, status,
    });
    this.admission = new Admission({
      access, minPeers: o.minPeers, peers, status,
      planned: () => this.placement.stages !== null,
      onQuorum: (joined) => this.plan(joined),
    });
    if (o.alreadyFinished === true) {
      status.state = 'finished';
      this.finishedResolve();
    }
    this.placement = new Placement({
      runId: o.runId, numLayers: o.llama.numHiddenLayers, memory: o.memory, pipelineStages: o.pipelineStages,
      resume: o.resume, config, client: this.clientFor('placement'), peers, admission: this.admission, assignments, adapter, states, status, store: o.store,
    });
  }

  /** Delete the adapter and optimizer-state blobs made for assignments before `step` (every peer given
   *  one has loaded it: placement waits for that before the step loop goes on). */
  pruneBlobsBefore(step: number): Promise<number> { return this.shards.pruneStepBlobs(step); }

  /** peers serving a stage now (for the progress line) */
  /** An admitted peer, not banned: who may hold a reservation on this coordinator's relay (NAT traversal). */
  isMember(peerId: string): boolean { const p = this.peers.get(peerId); return p !== undefined && p.health !== 'banned'; }

  livePeers(): number { return this.peers.all().filter((p) => p.stageIndex !== null && p.health !== 'dead' && p.health !== 'banned').length; }

  /** The stage-peer client whose request lines go to swarmtune:coordinator:<component>. */
  private clientFor(component: string): StagePeerClient {
    return this.client.withLog(this.logger.child(component));
  }

  /** Quantize the base model once into content-addressed shard blobs and keep their refs; resolves
   *  with the weights' content hash (sha256 over the blobs' sha256s). */
  async publishShards(cache?: { file: string; key: string }): Promise<string> {
    await this.shards.publish(cache);
    return this.shards.contentHash();
  }

  async start(): Promise<void> {
    await this.peers.restoreBans();
    await serveRun({
      node: this.o.node, blobs: this.o.blobs, store: this.o.store, access: this.access,
      publicPull: this.o.publicPull === true, lora: this.o.lora, modelName: this.o.modelName,
      onJoin: (req, peerId) => this.admission.onJoin(req, peerId),
      status: () => this.status.response(this.view()),
      committedStep: () => this.status.step,
      onViolation: (peerId, proto, err) => this.peers.countViolation(peerId, proto, err),
      log: this.logger.child('serving'),
    }, { signal: this.abort.signal });
    await this.hops.register(this.o.node);
    void this.peers.runHeartbeats(() => this.status.state !== 'finished' && this.status.state !== 'failed');
  }

  /** Stop now: every loop, wait and request of the run is aborted (nothing is sent to the peers), waiting
   *  joiners are refused; when this returns the planning and the step loop have ended and the bans are
   *  on disk. */
  async stop(): Promise<void> {
    this.abort.abort(new CoordinatorStoppedError('the coordinator is stopping'));
    this.admission.rejectAll('the coordinator is shutting down');
    await this.loop;
    await this.peers.flushBans();
    this.referee?.dispose();
  }

  /** The registry's ban path, reachable on the coordinator itself because tests/swarm-private.test.ts
   *  bans through it to check that bans are durable. */
  private ban(p: PeerState, why: string): void { this.peers.ban(p, why); }

  /** minPeers have joined: plan the stages over them, then train (stop() waits for both). */
  private plan(joined: PendingJoin[]): void {
    const signal = this.abort.signal;
    this.loop = this.placement.plan(joined)
      .then((planned) => (planned && !signal.aborted ? this.train(signal) : undefined))
      .catch((e: Error) => { if (!signal.aborted) this.fail(e); });
  }

  private async train(signal: AbortSignal): Promise<void> {
    const o = this.o, t = o.train, total = o.data.totalSteps;
    const stages = this.placement.stages!;
    await this.placement.waitReady(signal);
    await this.captureInitialAdapter(signal);
    this.status.state = 'training';
    o.emit({ event: 'training', step: this.status.step, total_steps: total });
    const warmup = warmupStepsFor(total, t.warmup_steps, t.warmup_ratio);
    const verifier = await this.verifier(stages);
    const ctx: StepContext = {
      hiddenSize: o.llama.hiddenSize, seed: t.seed, maxGradNorm: t.max_grad_norm, config: this.config,
      client: this.clientFor('step'), peers: this.peers, screens: new Screens(this.config), adapter: this.adapter, states: this.states,
      store: o.store, status: this.status, data: o.data, stages, cover: (s) => this.placement.coverLostStages(s),
      hops: this.hops, coordinatorId: o.node.peerId.toString(), node: o.node, verifier,
    };
    while (this.status.step < total) {
      // at a step boundary: a stage that lost every replica is covered first, then late joiners placed
      await this.placement.coverLostStages(signal);
      await this.placement.admitLateJoiners(signal);
      const step = this.status.step;
      await OptimizerStep.run(ctx, step, learningRateAt(t.learning_rate, t.lr_scheduler_type, step, warmup, total), { signal });
      await o.afterCommit?.(this.status.step, signal);
    }
    await this.finish(signal);
  }

  /** The spot checks of verify_fraction (none at 0): replicas recompute, and the coordinator referees
   *  with a stage of its own on the CPU backend when it has one. */
  private async verifier(stages: readonly StageRange[]): Promise<Verifier | undefined> {
    const o = this.o, t = o.train;
    if (!(t.verify_fraction > 0)) return undefined;
    const referee = this.referee ??= new CoordinatorReferee({
      weights: o.weights, llama: o.llama, lora: o.lora, seed: t.seed, gradientCheckpointing: t.gradient_checkpointing,
      adapter: this.adapter, codec: o.wireCodec, backend: o.refereeBackend ?? (() => createBackend('cpu', { note: () => undefined })),
    });
    const ready = await referee.available();
    this.status.event('plan', `verifying ${(t.verify_fraction * 100).toFixed(1)}% of micro-batches (recomputed by another replica; ${ready ? 'the coordinator referees on its CPU backend' : 'the coordinator has no backend to referee: a 1-vs-1 disagreement runs the micro-batch again'})`);
    return stageVerifier({ fraction: t.verify_fraction, secret: randomBytes(16).toString('hex'), codec: o.wireCodec, peers: this.peers, stages, referee, refereeReady: ready });
  }

  /** Ask one replica per stage for its initial LoRA tensors so step 0 is pullable and the
   *  coordinator knows each stage's parameter order. */
  private async captureInitialAdapter(signal: AbortSignal): Promise<void> {
    const client = this.clientFor('placement');
    for (let s = 0; s < this.placement.stages!.length; s++) {
      // the upload must be the stage's own tensors and hash to the adapter the stage was loaded with
      // (the held one, else the seeded init); a replica whose upload is refused is banned
      for (;;) {
        await this.placement.coverLostStages(signal);
        const id = this.peers.liveReplicas(s)[0];
        if (id === undefined) throw new SwarmError(`stage ${s} has no live peer left to upload its initial adapter (its volunteers were dropped and no other peer could take the stage)`);
        try { await this.adapter.upload(client, id, this.peers.addrs(id), s, { signal, digest: this.adapter.initialDigest(s) ?? undefined }); break; } catch (e) {
          await this.peers.dropAfterFailure(id, e as Error, 'it failed to upload its initial adapter', signal);
        }
      }
    }
    if (this.status.step === 0) await this.o.store.putInitialAdapter(this.adapter.bytes());
  }

  private async finish(signal: AbortSignal): Promise<void> {
    this.status.state = 'finished';
    this.admission.rejectAll('the run finished before this peer could be placed', 'late');
    this.status.event('finish', `run finished after ${this.status.step} steps`);
    await this.peers.heartbeatNow();
    const client = this.clientFor('peers');
    await Promise.allSettled(this.peers.all().filter((p) => p.stageIndex !== null && p.health !== 'dead').map((p) =>
      client.finish(p.addrs, 'the run finished', undefined, { signal })));
    this.finishedResolve();
  }

  private fail(e: Error): void {
    this.status.state = 'failed';
    this.status.event('error', `run failed: ${e.name}: ${e.message}`);
    this.o.emit({ event: 'error', message: e.message });
    this.finishedResolve();
  }

  get runState(): DashboardState['state'] { return this.status.state; }
  get committedStep(): number { return this.status.step; }
  /** the latest adapter tensors in stage order (for writing the PEFT dir) */
  currentAdapter(): NamedTensor[] { return this.adapter.ordered(); }

  private view(): RunView {
    const stages = this.placement.stages ?? [];
    return { stages, replicas: this.peers.allReplicas(), peers: withReachability(this.o.node, this.peers.statuses(stages)) };
  }

  dashboardState(): DashboardState {
    return this.status.dashboard(this.view());
  }
}
