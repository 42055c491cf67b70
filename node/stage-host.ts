// The shard host: the RPC-facing side of one stage. It checks each request against the run, step and
// stage, queues the compute, keeps gradients by attempt (step-gradients.ts), applies the aggregated
// optimizer step, and keeps the state from before it for a restarted coordinator (step-snapshot.ts).
import { createHash } from 'node:crypto';
import type { Stage } from '../engine/types.ts';
import type {
  AggregateRequest, AggregateResponse, AdapterRequest, AdapterResponse, Assignment, CommitRequest, JoinRequest,
  MicroBatchRequest, OptimizerRequest, WeightsResponse,
} from '../protocol/messages.ts';
import { decodeFloat, decodeInt, encodeTensor } from '../protocol/tensor.ts';
import type { FloatCodec, WireTensor } from '../protocol/tensor.ts';
import { CodecState } from './codec-state.ts';
import { IntegrityError, SchemaError, StaleError, TensorError } from '../protocol/errors.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import { serveChunk, servePage } from '../protocol/pager.ts';
import { silentLogger } from '../protocol/log.ts';
import type { Logger } from '../protocol/log.ts';
import { StepSnapshot } from './step-snapshot.ts';
import type { SnapshotOptions } from './step-snapshot.ts';
import { StepGradients, attemptKey, sumInOrder } from './step-gradients.ts';
import { gradSquaredSum, scaleGrads } from '../engine/train/clip.ts';
import { JobQueue } from './job-queue.ts';
import type { JobPriority } from './job-queue.ts';
import type { ShardOptimizer } from './optimizer.ts';
import { SNAPSHOT_RESIDENT_BYTES } from './constants.ts';
import { tamperAdapter, tamperOutput, testAids } from './test-aids.ts';
import type { TestAids } from './test-aids.ts';
import { OutputScreen } from '../protocol/screen.ts';

/** What a host that lost its coordinator offers the restarted one (join.kept). */
export type KeptOffer = NonNullable<JoinRequest['kept']>;

export interface StageHostInit extends Partial<SnapshotOptions> {
  /** testing aids (node/test-aids.ts); default: this process's knobs */
  aids?: TestAids;
  /** one line per compute job (what, queue wait, compute time); namespace swarmtune:node:stage */
  log?: Logger;
}

/** Only `signal`: a request whose requester gives up while its job waits is dropped from the queue. */
export interface JobOptions { signal?: AbortSignal }

/** A partner replica's step gradient, pulled by `aggregate collect` (protocol/stage-client.ts collect). */
export type PullGradient = (peer: { peerId: string; addrs: string[] }, signal: AbortSignal | undefined) => Promise<{ grads: WireTensor[] }>;

type StageInput = Parameters<Stage['forward']>[0];

/** A forward of one micro-batch attempt: the control message's fields, with the activation from the
 *  previous stage (received over a hop and screened) on stages after the first. */
export type ForwardCall = Pick<MicroBatchRequest, 'runId' | 'step' | 'mb' | 'attempt' | 'stageIndex' | 'batch' | 'seqLen' | 'ids' | 'labels' | 'dropoutSeed' | 'train' | 'segments'>
  & { hidden?: Float32Array };
export interface ForwardResult { hidden?: Float32Array; lossSum?: number; tokens?: number }
/** A backward: the activation gradient from the next stage, or the loss scale on the last stage. */
export interface BackwardCall { runId: string; step: number; mb: number; attempt: number; stageIndex: number; gradOut?: Float32Array; lossScale?: number }

