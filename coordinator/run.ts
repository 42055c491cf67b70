// The run: admission, planning, routing micro-batches through stage peers, step aggregation,
// atomic commits to LevelDB, heartbeats, and serving status/pull/blobs.
import { readFile, writeFile } from 'node:fs/promises';
import type { LlamaConfig, LoraConfig, NamedTensor, WeightSource } from '../engine/types.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import { learningRateAt, warmupStepsFor } from '../engine/train/schedule.ts';
import { dropoutSeedFor } from '../engine/train/data.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { request, serve, parseMultiaddr } from '../protocol/net.ts';
import type { Multiaddr } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { encodeShard, decodeShard, shardKindOf, shardTensorNames, stageShardNames } from '../engine/formats/shard.ts';
import type { ShardTensors } from '../engine/formats/shard.ts';
import type {
  Assignment, BlobRef, Capabilities, JoinRequest, JoinResponse, StatusResponse, AdapterResponse,
} from '../protocol/messages.ts';
import { decodeFloat, encodeTensor } from '../protocol/tensor.ts';
import type { FloatCodec, WireTensor } from '../protocol/tensor.ts';
import { AuthError, StaleError, SwarmError } from '../protocol/errors.ts';
import {
  COMPUTE_TIMEOUT_MS, CONTROL_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS, HEARTBEAT_TIMEOUT_MS,
} from '../protocol/constants.ts';
import { planStages, MAX_IN_FLIGHT_PER_ROUTE } from './planner.ts';
import type { Plan, StageMemoryFn } from './planner.ts';
import { clipInPlace, globalGradNorm, sumReplicas } from './aggregate.ts';
import type { RunStore, StepRecord } from './store.ts';
import type { DashboardEvent, DashboardState, PeerHealth } from './dashboard/state.ts';
import { placeResumed } from './resume.ts';
import type { KeptOffer, ResumePlacement } from './resume.ts';
import { crashPoint } from './crash.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import { BanList, banBaseMsFromEnv, inWords } from './bans.ts';

/** One micro-batch as the data pipeline hands it over (labels already shifted, -100 ignored). */
export interface MicroBatch { ids: Int32Array; labels: Int32Array; batch: number; seqLen: number }

export interface RunData {
  totalSteps: number;
  /** the micro-batches of optimizer step `step` (0-based), in order */
  microBatchesForStep(step: number): Promise<MicroBatch[]>;
  /** data cursor after `step` steps (for the commit record) */
  cursorAfter(step: number): number;
}

export type RunEvent = Record<string, unknown> & { event: string };

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
  emit: (e: RunEvent) => void;
  log: (msg: string) => void;
}

interface PeerState {
  peerId: string;
  caps: Capabilities;
  addrs: Multiaddr[];
  stageIndex: number | null;
  health: PeerHealth;
  ready: boolean;
  lastSeenMs: number;
  tokensPerSecond: number;
  failures: number;
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
}

interface PendingJoin { peerId: string; resolve: (r: JoinResponse) => void }

/** failures of one micro-batch at peers that stayed up (a dropped peer's failures do not count) */
const MAX_ATTEMPTS = 4;

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

/** a peer whose compute requests time out this many times is marked slow and deprioritised */
const SLOW_AFTER_TIMEOUTS = 2;
/** how long a slow peer stays deprioritised (routes use it only when its stage has no other replica) */
const SLOW_PENALTY_MS = 5 * 60_000;
/** checkpoint the optimizer state at every step while each stage's state is at most this big */
export const CHECKPOINT_EVERY_STEP_MAX_BYTES = 64 * 1024 * 1024;
/** recent activation / activation-gradient RMS values kept per stage for screening */
const OUTPUT_HISTORY = 64;

/** Compute-request timeout: COMPUTE_TIMEOUT_MS, or SWARMTUNE_COMPUTE_TIMEOUT_MS (operators, tests). */
export function computeTimeoutMs(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.SWARMTUNE_COMPUTE_TIMEOUT_MS;
  if (v === undefined || v === '') return COMPUTE_TIMEOUT_MS;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 100 || n > 24 * 3_600_000) throw new SwarmError(`SWARMTUNE_COMPUTE_TIMEOUT_MS must be an integer number of ms in [100, 86400000], got "${v}"`);
  return n;
}

/** A peer returned an activation or activation gradient that is non-finite, misshapen or absurd. */
class BadOutputError extends SwarmError {
  override name = 'BadOutputError';
}
/** a replica whose per-micro-batch gradient norm exceeds this multiple of the median is banned */
const SCREEN_FACTOR = 50;