export class StageHost {
  readonly stage: Stage;
  readonly runId: string;
  readonly stageIndex: number;
  readonly numStages: number;
  readonly wireCodec: FloatCodec;
  /** the delta wire codec's references (node/codec-state.ts); empty for a stateless codec */
  readonly codecState: CodecState;
  /** the RMS screens of what this stage receives on hops (per kind and sending stage) */
  readonly screen = new OutputScreen();
  /** optimizer steps applied so far = the step currently being trained */
  step: number;
  private readonly optimizer: ShardOptimizer;
  private readonly queue = new JobQueue();
  private readonly gradients: StepGradients;
  /** tokens/s through this stage, measured over forward+backward compute */
  private computeMs = 0;
  private computeTokens = 0;
  /** micro-batches committed through this stage since it was loaded (a progress counter) */
  microBatchesServed = 0;
  /** the state from before the last optimizer update (a restarted coordinator may not have committed it) */
  private previous: StepSnapshot | null = null;
  private readonly snapshotOptions: SnapshotOptions;
  /** the optimizer state being paged out, as of `step` (one consistent snapshot per transfer) */
  private optimSnapshot: { step: number; bytes: Uint8Array } | null = null;
  /** bumped when the step in flight is abandoned (coordinator lost): work started before is dropped */
  private generation = 0;
  private readonly aids: TestAids;
  private readonly log: Logger;
  /** the tensors each uncommitted attempt received on hops (its input activation, the activation
   *  gradient it got), kept until the attempt is committed or discarded: a spot check recalls them */
  private readonly receivedTensors = new Map<string, { step: number; data: Float32Array }>();

  constructor(stage: Stage, a: Assignment, optimizer: ShardOptimizer, init: StageHostInit = {}) {
    this.stage = stage;
    this.runId = a.runId;
    this.stageIndex = a.stageIndex;
    this.numStages = a.numStages;
    this.wireCodec = a.wireCodec;
    this.codecState = new CodecState(a.wireCodec);
    this.step = a.step;
    this.optimizer = optimizer;
    this.gradients = new StepGradients(stage);
    this.snapshotOptions = { dir: init.dir ?? null, residentBytes: init.residentBytes ?? SNAPSHOT_RESIDENT_BYTES };
    this.aids = init.aids ?? testAids();
    this.log = init.log ?? silentLogger;
  }

  /** the step of the kept pre-update state, null before the first update */
  get previousStep(): number | null { return this.previous?.step ?? null; }

  get inflight(): number { return this.gradients.inflight; }
  /** the bad-peer testing aid: this stage poisons every activation and gradient it sends */
  get poisonsOutput(): boolean { return this.aids.badOutput?.kind === 'nan'; }
  /** the cheating-peer testing aids (scale, noise, zero): what this stage sends instead of `x` */
  tamper(x: Float32Array): Float32Array { return tamperOutput(this.aids, x); }
  get busy(): boolean { return this.queue.busy; }
  get tokensPerSecond(): number { return this.computeMs > 0 ? this.computeTokens / (this.computeMs / 1000) : 0; }

  /** Resolves once no job runs or waits (after detach, the jobs queued before it drain quickly). */
  idle(): Promise<void> { return this.queue.idle(); }

  /** A request must be for this run, its current step and (if it names one) this stage. */
  check(req: { runId: string; step: number; stageIndex?: number }, what: string): void {
    if (req.runId !== this.runId) throw new StaleError(`${what}: run ${req.runId} is not this peer's run ${this.runId}`);
    if (req.step !== this.step) throw new StaleError(`${what}: step ${req.step} is not the current step ${this.step}`);
    if (req.stageIndex !== undefined && req.stageIndex !== this.stageIndex) {
      throw new SchemaError(`${what}: addressed to stage ${req.stageIndex}, this peer holds stage ${this.stageIndex}`);
    }
  }

  /** A compute job on the queue, timed for tokens/s (and slowed by the delay aid). */
  private compute<T>(priority: JobPriority, what: string, tokens: number, fn: () => Promise<T>, opts: JobOptions): Promise<T> {
    const queuedAt = this.log.enabled ? performance.now() : 0;
    return this.queue.run(priority, async () => {
      const t0 = performance.now();
      const r = await fn();
      if (this.aids.delayMs > 0) await new Promise((res) => setTimeout(res, this.aids.delayMs));
      const ms = performance.now() - t0;
      this.computeMs += ms;
      this.computeTokens += tokens;
      if (this.log.enabled) this.log('%s: %d ms queued, %d ms computing', what, Math.round(t0 - queuedAt), Math.round(ms));
      return r;
    }, opts);
  }

  /** The stage's input for a forward, every tensor checked against the stage's shapes and vocabulary. */
  private forwardInput(req: ForwardCall, key: string): StageInput {
    const C = this.stage.config.hiddenSize;
    const V = this.stage.config.vocabSize;
    const T = req.batch * req.seqLen;
    const input: StageInput = { key, batch: req.batch, seqLen: req.seqLen, dropoutSeed: req.dropoutSeed };
    if (req.segments !== undefined) {
      const seg = decodeInt(req.segments, 'forward.segments');
      let sum = 0;
      for (const n of seg) sum += n > 0 ? n : NaN;
      if (req.batch !== 1 || sum !== req.seqLen) throw new TensorError(`forward.segments: packed example lengths must be positive and sum to seqLen ${req.seqLen} in one row (batch ${req.batch})`);
      input.segments = seg;
    }
    if (this.stage.isFirst) {
      if (req.ids === undefined) throw new SchemaError('forward: the first stage needs token ids');
      input.ids = decodeInt(req.ids, 'forward.ids', [T]);
      for (let i = 0; i < T; i++) if (input.ids[i]! < 0 || input.ids[i]! >= V) throw new TensorError(`forward.ids: token ${input.ids[i]} at ${i} is outside the vocabulary [0, ${V})`);
    } else {
      if (req.hidden === undefined) throw new SchemaError(`forward: stage ${this.stageIndex} needs hidden states`);
      if (req.hidden.length !== T * C) throw new TensorError(`forward.hidden: ${req.hidden.length} elements, [${T}, ${C}] needs ${T * C}`);
      input.hidden = req.hidden;
    }
    if (this.stage.isLast) {
      if (req.labels === undefined) throw new SchemaError('forward: the last stage needs labels');
      input.labels = decodeInt(req.labels, 'forward.labels', [T]);
      for (let i = 0; i < T; i++) {
        const l = input.labels[i]!;
        if (l !== -100 && (l < 0 || l >= V)) throw new TensorError(`forward.labels: label ${l} at ${i} is neither -100 nor in the vocabulary [0, ${V})`);
      }
    }
    return input;
  }

  async forward(req: ForwardCall, opts: JobOptions = {}): Promise<ForwardResult> {
    this.check(req, 'forward');
    const C = this.stage.config.hiddenSize;
    const T = req.batch * req.seqLen;
    const key = attemptKey(req.step, req.mb, req.attempt);
    this.gradients.checkCurrent(req.mb, req.attempt);
    // every input is checked before anything changes: a refused request leaves no trace
    const input = this.forwardInput(req, key);
    const a = this.gradients.open(key, req.mb, req.attempt, req, req.train);
    const generation = this.generation;
    let out: Awaited<ReturnType<Stage['forward']>>;
    try {
      out = await this.compute(1, `forward step=${req.step} mb=${req.mb} attempt=${req.attempt}`, T, async () => {
        // released (commit: false) while it waited in the queue — e.g. the coordinator timed out on
        // it: computing it anyway would only delay the jobs behind it
        if (generation !== this.generation) throw new StaleError(`forward: step ${req.step} was abandoned (coordinator lost) while micro-batch ${req.mb} waited`);
        if (req.train && !this.gradients.holds(key, a)) throw new StaleError(`forward: micro-batch ${req.mb} attempt ${req.attempt} of step ${req.step} was released while it waited`);
        return this.stage.forward(input, { train: req.train });
      }, opts);
    } catch (e) {
      // a forward that failed keeps nothing: the attempt cannot run backward
      this.gradients.drop(key, a, false);
      throw e;
    }
    if (generation !== this.generation) {
      // the step was abandoned while this forward waited or ran: its kept input must not linger
      this.stage.release(key);
      throw new StaleError(`forward: step ${req.step} was abandoned (coordinator lost) while micro-batch ${req.mb} computed`);
    }
    a.forwardDone = true;
    if (!req.train) this.stage.release(key);
    if (this.stage.isLast) return { lossSum: out.lossSum ?? 0, tokens: out.tokens ?? 0 };
    if (out.hidden === undefined) throw new Error(`stage ${this.stageIndex} forward returned no hidden state`);
    if (out.hidden.length !== T * C) throw new Error(`stage ${this.stageIndex} forward returned ${out.hidden.length} elements, not [${T}, ${C}]`);
    return { hidden: out.hidden };
  }