function median(xs: number[]): number | null {
  if (xs.length === 0) return null;
  const v = [...xs].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 === 1 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
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
/** gradient/adapter pages stay far below the frame cap */
const PAGE_BYTES = 32 * 1024 * 1024;

function pages(sizes: number[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let from = 0;
  while (from < sizes.length) {
    let bytes = 0, count = 0;
    while (from + count < sizes.length && (count === 0 || bytes + sizes[from + count]! * 4 <= PAGE_BYTES)) {
      bytes += sizes[from + count]! * 4;
      count++;
    }
    out.push([from, count]);
    from += count;
  }
  return out;
}

export class Coordinator {
  private readonly o: CoordinatorOptions;
  private state: DashboardState['state'] = 'waiting';
  private readonly peers = new Map<string, PeerState>();
  private pending: PendingJoin[] = [];
  /** peers that joined after planning, admitted at the next step boundary */
  private late: PendingJoin[] = [];
  private plan: Plan | null = null;
  private shardRefs = new Map<string, { sha256: string; sizeBytes: number }>();
  /** stage index → LoRA tensor names/shapes in stage param order (learned from the first upload) */
  private adapter = new Map<string, NamedTensor>();
  private stageParamNames: string[][] = [];
  private step = 0;
  private history: StepRecord[] = [];
  private events: DashboardEvent[] = [];
  private retries = 0;
  private reassignments = 0;
  private bans = 0;
  private tokensTotal = 0;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private finishedResolve!: () => void;
  readonly finished: Promise<void> = new Promise((r) => { this.finishedResolve = r; });
  private stopping = false;
  private resumeStates: Uint8Array[] | null = null;
  /** per stage: recent accepted per-micro-batch gradient norms of replicas (screening reference) */
  private normHistory: number[][] = [];
  private readonly banList = new BanList(banBaseMsFromEnv());
  private banWrite: Promise<void> = Promise.resolve();
  private readonly computeTimeout = computeTimeoutMs();
  /** why the run is stalled right now (a stage without a peer), for status */
  private waitingFor: string | null = null;
  /** per stage: recent RMS of accepted activations ('act') and activation gradients ('grad') it sent */
  private outputRms = new Map<string, number[]>();
  /** per stage: size of its optimizer state at the last checkpoint */
  private stateBytes: number[] = [];
  /** the last checkpoint written only because of the every-step policy (deleted by the next one) */
  private prunable: { step: number; stages: number } | null = null;
  /** peers released from a stage to take another one (rebalance), by the stage they are meant for */
  private moving = new Map<string, number>();

  constructor(o: CoordinatorOptions) {
    this.o = o;
    if (o.resume !== null) {
      this.step = o.resume.step;
      this.adapter = o.resume.adapter;
      this.resumeStates = o.resume.optimizerStates;
    } else if (o.initAdapter !== null) {
      this.adapter = o.initAdapter;
    }
  }

  private event(kind: DashboardEvent['kind'], message: string): void {
    this.events.push({ timeMs: Date.now(), kind, message });
    if (this.events.length > 200) this.events.shift();
    this.o.log(message);
  }

  /** Quantize the base model once into content-addressed shard blobs and keep their refs. */
  async publishShards(cache?: { file: string; key: string }): Promise<void> {
    const cfg = this.o.llama;
    const names = ['embed', ...Array.from({ length: cfg.numHiddenLayers }, (_, l) => `layer.${l}`), 'head'];
    if (cache !== undefined) {
      // the same model files were quantized before: re-verify those blobs instead of quantizing again
      try {
        const m = JSON.parse(await readFile(cache.file, 'utf8')) as { key: string; refs: Record<string, { sha256: string; sizeBytes: number }> };
        if (m.key === cache.key && names.every((n) => m.refs[n] !== undefined)) {
          let ok = true;
          for (const n of names) ok &&= (await this.o.blobs.readCached({ name: n, sha256: m.refs[n]!.sha256 })) !== null;
          if (ok) {
            for (const n of names) this.shardRefs.set(n, m.refs[n]!);
            this.o.log(`reusing ${names.length} verified shard blobs quantized earlier from the same model files`);
            return;
          }
        }
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') this.o.log(`ignoring unreadable shard manifest ${cache.file}: ${(e as Error).message}`);
      }
    }
    for (const name of names) {
      const spec = shardTensorNames(cfg, shardKindOf(name));
      const t: ShardTensors = { nf4: new Map(), float: new Map() };
      for (const n of spec.nf4) t.nf4.set(n, await this.o.weights.getNF4(n));
      for (const n of [...spec.float, ...spec.optionalFloat.filter((x) => this.o.weights.has(x))]) {
        const data = await this.o.weights.getFloat(n);
        t.float.set(n, { shape: [data.length], data });
      }
      const bytes = encodeShard(t);
      const sha256 = await this.o.blobs.put(bytes);
      this.shardRefs.set(name, { sha256, sizeBytes: bytes.length });
    }
    this.o.log(`published ${names.length} shard blobs`);
    if (cache !== undefined) await writeFile(cache.file, JSON.stringify({ key: cache.key, refs: Object.fromEntries(this.shardRefs) }));
  }

  private providers(): string[] {
    return this.o.node.getMultiaddrs().map((m) => m.toString());
  }

  private blobRef(name: string, ref: { sha256: string; sizeBytes: number }, extraProviders: string[] = []): BlobRef {
    return { name, sha256: ref.sha256, sizeBytes: ref.sizeBytes, providers: [...extraProviders, ...this.providers()].slice(-64) };
  }

  async start(): Promise<void> {
    // bans outlive a coordinator restart (the run's LevelDB keeps them)
    const saved = await this.o.store.getBans();
    if (saved !== null) this.banList.restore(saved);
    const n = this.o.node;
    const onViolation = (peerId: string, proto: string, err: Error) => {
      if (err.name === 'SchemaError' || err.name === 'DecodeError' || err.name === 'FrameTooLargeError' || err.name === 'TensorError') {
        const p = this.peers.get(peerId);
        if (p !== undefined) p.failures++;
        this.o.log(`peer ${peerId} sent a bad ${proto} request: ${err.name}: ${err.message}`);
      }
    };
    await serve(n, 'join', (req, ctx) => this.onJoin(req, ctx.peerId), onViolation);
    await serve(n, 'weights', (req, ctx) => { this.authorize(ctx.peerId, req.token, 'weights'); return this.o.blobs.serveChunk(req); }, onViolation);
    await serve(n, 'status', async () => this.statusResponse(), onViolation);
    await serve(n, 'adapter', (req, ctx) => {
      if (this.o.publicPull !== true) this.authorize(ctx.peerId, req.token, 'pull');
      return this.onPull(req.step, req.from, req.count);
    }, onViolation);
    this.heartbeatTimer = setInterval(() => { void this.heartbeatAll(); }, HEARTBEAT_INTERVAL_MS);
    this.heartbeatTimer.unref();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    for (const p of [...this.pending, ...this.late]) p.resolve({ status: 'rejected', reason: 'the coordinator is shutting down', assignment: null });
    this.pending = [];
    this.late = [];
    await this.banWrite;
  }

  // ---- admission and planning

  /** A private run (join token and/or peer-id allowlist) admits only peers that satisfy both of
   *  what is set: to join, fetch blobs or pull (unless pulls are public). */
  private authorize(peerId: string, token: string | undefined, what: string): void {
    if (this.o.token !== null && token !== this.o.token) {
      throw new AuthError(what === 'join' ? 'this run is private: a valid --token is required to join' : `${what}: this run is private: a valid --token is required`);
    }
    const allow = this.o.allowPeers ?? null;
    if (allow !== null && !allow.has(peerId)) throw new AuthError(`${what}: this run is private: peer ${peerId} is not on its allowlist`);
  }

  private async onJoin(req: JoinRequest, peerId: string): Promise<JoinResponse> {
    this.authorize(peerId, req.token ?? undefined, 'join');
    if (this.state === 'finished' || this.state === 'failed') return { status: 'rejected', reason: `the run is ${this.state}`, assignment: null };
    const refusal = this.banList.refusal(peerId);
    if (refusal !== null) {
      this.o.log(`refused a join of banned peer ${peerId}: ${refusal}`);
      return { status: 'rejected', reason: refusal, assignment: null };
    }
    const addrs = req.listenAddrs.map((a) => parseMultiaddr(a.includes('/p2p/') ? a : `${a}/p2p/${peerId}`));
    const known = this.peers.get(peerId);
    if (known !== undefined && this.plan !== null) {
      // a volunteer that restarted mid-run lost its stage: its old self is gone (micro-batches it held
      // are re-run), and it joins again like any late joiner (so does a peer released from its stage
      // to take another one, or one whose ban ended)
      if (known.health !== 'spare' && known.health !== 'banned') this.markDead(known, 'it joined again (restarted)');
      else known.health = 'spare';
      for (const r of this.plan.replicas) { const i = r.indexOf(peerId); if (i >= 0) r.splice(i, 1); }
      Object.assign(known, { caps: req.capabilities, addrs, stageIndex: null, ready: false, lastSeenMs: Date.now(), tokensPerSecond: 0, kept: req.kept });
    } else {
      this.peers.set(peerId, {
        peerId, caps: req.capabilities, addrs, stageIndex: null, health: 'spare', ready: false,
        lastSeenMs: Date.now(), tokensPerSecond: 0, failures: 0, microBatches: 0, kept: req.kept,
      });
    }
    if (this.plan !== null) {
      // a late joiner: placed at the next step boundary where throughput is lowest
      this.event('join', `late peer ${peerId} joined: ${req.capabilities.deviceName}, ${(req.capabilities.memoryBytes / 2 ** 30).toFixed(2)} GiB offered; placing it at the next step boundary`);
      return new Promise<JoinResponse>((resolve) => { this.late.push({ peerId, resolve }); });
    }
    this.event('join', `peer ${peerId} joined: ${req.capabilities.deviceName}, ${(req.capabilities.memoryBytes / 2 ** 30).toFixed(2)} GiB offered, ${req.capabilities.gemmGflops.toFixed(1)} GFLOP/s`);
    const answer = new Promise<JoinResponse>((resolve) => {
      this.pending = this.pending.filter((p) => p.peerId !== peerId);
      this.pending.push({ peerId, resolve });
    });
    this.o.emit({ event: 'peer_joined', peer_id: peerId, peers: this.pending.length, min_peers: this.o.minPeers });
    if (this.pending.length >= this.o.minPeers) void this.makePlan().catch((e: Error) => this.fail(e));
    return answer;
  }

  private async makePlan(): Promise<void> {
    const joined = this.pending;
    this.pending = [];
    let plan: Plan;
    try {
      plan = planStages(this.o.llama.numHiddenLayers,
        joined.map((j) => { const p = this.peers.get(j.peerId)!; return { peerId: p.peerId, memoryBytes: p.caps.memoryBytes, gemmGflops: p.caps.gemmGflops }; }),
        this.o.memory, this.o.pipelineStages);
    } catch (e) {
      // nobody fits a stage: tell every waiting peer why, and keep waiting for bigger ones
      for (const j of joined) { j.resolve({ status: 'rejected', reason: (e as Error).message, assignment: null }); this.peers.delete(j.peerId); }
      this.event('error', `planning failed: ${(e as Error).message}`);
      return;
    }
    this.plan = plan;
    this.stageParamNames = plan.stages.map(() => []);
    const resumed = this.o.resume !== null ? this.placeResumed(plan) : null;
    for (const j of joined) {
      const reason = plan.rejected.get(j.peerId);
      if (reason !== undefined) {
        j.resolve({ status: 'rejected', reason, assignment: null });
        this.peers.delete(j.peerId);
        this.event('plan', `peer ${j.peerId} rejected: ${reason}`);
        continue;
      }
      // after a restart, a peer whose stage another peer kept joins at the first step boundary,
      // with that peer's optimizer state
      if (resumed !== null && resumed.deferred.includes(j.peerId)) { this.late.push(j); continue; }
      const s = plan.replicas.findIndex((r) => r.includes(j.peerId));
      const p = this.peers.get(j.peerId)!;
      p.stageIndex = s;
      p.health = 'ok';
      const keep = resumed !== null && resumed.keep.has(j.peerId) ? this.stageDigest(s) : undefined;
      j.resolve({ status: 'assigned', reason: null, assignment: await this.assignmentFor(j.peerId, s, undefined, keep) });
    }
    const meta = await this.o.store.getMeta();
    if (meta !== null) await this.o.store.putMeta({ ...meta, numStages: plan.stages.length, stages: plan.stages });
    const desc = plan.stages.map((st, i) => `stage ${i} layers [${st.layerStart}, ${st.layerEnd}) on ${plan.replicas[i]!.length} peer(s)`).join('; ');
    this.event('plan', `planned ${plan.stages.length} stage(s): ${desc}`);
    this.o.emit({ event: 'plan', stages: plan.stages.map((st, i) => ({ ...st, replicas: plan.replicas[i] })) });
    void this.train().catch((e: Error) => this.fail(e));
  }

  /** After a restart: volunteers that kept their stage at the committed step keep it; the rest load
   *  the committed adapter (coordinator/resume.ts). */
  private placeResumed(plan: Plan): ResumePlacement {
    const r = placeResumed({
      runId: this.o.runId, step: this.step, stages: plan.stages, planned: plan.replicas,
      stageDigests: plan.stages.map((_, s) => this.stageDigest(s)),
      offers: new Map([...this.peers.values()].map((p) => [p.peerId, p.kept])),
      memoryOf: (id) => this.peers.get(id)!.caps.memoryBytes,
      need: plan.stages.map((st) => this.o.memory(st.layerStart, st.layerEnd)),
    });
    plan.replicas = r.replicas;
    for (const n of r.notes) this.o.log(`resume: ${n}`);
    for (const [id, s] of r.keep) this.event('plan', `resume: peer ${id} keeps stage ${s} at the committed step ${this.step} (adapter verified by sha256)`);
    const c = this.o.resume!.checkpointStep;
    for (const s of r.stagesWithoutState) {
      this.event('checkpoint', `resume: no peer kept stage ${s} at step ${this.step}; it loads the committed adapter of step ${this.step} and ` + (
        c === this.step ? `the optimizer checkpoint of step ${c} (exact)`
          : c !== null ? `the optimizer checkpoint of step ${c} (the moments miss steps ${c + 1}..${this.step}; no step is redone)`
            : 'fresh optimizer moments (no checkpoint was written; no step is redone)'));
    }
    this.o.emit({
      event: 'resume_plan', step: this.step, kept: Object.fromEntries(r.keep), deferred: r.deferred,
      stages_from_checkpoint: r.stagesWithoutState, checkpoint_step: c,
    });
    return r;
  }

  /** this stage's slice of the current adapter */
  private stageAdapter(s: number): NamedTensor[] {
    const st = this.plan!.stages[s]!;
    return [...this.adapter.values()].filter((t) => {
      const m = /\.layers\.(\d+)\./.exec(t.name);
      return m !== null && Number(m[1]) >= st.layerStart && Number(m[1]) < st.layerEnd;
    });
  }

  private stageDigest(s: number): string {
    return adapterDigest(this.stageAdapter(s));
  }

  /** `keep`: the peer keeps the stage state it offered, restored to this step, whose adapter digest this is. */
  private async assignmentFor(peerId: string, s: number, optimizerState?: Uint8Array | null, keep?: string): Promise<Assignment> {
    const plan = this.plan!;
    const st = plan.stages[s]!;
    const cfg = this.o.llama;
    const t = this.o.train;
    // peers that already serve this stage's blobs go first, so a late joiner does not load the coordinator
    const holders = (plan.replicas[s] ?? []).filter((id) => id !== peerId && this.peers.get(id)?.ready === true && this.peers.get(id)?.health !== 'dead')
      .flatMap((id) => this.peers.get(id)!.addrs.map((a) => a.toString()));
    const stageBlobs = stageShardNames(cfg, st.layerStart, st.layerEnd).map((n) => this.blobRef(n, this.shardRefs.get(n)!, holders));
    // the stage's slice of the current adapter (init adapter or resumed step), as a blob
    let adapterBlob: BlobRef | null = null;
    const mine = keep !== undefined ? [] : this.stageAdapter(s);
    if (mine.length > 0) {
      const bytes = encodeShard({ nf4: new Map(), float: new Map(mine.map((x) => [x.name, { shape: x.shape, data: x.data }])) });
      const sha256 = await this.o.blobs.put(bytes);
      adapterBlob = this.blobRef(`adapter.stage${s}.step${this.step}`, { sha256, sizeBytes: bytes.length });
    }
    return {
      runId: this.o.runId, peerId, stageIndex: s, numStages: plan.stages.length,
      layerStart: st.layerStart, layerEnd: st.layerEnd,
      modelConfigJson: this.o.modelConfigJson,
      lora: {
        r: this.o.lora.r, loraAlpha: this.o.lora.loraAlpha, loraDropout: this.o.lora.loraDropout,
        targetModules: [...this.o.lora.targetModules], useRslora: this.o.lora.useRslora,
        initLoraWeights: this.o.lora.initLoraWeights === 'gaussian' ? 'gaussian' : 'kaiming',
      },
      optim: {
        optim: t.optim, adamBeta1: t.adam_beta1, adamBeta2: t.adam_beta2, adamEpsilon: t.adam_epsilon,
        weightDecay: t.weight_decay, residentBytes: t.optim_resident_bytes ?? 0,
      },
      seed: t.seed, gradientCheckpointing: t.gradient_checkpointing, wireCodec: this.o.wireCodec,
      blobs: stageBlobs, adapterBlob,
      optimizerBlob: keep !== undefined ? null : optimizerState !== undefined ? await this.stateBlob(s, optimizerState) : await this.optimizerBlobFor(s),
      step: this.step, totalSteps: this.o.data.totalSteps,
      ...(keep !== undefined ? { keep: { adapterSha256: keep } } : {}),
      ...(this.o.allowPeers !== null && this.o.allowPeers !== undefined ? { allowPeers: [...this.o.allowPeers] } : {}),
    };
  }

  private async optimizerBlobFor(s: number): Promise<BlobRef | null> {
    return this.stateBlob(s, this.resumeStates?.[s] ?? null);
  }

  private async stateBlob(s: number, bytes: Uint8Array | null): Promise<BlobRef | null> {
    if (bytes === null) return null;
    const sha256 = await this.o.blobs.put(bytes);
    return this.blobRef(`optimizer.stage${s}.step${this.step}`, { sha256, sizeBytes: bytes.length });
  }

  /** At a step boundary: give each late joiner the fitting stage with the lowest throughput, with that
   *  stage's current adapter and optimizer state, and add it to the stage's replicas once loaded. */
  private async admitLateJoiners(): Promise<void> {
    const late = this.late;
    this.late = [];
    const plan = this.plan!;
    for (const j of late) {
      const p = this.peers.get(j.peerId);
      if (p === undefined) continue;
      const need = plan.stages.map((st) => this.o.memory(st.layerStart, st.layerEnd));
      const fits = plan.stages.map((_, s) => s).filter((s) => need[s]! <= p.caps.memoryBytes && this.liveReplicas(s).length > 0);
      if (fits.length === 0) {
        const reason = `this peer offers ${(p.caps.memoryBytes / 2 ** 30).toFixed(2)} GiB but the smallest stage of this run needs ${(Math.min(...need) / 2 ** 30).toFixed(2)} GiB`;
        j.resolve({ status: 'rejected', reason, assignment: null });
        this.peers.delete(j.peerId);
        this.event('plan', `late peer ${j.peerId} rejected: ${reason}`);
        continue;
      }
      const speed = (s: number) => this.liveReplicas(s).reduce((a, id) => a + (this.peers.get(id)?.tokensPerSecond ?? 0), 0);
      const s = fits.reduce((best, x) => (speed(x) < speed(best) || (speed(x) === speed(best) && this.liveReplicas(x).length < this.liveReplicas(best).length) ? x : best));
      await this.placeOn(j, s, 'late');
    }
  }

  // ---- heartbeats

  private async heartbeatAll(): Promise<void> {
    // a finished run has released its peers: their last health stays what it was
    if (this.stopping || this.state === 'finished' || this.state === 'failed') return;
    await Promise.all([...this.peers.values()].filter((p) => p.stageIndex !== null && p.health !== 'dead' && p.health !== 'banned').map(async (p) => {
      try {
        const r = await request(this.o.node, p.addrs, 'heartbeat', { runId: this.o.runId, step: this.step, sentAtMs: Date.now() }, { timeoutMs: HEARTBEAT_TIMEOUT_MS });
        p.lastSeenMs = Date.now();
        p.ready = r.ready;
        p.tokensPerSecond = r.tokensPerSecond;
        if (p.health === 'slow' && (p.slowUntilMs ?? 0) <= Date.now()) p.health = 'ok';
      } catch (e) {
        const silentMs = Date.now() - p.lastSeenMs;
        if (silentMs > HEARTBEAT_TIMEOUT_MS) this.markDead(p, `no heartbeat for ${silentMs} ms`);
        else { if (p.health === 'ok') this.o.log(`peer ${p.peerId} missed a heartbeat: ${(e as Error).message}`); p.health = 'slow'; }
      }
    }));
  }

  /** After a failed request: a peer that does not answer a short heartbeat is dropped from routes
   *  at once (waiting for the 5 s heartbeat timeout would burn the micro-batch's retries); a peer
   *  that answered with a protocol violation has it counted against it. */
  private async checkPeer(peerId: string, cause: Error): Promise<void> {
    const p = this.peers.get(peerId);
    if (p === undefined || p.health === 'dead') return;
    if (['SchemaError', 'TensorError', 'DecodeError', 'FrameTooLargeError'].includes(cause.name)) p.failures++;
    try {
      const hb = await request(this.o.node, p.addrs, 'heartbeat', { runId: this.o.runId, step: this.step, sentAtMs: Date.now() }, { timeoutMs: 1500 });
      p.lastSeenMs = Date.now();
      // alive but without its stage (a restarted process): as good as gone for this run's routes
      if (!hb.ready || hb.runId !== this.o.runId) this.markDead(p, 'it answers but no longer holds its stage');
    } catch (e) {
      this.markDead(p, `failed a request (${cause.message}) and then a heartbeat (${(e as Error).message})`);
    }
  }

  private markDead(p: PeerState, why: string): void {
    // a banned peer is out of the routes already; its ban (what status shows) outlives its process
    if (p.health === 'dead' || p.health === 'banned') return;
    p.health = 'dead';
    this.event('drop', `peer ${p.peerId} (stage ${p.stageIndex}) dropped from routes: ${why}`);
    this.o.emit({ event: 'peer_dropped', peer_id: p.peerId, reason: why });
  }

  private liveReplicas(s: number): string[] {
    return this.plan!.replicas[s]!.filter((id) => !this.gone(id));
  }

  /** dropped (dead) or banned: out of every route */
  private gone(id: string): boolean {
    const h = this.peers.get(id)?.health;
    return h === 'dead' || h === 'banned';
  }

  /** Ban a peer with backoff (coordinator/bans.ts): out of every route now, its stage released; it
   *  is told to join again when the ban ends, and a join before then is refused. */
  private ban(p: PeerState, why: string): void {
    if (p.health === 'banned') return;
    const rec = this.banList.ban(p.peerId, why);
    // durable, so a restarted coordinator still refuses the peer (and doubles its next ban)
    this.banWrite = this.banWrite.then(() => this.o.store.putBans(this.banList.entries())).catch((e: Error) => this.o.log(`could not save bans: ${e.message}`));
    const stage = p.stageIndex;
    p.health = 'banned';
    p.failures++;
    p.ready = false;
    this.bans++;
    if (this.plan !== null) for (const r of this.plan.replicas) { const i = r.indexOf(p.peerId); if (i >= 0) r.splice(i, 1); }
    p.stageIndex = null;
    this.event('ban', `peer ${p.peerId} (stage ${stage}) banned from the run for ${inWords(rec.durationMs)} (ban ${rec.count}): ${why}`);
    this.o.emit({ event: 'peer_banned', peer_id: p.peerId, stage, reason: why, ban: rec.count, duration_ms: rec.durationMs });
    void request(this.o.node, p.addrs, 'finish', {
      runId: this.o.runId, reason: `banned for ${inWords(rec.durationMs)}: ${why}`.slice(0, 4000), rejoinAfterMs: rec.durationMs,
    }, { timeoutMs: 5000 }).catch(() => { /* it may be gone already */ });
  }

  /** replicas of stage s that routes should use: the live ones, without deprioritised slow peers
   *  unless the stage has nothing else */
  private routable(s: number): string[] {
    const live = this.liveReplicas(s);
    const now = Date.now();
    const fast = live.filter((id) => (this.peers.get(id)!.slowUntilMs ?? 0) <= now);
    return fast.length > 0 ? fast : live;
  }

  /** Decode an activation (gradient) a peer of stage s returned, before it is relayed: non-finite,
   *  misshapen, or with an RMS over SCREEN_FACTOR× the median of the stage's recent ones, it is refused
   *  (BadOutputError: the peer is banned and the micro-batch runs elsewhere). */
  private screenOutput(t: WireTensor, shape: number[], s: number, kind: 'act' | 'grad', what: string): void {
    let x: Float32Array;
    try {
      x = decodeFloat(t, what, shape);
    } catch (e) {
      throw new BadOutputError(`${(e as Error).message}`);
    }
    let ss = 0;
    for (let i = 0; i < x.length; i++) ss += x[i]! * x[i]!;
    const rms = Math.sqrt(ss / Math.max(1, x.length));
    const key = `${kind}:${s}`;
    const hist = this.outputRms.get(key) ?? [];
    const ref = hist.length >= 8 ? median(hist) : null;
    if (ref !== null && ref > 0 && rms > SCREEN_FACTOR * ref) {
      throw new BadOutputError(`${what}: RMS ${rms.toExponential(2)} is over ${SCREEN_FACTOR}x the median ${ref.toExponential(2)} of recent ones`);
    }
    hist.push(rms);
    if (hist.length > OUTPUT_HISTORY) hist.shift();
    this.outputRms.set(key, hist);
  }

  /** After a failed micro-batch attempt at peer id: bad output bans it; a timeout counts (repeated
   *  ones mark it slow: out of routes while its stage has other replicas); a peer that also fails a
   *  short heartbeat is dropped. */
  private async afterFailure(id: string, cause: Error): Promise<void> {
    const p = this.peers.get(id);
    if (p === undefined) return;
    if (cause.name === 'BadOutputError') { this.ban(p, `it sent a bad tensor: ${cause.message}`); return; }
    if (cause.name === 'TimeoutError') {
      p.timeouts = (p.timeouts ?? 0) + 1;
      if (p.timeouts >= SLOW_AFTER_TIMEOUTS && (p.slowUntilMs ?? 0) <= Date.now()) {
        p.slowUntilMs = Date.now() + SLOW_PENALTY_MS;
        p.health = 'slow';
        this.event('drop', `peer ${id} (stage ${p.stageIndex}) timed out ${p.timeouts} times; marked slow: routes avoid it for ${inWords(SLOW_PENALTY_MS)} while its stage has other replicas`);
        this.o.emit({ event: 'peer_slow', peer_id: id, timeouts: p.timeouts });
      }
    }
    await this.checkPeer(id, cause);
  }

  /** A peer failed a step-level request (collect, apply, upload, optimizer state): whatever state it
   *  holds for this step is now unknown, so it leaves the routes even if it still answers heartbeats. */
  private async dropAfterFailure(id: string, cause: Error, why: string): Promise<void> {
    await this.checkPeer(id, cause);
    const p = this.peers.get(id);
    if (p !== undefined && !this.gone(id)) this.markDead(p, `${why} (${cause.name}: ${cause.message})`);
  }

  private stageNeed(s: number): number {
    const st = this.plan!.stages[s]!;
    return this.o.memory(st.layerStart, st.layerEnd);
  }

  /** Bytes of stage s's optimizer state: as measured at the last checkpoint, else estimated from its
   *  LoRA parameter count (32-bit AdamW: m and v, 8 B/param; 8-bit: about 2 B/param). */
  private stateSizeEstimate(s: number): number {
    const known = this.stateBytes[s];
    if (known !== undefined) return known;
    const numel = this.stageAdapter(s).reduce((a, x) => a + x.data.length, 0);
    return numel * (this.o.train.optim.includes('8bit') ? 2 : 8);
  }

  /** The stage's optimizer state for a peer taking it: from a live replica (exact), else the latest
   *  checkpoint in the RunStore, else none (fresh moments). */
  private async stageStateFor(s: number): Promise<{ bytes: Uint8Array | null; from: string }> {
    for (const id of this.liveReplicas(s)) {
      if (this.step === 0) return { bytes: null, from: 'fresh optimizer moments (step 0)' };
      try { return { bytes: await this.fetchOptimizerState(id, this.step), from: `the optimizer state of a live replica at step ${this.step} (exact)` }; } catch (e) {
        await this.dropAfterFailure(id, e as Error, 'it failed to send its optimizer state');
      }
    }
    const c = await this.o.store.latestCheckpoint();
    if (c !== null && s < c.stages) {
      const bytes = await this.o.store.optimizerState(c.step, s);
      if (bytes !== null) {
        return { bytes, from: c.step === this.step ? `the optimizer checkpoint of step ${c.step} (exact)`
          : `the optimizer checkpoint of step ${c.step} (the moments of steps ${c.step + 1}..${this.step} are lost)` };
      }
    }
    if (this.resumeStates?.[s] !== undefined && this.resumeStates[s] !== null) return { bytes: this.resumeStates[s]!, from: 'the optimizer checkpoint the run resumed from' };
    return { bytes: null, from: this.step === 0 ? 'fresh optimizer moments (step 0)' : `fresh optimizer moments (no checkpoint: moments of steps 1..${this.step} are lost)` };
  }

  /** Give a waiting joiner stage s at the current step (its adapter, its optimizer state), wait until
   *  it has loaded, and add it to the stage's replicas. False when it did not make it. */
  private async placeOn(j: PendingJoin, s: number, why: 'late' | 'lost' | 'rebalance'): Promise<boolean> {
    const plan = this.plan!;
    const p = this.peers.get(j.peerId);
    if (p === undefined) return false;
    const st = plan.stages[s]!;
    const state = await this.stageStateFor(s);
    p.stageIndex = s;
    p.health = 'ok';
    p.ready = false;
    p.lastSeenMs = Date.now();
    p.slowUntilMs = 0;
    j.resolve({ status: 'assigned', reason: null, assignment: await this.assignmentFor(j.peerId, s, state.bytes) });
    // the new replica joins the routes only once it has loaded the stage at this very step
    const deadline = Date.now() + 10 * 60_000;
    while (!p.ready && (p.health as PeerHealth) !== 'dead' && Date.now() < deadline && !this.stopping) await new Promise((r) => setTimeout(r, 100));
    if (!p.ready) { this.markDead(p, 'did not load its stage in time'); return false; }
    plan.replicas[s]!.push(p.peerId);
    plan.replicas[s]!.sort();
    this.reassignments++;
    p.reassignments = (p.reassignments ?? 0) + 1;
    const range = `layers [${st.layerStart}, ${st.layerEnd})`;
    const msg = why === 'late' ? `late peer ${p.peerId} added to stage ${s} (${range}) at step ${this.step}`
      : `stage ${s} (${range}) had no live replica: peer ${p.peerId} ${why === 'rebalance' ? 'moved from another stage ' : ''}took it at step ${this.step} with the adapter of step ${this.step} and ${state.from}`;
    this.event('reassign', msg);
    this.o.emit({ event: why === 'late' ? 'peer_added' : 'stage_reassigned', peer_id: p.peerId, stage: s, step: this.step, how: why, optimizer_state: state.from });
    return true;
  }

  /** Make sure every stage has a live replica: give an empty stage a waiting joiner, or move a replica
   *  from a stage that has several; with neither, wait (status says for what) until a volunteer joins. */
  private async coverLostStages(): Promise<void> {
    const plan = this.plan!;
    for (;;) {
      if (this.stopping) throw new SwarmError('the coordinator is stopping');
      const empty = plan.stages.map((_, s) => s).filter((s) => this.liveReplicas(s).length === 0);
      if (empty.length === 0) {
        if (this.waitingFor !== null) { this.waitingFor = null; this.o.log('every stage has a peer again; training goes on'); }
        return;
      }
      const s = empty[0]!;
      const need = this.stageNeed(s);
      const ji = this.late.findIndex((j) => (this.peers.get(j.peerId)?.caps.memoryBytes ?? -1) >= need);
      if (ji >= 0) {
        const j = this.late.splice(ji, 1)[0]!;
        const how = this.moving.has(j.peerId) ? 'rebalance' : 'lost';
        this.moving.delete(j.peerId);
        await this.placeOn(j, s, how);
        continue;
      }
      // a replica of the stage with the most replicas (the slowest of them), when it fits
      let donor: string | null = null, donorStage = -1;
      for (let t = 0; t < plan.stages.length; t++) {
        const live = this.liveReplicas(t);
        if (live.length < 2 || (donorStage >= 0 && live.length <= this.liveReplicas(donorStage).length)) continue;
        const fit = live.filter((id) => this.peers.get(id)!.caps.memoryBytes >= need)
          .sort((a, b) => this.peers.get(a)!.tokensPerSecond - this.peers.get(b)!.tokensPerSecond);
        if (fit.length > 0) { donor = fit[0]!; donorStage = t; }
      }
      if (donor !== null) {
        await this.moveReplica(donor, donorStage, s);
        continue;
      }
      const st = plan.stages[s]!;
      const msg = `stage ${s} (layers [${st.layerStart}, ${st.layerEnd})) has no peer; waiting for a volunteer with ≥ ${(need / 2 ** 30).toFixed(2)} GiB`;
      if (this.waitingFor !== msg) {
        this.waitingFor = msg;
        this.event('reassign', msg);
        this.o.emit({ event: 'waiting', stage: s, need_bytes: need, message: msg });
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  /** Rebalance: release a replica of stage `from` (finish with rejoinAfterMs 0) and place it on `to`. */
  private async moveReplica(id: string, from: number, to: number): Promise<void> {
    const p = this.peers.get(id)!;
    const r = this.plan!.replicas[from]!;
    r.splice(r.indexOf(id), 1);
    p.stageIndex = null;
    p.health = 'spare';
    p.ready = false;
    this.moving.set(id, to);
    this.event('reassign', `moving peer ${id} from stage ${from} to stage ${to}, which lost every replica`);
    try {
      await request(this.o.node, p.addrs, 'finish', { runId: this.o.runId, reason: `moved to stage ${to}, which lost every replica`, rejoinAfterMs: 0 }, { timeoutMs: 5000 });
    } catch (e) {
      this.moving.delete(id);
      this.markDead(p, `it did not take the release to move to stage ${to} (${(e as Error).message})`);
      return;
    }
    const deadline = Date.now() + 60_000;
    while (!this.late.some((j) => j.peerId === id) && Date.now() < deadline && !this.stopping) await new Promise((res) => setTimeout(res, 100));
    const i = this.late.findIndex((j) => j.peerId === id);
    if (i < 0) { this.moving.delete(id); this.markDead(p, `it did not join again within 60 s to take stage ${to}`); return; }
    const j = this.late.splice(i, 1)[0]!;
    this.moving.delete(id);
    await this.placeOn(j, to, 'rebalance');
  }

  private async waitReady(): Promise<void> {
    const deadline = Date.now() + 30 * 60_000;
    for (;;) {
      const assigned = [...this.peers.values()].filter((p) => p.stageIndex !== null && p.health !== 'dead');
      if (assigned.length > 0 && assigned.every((p) => p.ready)) return;
      if (Date.now() > deadline) throw new SwarmError('peers did not become ready within 30 minutes');
      for (let s = 0; s < this.plan!.stages.length; s++) {
        if (this.liveReplicas(s).length === 0) throw new SwarmError(`stage ${s} lost all its peers before training started`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  // ---- training

  private peerAddrs(id: string): Multiaddr[] {
    return this.peers.get(id)!.addrs;
  }

  private async train(): Promise<void> {
    await this.waitReady();
    await this.captureInitialAdapter();
    this.state = 'training';
    this.o.emit({ event: 'training', step: this.step, total_steps: this.o.data.totalSteps });
    const t = this.o.train;
    const total = this.o.data.totalSteps;
    const warmup = warmupStepsFor(total, t.warmup_steps, t.warmup_ratio);
    while (this.step < total && !this.stopping) {
      // at a step boundary: a stage that lost every replica is covered first, then late joiners placed
      await this.coverLostStages();
      await this.admitLateJoiners();
      await this.runStep(this.step, learningRateAt(t.learning_rate, t.lr_scheduler_type, this.step, warmup, total));
    }
    if (!this.stopping) await this.finish();
  }

  private async runStep(step: number, lr: number): Promise<void> {
    const t0 = performance.now();
    const mbs = await this.o.data.microBatchesForStep(step);
    let labelTokens = 0, seqTokens = 0;
    for (const mb of mbs) {
      for (let i = 0; i < mb.labels.length; i++) if (mb.labels[i]! !== -100) labelTokens++;
      seqTokens += mb.batch * mb.seqLen;
    }
    // a step without label tokens contributes no gradient and loss 0, as in the trainer (accumulateStep)
    const lossScale = labelTokens > 0 ? 1 / labelTokens : 0;
    const S = this.plan!.stages.length;
    const lossSums = new Float64Array(mbs.length);
    const attempts = new Int32Array(mbs.length);
    /** per micro-batch: the route (one peer per stage) whose attempt committed */
    const committedRoute: Array<string[] | null> = mbs.map(() => null);

    const C = this.o.llama.hiddenSize;
    const runMb = async (mb: number, route: string[]): Promise<void> => {
      const attempt = attempts[mb]!;
      const m = mbs[mb]!;
      const T = m.batch * m.seqLen;
      const base = { runId: this.o.runId, step, mb, attempt };
      const reached: string[] = [];
      let at = route[0]!;
      try {
        let hidden: WireTensor | undefined;
        for (let s = 0; s < S; s++) {
          at = route[s]!;
          reached.push(at);
          const res = await request(this.o.node, this.peerAddrs(at), 'forward', {
            ...base, stageIndex: s, route, batch: m.batch, seqLen: m.seqLen,
            ids: s === 0 ? encodeTensor(m.ids, [T], 'i32', 'ids') : undefined,
            hidden: s > 0 ? hidden : undefined,
            labels: s === S - 1 ? encodeTensor(m.labels, [T], 'i32', 'labels') : undefined,
            dropoutSeed: dropoutSeedFor(this.o.train.seed, step, mb),
            train: true,
          }, { timeoutMs: this.computeTimeout });
          if (s === S - 1) {
            if (res.lossSum === undefined) throw new SwarmError(`last stage peer ${at} returned no loss`);
            lossSums[mb] = res.lossSum;
          } else {
            if (res.hidden === undefined) throw new SwarmError(`stage ${s} peer ${at} returned no hidden state`);
            // checked here, so garbage is blamed on the peer that made it, not on the next hop
            this.screenOutput(res.hidden, [T, C], s, 'act', `the stage ${s} activation of step ${step} micro-batch ${mb}`);
            hidden = res.hidden;
          }
        }
        let grad: WireTensor | undefined;
        for (let s = S - 1; s >= 0; s--) {
          at = route[s]!;
          const res = await request(this.o.node, this.peerAddrs(at), 'backward', {
            ...base, stageIndex: s,
            gradOut: s < S - 1 ? grad : undefined,
            lossScale: s === S - 1 ? lossScale : undefined,
          }, { timeoutMs: this.computeTimeout });
          grad = res.gradIn;
          if (s > 0) {
            if (grad === undefined) throw new SwarmError(`stage ${s} peer ${at} returned no activation gradient`);
            this.screenOutput(grad, [T, C], s, 'grad', `the stage ${s} activation gradient of step ${step} micro-batch ${mb}`);
          }
        }
        // the micro-batch is done on every stage: its gradients count now, exactly once
        for (const id of route) {
          at = id;
          await request(this.o.node, this.peerAddrs(id), 'commit', { ...base, commit: true });
        }
        committedRoute[mb] = route;
        for (const id of route) this.peers.get(id)!.microBatches++;
      } catch (e) {
        await Promise.allSettled(reached.map((id) => request(this.o.node, this.peerAddrs(id), 'commit', { ...base, commit: false }, { timeoutMs: 5000 })));
        throw new RouteFailure(at, e as Error);
      }
    };

    /** one peer per stage for route k; null while a stage has no live replica (it gets one first) */
    const routeFor = (k: number): string[] | null => {
      const r: string[] = [];
      for (let s = 0; s < S; s++) {
        const live = this.routable(s);
        if (live.length === 0) return null;
        r.push(live[k % live.length]!);
      }
      return r;
    };

    // routes work in parallel, each taking its quota of the step's micro-batches (proportional to its
    // measured throughput) off one queue
    const todo = mbs.map((_, i) => i);
    /** per micro-batch: failures at peers that stayed up (bounded by MAX_ATTEMPTS) */
    const strikes = new Int32Array(mbs.length);
    let quota: number[] = [];
    let taken: number[] = [];
    /** a route's rate: its slowest peer's tokens/s, shared among the routes that peer serves */
    const routeRate = (routes: Array<string[] | null>, r: number): number => {
      const rt = routes[r];
      if (rt === null || rt === undefined) return 0;
      return Math.min(...rt.map((id, s) => (this.peers.get(id)?.tokensPerSecond ?? 0) / routes.filter((o) => o?.[s] === id).length));
    };
    const worker = async (k: number, R: number): Promise<void> => {
      const home = k % R;
      for (;;) {
        if (taken[home]! >= quota[home]!) return;
        const mb = todo.shift();
        if (mb === undefined) return;
        taken[home]! += 1;
        for (;;) {
          const route = routeFor(k + attempts[mb]!);
          if (route === null) { todo.unshift(mb); taken[home]! -= 1; return; }
          try {
            await runMb(mb, route);
            break;
          } catch (e) {
            const f = e as RouteFailure;
            attempts[mb]! += 1;
            this.retries++;
            const p = this.peers.get(f.peerId);
            if (p !== undefined) p.retries = (p.retries ?? 0) + 1;
            this.event('retry', `step ${step} micro-batch ${mb} attempt ${attempts[mb]! - 1} failed at peer ${f.peerId} (${f.cause.name}: ${f.cause.message}); retrying with attempt ${attempts[mb]}`);
            await this.afterFailure(f.peerId, f.cause);
            if (!this.gone(f.peerId)) strikes[mb]! += 1;
            if (strikes[mb]! >= MAX_ATTEMPTS) throw new SwarmError(`step ${step} micro-batch ${mb} failed ${MAX_ATTEMPTS} times at peers that stayed up; last: ${f.cause.message}`);
            await new Promise((r) => setTimeout(r, 100 * Math.min(attempts[mb]!, 5)));
          }
        }
      }
    };
    /** route[s] is no longer a live replica of stage s: what it held for this step is gone */
    const routeBroken = (r: string[]) => r.some((id, s) => !this.liveReplicas(s).includes(id));
    let stageGrads: Float32Array[][];
    for (;;) {
      for (;;) {
        // a stage that lost every replica gets one first (or the run waits for a volunteer)
        await this.coverLostStages();
        // R routes, each with up to `depth` micro-batches in flight: while stage 1 works on one
        // micro-batch, stage 0 already runs the next (the stage hosts queue backward before forward,
        // so a route settles into one-forward-one-backward). Results do not depend on the order:
        // every stage folds its committed micro-batches in micro-batch order.
        const R = Math.max(...this.plan!.stages.map((_, s) => this.routable(s).length));
        const depth = pipelineDepth(S);
        const routes = Array.from({ length: R }, (_, r) => routeFor(r));
        quota = routeQuotas(todo.length, routes.map((_, r) => routeRate(routes, r)));
        taken = quota.map(() => 0);
        await Promise.all(Array.from({ length: R * depth }, (_, k) => worker(k, R)));
        if (todo.length > 0) continue; // a stage lost its last replica mid-step
        // a replica lost (or banned, or moved) after some micro-batches committed on it took their
        // gradient with it: take those micro-batches back from the other peers of their route, run them again
        const lost = committedRoute.flatMap((r, mb) => (r !== null && routeBroken(r) ? [mb] : []));
        if (lost.length === 0) break;
        for (const mb of lost) {
          const route = committedRoute[mb]!;
          await Promise.allSettled(route.filter((id, s) => this.liveReplicas(s).includes(id)).map((id) =>
            request(this.o.node, this.peerAddrs(id), 'commit', { runId: this.o.runId, step, mb, attempt: attempts[mb]!, commit: false })));
          committedRoute[mb] = null;
          attempts[mb]! += 1;
          this.retries++;
          todo.push(mb);
        }
        this.event('retry', `step ${step}: re-running micro-batches ${lost.join(', ')} whose gradient was held by a dropped, banned or moved peer`);
      }

      // collect the step's gradient from every live replica and screen it before it counts
      const collected: Array<Array<{ id: string; grads: Float32Array[]; microBatches: number }>> = [];
      let failed = false;
      for (let s = 0; s < S && !failed; s++) {
        const rs = [];
        for (const id of this.liveReplicas(s)) {
          try {
            rs.push({ id, ...(await this.collect(id, s, step)) });
          } catch (e) {
            this.event('retry', `step ${step}: collecting stage ${s}'s gradient from peer ${id} failed (${(e as Error).name}: ${(e as Error).message})`);
            await this.dropAfterFailure(id, e as Error, `it failed to send its step ${step} gradient`);
            failed = true;
            break;
          }
        }
        collected.push(rs);
      }
      if (failed) continue; // its micro-batches run again elsewhere
      let banned = false;
      for (let s = 0; s < S; s++) {
        const perMb = collected[s]!.map((r) => globalGradNorm([r.grads]) / Math.max(1, r.microBatches));
        const hist = this.normHistory[s] ?? [];
        collected[s]!.forEach((r, i) => {
          // reference: the other replicas of this step and this stage's recent accepted steps
          const ref = median([...perMb.filter((_, j) => j !== i), ...hist]);
          if (!Number.isFinite(perMb[i]!) || (ref !== null && ref > 0 && perMb[i]! > SCREEN_FACTOR * ref)) {
            this.ban(this.peers.get(r.id)!, `its step ${step} gradient (${perMb[i]!.toExponential(2)} per micro-batch) is over ${SCREEN_FACTOR}x the median ${ref?.toExponential(2)}`);
            banned = true;
          }
        });
      }
      if (banned) continue;
      if (committedRoute.some((r) => r === null || routeBroken(r))) continue; // a peer went away meanwhile
      for (let s = 0; s < S; s++) {
        const hist = (this.normHistory[s] ??= []);
        for (const r of collected[s]!) if (r.microBatches > 0) hist.push(globalGradNorm([r.grads]) / r.microBatches);
        while (hist.length > 16) hist.shift();
      }
      // replicas summed in replica (peer id) order
      stageGrads = collected.map((rs) => sumReplicas(rs.map((r) => r.grads)));
      break;
    }
    const norm = globalGradNorm(stageGrads);
    clipInPlace(stageGrads, norm, this.o.train.max_grad_norm);
    crashPoint('before-apply', step + 1);
    // every live replica applies the same final gradient; a replica placed meanwhile (its stage lost
    // every peer during apply) loads the adapter of `step` and applies it too
    const applied = new Set<string>();
    const applyTo = async (s: number, id: string): Promise<void> => {
      const names = this.stageParamNames[s]!;
      const sizes = stageGrads[s]!.map((g) => g.length);
      const pg = pages(sizes);
      for (let i = 0; i < pg.length; i++) {
        const [from, count] = pg[i]!;
        const grads = stageGrads[s]!.slice(from, from + count).map((g, k) => encodeTensor(g, this.adapter.get(names[from + k]!)?.shape ?? [g.length], 'f32', names[from + k]!));
        await request(this.o.node, this.peerAddrs(id), 'aggregate', {
          runId: this.o.runId, step, phase: 'apply', from, count, grads, lr, last: i === pg.length - 1,
        }, { timeoutMs: this.computeTimeout });
      }
    };
    const t = this.o.train;
    const saveCheckpoint = step + 1 === this.o.data.totalSteps || (t.save_strategy === 'steps' && (step + 1) % t.save_steps === 0);
    const everyStep = this.plan!.stages.every((_, s) => this.stateSizeEstimate(s) <= CHECKPOINT_EVERY_STEP_MAX_BYTES);
    let states: Uint8Array[] | null = null;
    for (let pass = 0; ; pass++) {
      if (pass > 0) await this.coverLostStages();
      for (let s = 0; s < S; s++) {
        const todoPeers = this.liveReplicas(s).filter((id) => !applied.has(id));
        const res = await Promise.allSettled(todoPeers.map((id) => applyTo(s, id)));
        for (let i = 0; i < res.length; i++) {
          const r = res[i]!;
          if (r.status === 'fulfilled') applied.add(todoPeers[i]!);
          else await this.dropAfterFailure(todoPeers[i]!, r.reason as Error, `it failed to apply the update of step ${step + 1}`);
        }
        if (s === 0 && pass === 0) crashPoint('mid-apply', step + 1);
      }
      // v_{t+1} from one replica per stage; every replica applied the same update
      let uploaded = true;
      for (let s = 0; s < S && uploaded; s++) {
        uploaded = false;
        for (const id of this.liveReplicas(s).filter((x) => applied.has(x))) {
          try { await this.uploadAdapter(id); uploaded = true; break; } catch (e) { await this.dropAfterFailure(id, e as Error, `it failed to upload its adapter of step ${step + 1}`); }
        }
      }
      if (!uploaded) continue;
      if (saveCheckpoint || everyStep) {
        states = [];
        for (let s = 0; s < S && states !== null; s++) {
          let got: Uint8Array | null = null;
          for (const id of this.liveReplicas(s).filter((x) => applied.has(x))) {
            try { got = await this.fetchOptimizerState(id, step + 1); break; } catch (e) { await this.dropAfterFailure(id, e as Error, `it failed to send its optimizer state of step ${step + 1}`); }
          }
          if (got === null) {
            this.event('checkpoint', `no replica of stage ${s} could send its optimizer state of step ${step + 1}; step ${step + 1} is committed without a checkpoint`);
            states = null;
          } else {
            states.push(got);
            this.stateBytes[s] = got.length;
          }
        }
      }
      break;
    }
    const loss = labelTokens > 0 ? [...lossSums].reduce((a, b) => a + b, 0) / labelTokens : 0;
    const seconds = (performance.now() - t0) / 1000;
    const rec: StepRecord = {
      step: step + 1, loss, lr, gradNorm: norm, tokens: seqTokens, tokensPerSecond: seqTokens / seconds,
      timeMs: Date.now(), cursor: this.o.data.cursorAfter(step + 1),
    };
    // durable before announced: the adapter of step+1, the cursor (and at checkpoints every stage's
    // optimizer state) land in one atomic batch; an every-step checkpoint replaces the previous one
    crashPoint('before-commit', rec.step);
    const prune = states !== null && this.prunable !== null ? [this.prunable] : [];
    await this.o.store.commitStep(rec, this.adapterBytes(), states, prune);
    crashPoint('after-commit', rec.step);
    if (states !== null) this.prunable = saveCheckpoint ? null : { step: rec.step, stages: states.length };
    if (states !== null && saveCheckpoint) this.event('checkpoint', `checkpointed optimizer state of ${states.length} stage(s) at step ${rec.step}`);
    this.step = step + 1;
    this.tokensTotal += seqTokens;
    this.history.push(rec);
    this.o.emit({ event: 'step', step: rec.step, loss: rec.loss, lr: rec.lr, grad_norm: rec.gradNorm, tokens_per_s: rec.tokensPerSecond, total_steps: this.o.data.totalSteps });
  }

  private async collect(peerId: string, s: number, step: number): Promise<{ grads: Float32Array[]; microBatches: number }> {
    const out: Float32Array[] = [];
    let microBatches = 0;
    let total = Infinity, from = 0;
    const names = this.stageParamNames[s]!;
    while (from < total) {
      // pages of 16 tensors; a LoRA tensor of an 8B model is at most ~1 MB
      const res = await request(this.o.node, this.peerAddrs(peerId), 'aggregate', {
        runId: this.o.runId, step, phase: 'collect', from, count: Math.min(16, total === Infinity ? 16 : total - from),
      }, { timeoutMs: COMPUTE_TIMEOUT_MS });
      total = res.total;
      microBatches = res.microBatches ?? 0;
      const gs = res.grads ?? [];
      if (gs.length === 0 && from < total) throw new SwarmError(`peer ${peerId} sent an empty gradient page`);
      for (const g of gs) {
        const i = out.length;
        const known = names[i] !== undefined ? this.adapter.get(names[i]!) : undefined;
        out.push(decodeFloat(g, `step ${step} stage ${s} grad ${i} from ${peerId}`, known?.shape));
      }
      from += gs.length;
    }
    return { grads: out, microBatches };
  }

  private async fetchOptimizerState(peerId: string, step: number): Promise<Uint8Array> {
    const chunks: Uint8Array[] = [];
    let size = Infinity, off = 0;
    while (off < size) {
      const res = await request(this.o.node, this.peerAddrs(peerId), 'optimizer', { runId: this.o.runId, step, offset: off, length: 8 * 1024 * 1024 }, { timeoutMs: COMPUTE_TIMEOUT_MS });
      size = res.sizeBytes;
      if (res.bytes.length === 0 && off < size) throw new SwarmError(`peer ${peerId} sent an empty optimizer-state chunk`);
      chunks.push(res.bytes);
      off += res.bytes.length;
      if (size === 0) break;
    }
    return new Uint8Array(Buffer.concat(chunks));
  }

  private async uploadAdapter(peerId: string): Promise<void> {
    const p = this.peers.get(peerId)!;
    const s = p.stageIndex!;
    const names: string[] = [];
    const got: NamedTensor[] = [];
    let total = Infinity, from = 0;
    while (from < total) {
      const res = await request(this.o.node, p.addrs, 'adapter', { runId: this.o.runId, from, count: 16 });
      total = res.total;
      if (res.tensors.length === 0 && from < total) throw new SwarmError(`peer ${peerId} sent an empty adapter page`);
      for (const { name, tensor } of res.tensors) {
        const data = decodeFloat(tensor, `adapter ${name} from ${peerId}`);
        got.push({ name, shape: tensor.shape, data });
        names.push(name);
      }
      from += res.tensors.length;
    }
    // all or nothing: a transfer cut short leaves the stage's previous adapter whole
    for (const x of got) this.adapter.set(x.name, x);
    this.stageParamNames[s] = names;
  }

  /** The full adapter in stage order, as shard-format bytes. */
  private adapterBytes(): Uint8Array {
    const float = new Map<string, { shape: number[]; data: Float32Array }>();
    for (const t of this.orderedAdapter()) float.set(t.name, { shape: t.shape, data: t.data });
    return encodeShard({ nf4: new Map(), float });
  }

  private orderedAdapter(): NamedTensor[] {
    const names = this.stageParamNames.flat();
    const known = names.length > 0 ? names : [...this.adapter.keys()];
    return known.map((n) => this.adapter.get(n)!).filter((x) => x !== undefined);
  }

  /** Ask one replica per stage for its initial LoRA tensors so step 0 is pullable and the
   *  coordinator knows each stage's parameter order. */
  private async captureInitialAdapter(): Promise<void> {
    for (let s = 0; s < this.plan!.stages.length; s++) await this.uploadAdapter(this.liveReplicas(s)[0]!);
    if (this.step === 0) await this.o.store.putInitialAdapter(this.adapterBytes());
  }

  private async finish(): Promise<void> {
    this.state = 'finished';
    for (const j of this.late) j.resolve({ status: 'rejected', reason: 'the run finished before this peer could be placed', assignment: null });
    this.late = [];
    this.event('finish', `run finished after ${this.step} steps`);
    await Promise.allSettled([...this.peers.values()].filter((p) => p.stageIndex !== null && p.health !== 'dead').map((p) =>
      request(this.o.node, p.addrs, 'finish', { runId: this.o.runId, reason: 'the run finished' }, { timeoutMs: 5000 })));
    this.finishedResolve();
  }

  private fail(e: Error): void {
    this.state = 'failed';
    this.event('error', `run failed: ${e.name}: ${e.message}`);
    this.o.emit({ event: 'error', message: e.message });
    this.finishedResolve();
  }

  get runState(): DashboardState['state'] { return this.state; }
  get committedStep(): number { return this.step; }
  /** the latest adapter tensors in stage order (for writing the PEFT dir) */
  currentAdapter(): NamedTensor[] { return this.orderedAdapter(); }

  // ---- status and pull

  private statusResponse(): StatusResponse {
    const last = this.history[this.history.length - 1];
    return {
      runId: this.o.runId, state: this.state, step: this.step, totalSteps: this.o.data.totalSteps,
      loss: last?.loss ?? null, lr: last?.lr ?? null, tokensPerSecond: last?.tokensPerSecond ?? null,
      numStages: this.plan?.stages.length ?? 0,
      peers: [...this.peers.values()].map((p) => ({
        peerId: p.peerId, stageIndex: p.stageIndex,
        layerStart: p.stageIndex !== null ? this.plan!.stages[p.stageIndex]!.layerStart : null,
        layerEnd: p.stageIndex !== null ? this.plan!.stages[p.stageIndex]!.layerEnd : null,
        device: p.caps.deviceName, memoryBytes: p.caps.memoryBytes, gemmGflops: p.caps.gemmGflops,
        tokensPerSecond: p.tokensPerSecond, microBatches: p.microBatches, health: p.health, lastSeenMs: p.lastSeenMs,
        retries: p.retries ?? 0, timeouts: p.timeouts ?? 0, bans: this.banList.get(p.peerId)?.count ?? 0,
        banRemainingMs: this.banList.remainingMs(p.peerId), banReason: this.banList.get(p.peerId)?.reason ?? null,
        reassignments: p.reassignments ?? 0,
      })),
      committedSteps: this.history.map((h) => h.step),
      retries: this.retries, reassignments: this.reassignments, bans: this.bans, waitingFor: this.waitingFor,
    };
  }

  dashboardState(): DashboardState {
    const st = this.statusResponse();
    return {
      runId: this.o.runId, state: this.state, model: this.o.modelName, step: this.step, totalSteps: this.o.data.totalSteps,
      minPeers: this.o.minPeers,
      peers: st.peers.map(({ microBatches: _mb, ...p }) => ({ ...p })),
      stages: (this.plan?.stages ?? []).map((s, i) => ({ index: i, ...s, replicas: [...this.plan!.replicas[i]!] })),
      history: this.history.map((h) => ({ step: h.step, loss: h.loss, lr: h.lr, gradNorm: h.gradNorm, tokensPerSecond: h.tokensPerSecond, timeMs: h.timeMs })),
      totals: { retries: this.retries, reassignments: this.reassignments, bans: this.bans, tokens: this.tokensTotal },
      events: [...this.events],
    };
  }

  private async onPull(step: number | undefined, from: number, count: number): Promise<AdapterResponse> {
    const want = step ?? this.step;
    const bytes = await this.o.store.adapter(want);
    if (bytes === null) throw new StaleError(`no committed adapter for step ${want}; committed steps: ${(await this.o.store.committedSteps()).join(', ') || 'none yet'}`);
    const t = decodeShard(bytes, `adapter of step ${want}`);
    const names = [...t.float.keys()];
    // shard encoding sorts by name; pulls list tensors in that same (stable) order
    const tensors = names.slice(from, from + count).map((name) => {
      const x = t.float.get(name)!;
      return { name, tensor: encodeTensor(x.data, x.shape, 'f32', name) };
    });
    return {
      step: want, total: names.length, tensors,
      adapterSpecJson: JSON.stringify({ lora: this.o.lora, baseModel: this.o.modelName }),
    };
  }
}