  async backward(req: BackwardCall, opts: JobOptions = {}): Promise<{ gradIn?: Float32Array }> {
    this.check(req, 'backward');
    const key = attemptKey(req.step, req.mb, req.attempt);
    const a = this.gradients.get(key);
    if (a === undefined || !a.forwardDone) throw new StaleError(`backward: no forward kept for micro-batch ${req.mb} attempt ${req.attempt} of step ${req.step}`);
    if (a.grads !== null) throw new StaleError(`backward: micro-batch ${req.mb} attempt ${req.attempt} already ran backward`);
    const C = this.stage.config.hiddenSize;
    const T = a.batch * a.seqLen;
    const args: { gradOut?: Float32Array; lossScale?: number } = {};
    if (this.stage.isLast) {
      if (req.lossScale === undefined) throw new SchemaError('backward: the last stage needs lossScale');
      args.lossScale = req.lossScale;
    } else {
      if (req.gradOut === undefined) throw new SchemaError(`backward: stage ${this.stageIndex} needs gradOut`);
      if (req.gradOut.length !== T * C) throw new TensorError(`backward.gradOut: ${req.gradOut.length} elements, [${T}, ${C}] needs ${T * C}`);
      args.gradOut = req.gradOut;
    }
    // a separate gradient per attempt: it only joins the step sum when the coordinator commits it
    const grads = this.stage.newGrads();
    a.grads = grads;
    let gradIn: Float32Array | undefined;
    try {
      ({ gradIn } = await this.compute(0, `backward step=${req.step} mb=${req.mb} attempt=${req.attempt}`, 0, async () => {
        if (!this.gradients.holds(key, a)) throw new StaleError(`backward: micro-batch ${req.mb} attempt ${req.attempt} of step ${req.step} was released while it waited`);
        return this.stage.backward(key, grads, args);
      }, opts));
    } catch (e) {
      // a half-computed gradient must never be committed: the attempt is gone (the coordinator retries)
      this.gradients.drop(key, a, true);
      throw e;
    }
    if (this.stage.isFirst) return {};
    if (gradIn === undefined) throw new Error(`stage ${this.stageIndex} backward returned no input gradient`);
    return { gradIn };
  }

  /** Keep what attempt (step, mb, attempt) received of `kind` (node/pipeline.ts); tensors of
   *  earlier steps are dropped. */
  keepReceived(key: { step: number; mb: number; attempt: number }, kind: 'act' | 'grad', data: Float32Array): void {
    for (const [k, v] of this.receivedTensors) if (v.step < this.step) this.receivedTensors.delete(k);
    this.receivedTensors.set(`${attemptKey(key.step, key.mb, key.attempt)}:${kind}`, { step: key.step, data });
  }

  /** What the attempt received of `kind`, for a recall (StaleError when nothing is kept). */
  received(req: { runId: string; step: number; mb: number; attempt: number; kind: 'act' | 'grad' }): Float32Array {
    this.check(req, 'recall');
    const t = this.receivedTensors.get(`${attemptKey(req.step, req.mb, req.attempt)}:${req.kind}`);
    if (t === undefined) throw new StaleError(`recall: no ${req.kind} kept for micro-batch ${req.mb} attempt ${req.attempt} of step ${req.step}`);
    return t.data;
  }

  commit(req: CommitRequest): void {
    this.check(req, 'commit');
    for (const kind of ['act', 'grad']) this.receivedTensors.delete(`${attemptKey(req.step, req.mb, req.attempt)}:${kind}`);
    this.codecState.settle(req, req.commit);
    if (req.commit) {
      this.gradients.commit(req.step, req.mb, req.attempt);
      this.microBatchesServed++;
    } else this.gradients.discard(req.step, req.mb, req.attempt);
  }

  async aggregate(req: AggregateRequest, opts: JobOptions = {}): Promise<AggregateResponse> {
    this.check(req, 'aggregate');
    const params = this.stage.params;
    const total = params.length;
    if (req.phase === 'collect') {
      // the step sum always travels in f32: it is small and clipping needs its exact norm
      const page = servePage(total, req.from, req.count, 'aggregate collect', (i) => params[i]!.data.byteLength);
      const sum = await this.gradients.stepSumOf(opts);
      const grads = [];
      for (let i = page.from; i < page.from + page.count; i++) grads.push(encodeTensor(sum[i]!, params[i]!.shape, 'f32', `grad ${params[i]!.name}`));
      return { total, grads, microBatches: this.gradients.committedCount };
    }
    if (req.phase === 'reduce') throw new SchemaError('aggregate reduce: served by the session (it pulls from the partner replicas)');
    if (req.phase === 'step') return this.stepReduced(req);
    if (req.from + req.count > total) throw new SchemaError(`aggregate apply: params [${req.from}, ${req.from + req.count}) outside [0, ${total})`);
    if (req.grads === undefined || req.grads.length !== req.count) throw new SchemaError(`aggregate apply: expected ${req.count} gradients, got ${req.grads?.length ?? 0}`);
    // pages arrive in order (a page may be sent again); the last one needs every param covered
    const covered = this.gradients.finalCovered;
    if (req.from > covered) throw new SchemaError(`aggregate apply: page [${req.from}, ${req.from + req.count}) leaves params [${covered}, ${req.from}) without a final gradient`);
    const end = Math.max(covered, req.from + req.count);
    if (req.last === true) {
      if (req.lr === undefined) throw new SchemaError('aggregate apply: the last page needs lr');
      if (end !== total) throw new SchemaError(`aggregate apply: the last page leaves params [${end}, ${total}) without a final gradient`);
    }
    // decode the whole page before keeping any of it: a refused page leaves no trace
    const page: Float32Array[] = [];
    for (let k = 0; k < req.count; k++) {
      const i = req.from + k;
      page.push(decodeFloat(req.grads[k]!, `final grad ${params[i]!.name}`, params[i]!.shape));
    }
    const g = this.gradients.putFinalPage(req.from, page);
    // once the last page is in, the update runs whatever the requester does: half an apply is worse
    if (req.last !== true) return { total };
    return { total, ...await this.queue.run(0, () => this.applyStep(g, req.lr!)) };
  }

  /** Partner replicas may pull this peer's step sum of `step` only once its own reduce named them
   *  (a stale run or step is refused first, as from anyone). */
  allowPull(req: AggregateRequest, peerId: string): void {
    this.check(req, 'aggregate collect');
    this.gradients.allowPull(peerId, req.step);
  }

  /** The light tail's reduce: the step gradients of the coordinator's replicas, in its (peer-id)
   *  order, this peer's own among them, summed here (sumInOrder: the coordinator's sumReplicas
   *  operations, so every replica gets the same bits); answers the float64 sums of squares the
   *  coordinator needs for the global norm and the gradient screen. A partner whose pull fails, or
   *  whose gradient is misshapen or non-finite, is named in `failed` (nothing is kept). */
  async reduce(req: AggregateRequest, selfId: string, pull: PullGradient, opts: JobOptions = {}): Promise<AggregateResponse> {
    this.check(req, 'aggregate reduce');
    const params = this.stage.params;
    const replicas = req.replicas ?? [];
    if (!replicas.some((r) => r.peerId === selfId)) throw new SchemaError(`aggregate reduce: this peer ${selfId} is not among the step's replicas`);
    if (new Set(replicas.map((r) => r.peerId)).size !== replicas.length) throw new SchemaError('aggregate reduce: a replica is named twice');
    const own = await this.gradients.stepSumOf(opts);
    this.gradients.setRoster(req.step, replicas.map((r) => r.peerId).filter((id) => id !== selfId));
    const ownSumSq = gradSquaredSum(own);
    const base = { total: params.length, microBatches: this.gradients.committedCount };
    if (!Number.isFinite(ownSumSq)) return { ...base, ownFinite: false };
    const parts: Float32Array[][] = [];
    for (const r of replicas) {
      if (r.peerId === selfId) { parts.push(own); continue; }
      let got: { grads: WireTensor[] };
      try { got = await pull(r, opts.signal); } catch (e) {
        if (opts.signal?.aborted === true) throw opts.signal.reason;
        return { ...base, ownSumSq, ownFinite: true, failed: { peerId: r.peerId, message: `${(e as Error).name}: ${(e as Error).message}`.slice(0, 4000), bad: false } };
      }
      try {
        if (got.grads.length !== params.length) throw new TensorError(`${got.grads.length} tensors, the stage has ${params.length}`);
        parts.push(got.grads.map((t, i) => decodeFloat(t, `step ${req.step} grad ${params[i]!.name} from ${r.peerId}`, params[i]!.shape)));
      } catch (e) {
        return { ...base, ownSumSq, ownFinite: true, failed: { peerId: r.peerId, message: (e as Error).message.slice(0, 4000), bad: true } };
      }
    }
    const reduced = parts.length === 1 ? own.map((g) => Float32Array.from(g)) : sumInOrder(parts);
    this.gradients.setReduced(req.step, reduced);
    const sumSq = gradSquaredSum(reduced);
    const partsSumSq = parts.map((g) => (g === own ? ownSumSq : gradSquaredSum(g)));
    return { ...base, ownSumSq, ownFinite: true, ...(partsSumSq.every(Number.isFinite) ? { partsSumSq } : {}), ...(Number.isFinite(sumSq) ? { sumSq } : {}) };
  }

  /** The light tail's apply: the reduced gradient, clipped by the coordinator's coefficient with the
   *  same float32 operation it used to apply itself (engine clip.ts scaleGrads), through the optimizer. */
  private async stepReduced(req: AggregateRequest): Promise<AggregateResponse> {
    if (req.lr === undefined) throw new SchemaError('aggregate step: needs lr');
    if (req.clip === true && req.clipScale === undefined) throw new SchemaError('aggregate step: clip without clipScale');
    const g = this.gradients.reducedOf(req.step);
    return { total: this.stage.params.length, ...await this.queue.run(0, async () => {
      if (req.clip === true) scaleGrads(g, req.clipScale!);
      return this.applyStep(g, req.lr!);
    }) };
  }

  /** The optimizer step with the final gradient, after keeping the state from before it; the
   *  digests every replica of the stage must share after it (the coordinator compares them). */
  private async applyStep(grads: Float32Array[], lr: number): Promise<{ adapterSha256: string; optimizerSha256: string }> {
    // keep the state of this step: the coordinator may die before it commits the update
    const snap = await StepSnapshot.take(this.step, this.stage.params, await this.optimizer.saveState(), this.snapshotOptions);
    await this.previous?.dispose();
    this.previous = snap;
    await this.optimizer.step(grads, lr);
    this.resetStep();
    this.step += 1;
    // the state's bytes are hashed once and kept: a checkpoint fetch of this step serves the same bytes
    const bytes = await this.optimizer.saveState();
    this.optimSnapshot = { step: this.step, bytes };
    return { adapterSha256: adapterDigest(this.stage.params), optimizerSha256: createHash('sha256').update(bytes).digest('hex') };
  }

  /** Drop everything of the step in flight: attempts, committed micro-batches, partial final gradient. */
  private resetStep(): void {
    this.gradients.reset();
    this.optimSnapshot = null;
  }

  /** The coordinator is gone: abandon the step in flight (once the job computing now is done) and
   *  say which steps this host can restore, with each one's adapter digest. */
  async detach(): Promise<KeptOffer> {
    return this.queue.run(0, async () => {
      this.generation++;
      this.resetStep();
      const states = [{ step: this.step, adapterSha256: adapterDigest(this.stage.params) }];
      if (this.previous !== null) states.push({ step: this.previous.step, adapterSha256: await this.previous.digest(this.stage.params) });
      return { runId: this.runId, stageIndex: this.stageIndex, layerStart: this.stage.layerStart, layerEnd: this.stage.layerEnd, states };
    });
  }

  /** Resume under a restarted coordinator at its committed `step`: keep the current state, or roll
   *  back the update applied after it; either way the adapter must hash to `adapterSha256`. */
  async resumeAt(step: number, adapterSha256: string): Promise<{ rolledBack: boolean }> {
    return this.queue.run(0, async () => {
      this.generation++;
      this.resetStep();
      let rolledBack = false;
      if (step !== this.step) {
        const prev = this.previous;
        if (prev === null || prev.step !== step) {
          throw new StaleError(`resume at step ${step}: this peer holds step ${this.step}${prev !== null ? ` and the state of step ${prev.step}` : ' and no earlier state'}`);
        }
        const optimizerState = await prev.restoreInto(this.stage.params);
        await this.optimizer.loadState(optimizerState);
        this.step = step;
        rolledBack = true;
      }
      const got = adapterDigest(this.stage.params);
      if (got !== adapterSha256) {
        throw new IntegrityError(`resume at step ${step}: this stage's adapter hashes to ${got.slice(0, 16)}…, the committed one to ${adapterSha256.slice(0, 16)}…`);
      }
      await this.previous?.dispose();
      this.previous = null;
      return { rolledBack };
    });
  }

  /** Release the kept snapshot (its spill file); the stage itself is disposed by its owner. */
  async dispose(): Promise<void> {
    await this.previous?.dispose();
    this.previous = null;
  }

  /** A chunk of the optimizer state as of the current step (snapshotted on the first chunk so a
   *  paged transfer is consistent). */
  async optimizerChunk(req: OptimizerRequest, opts: JobOptions = {}): Promise<WeightsResponse> {
    this.check(req, 'optimizer');
    if (this.optimSnapshot === null || this.optimSnapshot.step !== this.step) {
      this.optimSnapshot = { step: this.step, bytes: await this.queue.run(0, async () => this.optimizer.saveState(), opts) };
    }
    return serveChunk(this.optimSnapshot.bytes, req.offset, req.length, 'optimizer');
  }

  /** A page of this stage's LoRA tensors (the uploading replica's own), in f32. */
  adapter(req: AdapterRequest): AdapterResponse {
    if (req.runId !== undefined && req.runId !== this.runId) throw new StaleError(`adapter: run ${req.runId} is not this peer's run ${this.runId}`);
    if (req.step !== undefined && req.step !== this.step) throw new StaleError(`adapter: this peer holds step ${this.step}, not step ${req.step}`);
    const params = this.stage.params;
    const page = servePage(params.length, req.from, req.count, 'adapter', (i) => params[i]!.data.byteLength);
    const tensors = [];
    for (let i = page.from; i < page.from + page.count; i++) {
      tensors.push({ name: params[i]!.name, tensor: encodeTensor(params[i]!.data, params[i]!.shape, 'f32', params[i]!.name) });
    }
    const s = this.stage;
    return { step: this.step, total: params.length, adapterSpecJson: null, tensors: tamperAdapter(this.aids, tensors, page.from, { layerStart: s.layerStart, layerEnd: s.layerEnd, isLast: s.isLast }) };
  }
}
