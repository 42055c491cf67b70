// The shard host: serves forward/backward for one stage, keeps each uncommitted attempt's LoRA
// gradient apart, folds committed ones into the step sum, and applies the aggregated optimizer step.
import type { Stage } from '../engine/types.ts';
import type {
  AggregateRequest, AggregateResponse, AdapterRequest, AdapterResponse, Assignment, BackwardRequest,
  BackwardResponse, CommitRequest, ForwardRequest, ForwardResponse, JoinRequest, OptimizerRequest, WeightsResponse,
} from '../protocol/messages.ts';
import { decodeFloat, decodeInt, encodeTensor } from '../protocol/tensor.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { IntegrityError, SchemaError, StaleError, TensorError } from '../protocol/errors.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import { StepSnapshot } from './step-snapshot.ts';
import type { SnapshotOptions } from './step-snapshot.ts';
import { poisoned, testAids } from './test-aids.ts';

/** What a host that lost its coordinator offers the restarted one (join.kept). */
export type KeptOffer = NonNullable<JoinRequest['kept']>;

/** The optimizer a stage applies to its own LoRA tensors (the trainer's optimizers implement it). */
export interface ShardOptimizer {
  step(grads: Float32Array[], lr: number): Promise<void> | void;
  /** the full optimizer state (moments, step count) in the trainer's checkpoint format */
  saveState(): Promise<Uint8Array> | Uint8Array;
  /** replace the whole state (moments, step count) with bytes saveState produced: a rollback */
  loadState(bytes: Uint8Array): Promise<void> | void;
}

/** Snapshots above 64 MiB (or above the paged optimizer's resident budget) go to disk. */
export const SNAPSHOT_RESIDENT_BYTES = 64 * 1024 * 1024;

/** Runs one job at a time, backward before forward: a backward frees a kept input, a forward adds one. */
class PriorityRunner {
  private readonly queues: Array<Array<() => Promise<void>>> = [[], []];
  private running = false;
  get busy(): boolean { return this.running; }
  get queued(): number { return this.queues[0]!.length + this.queues[1]!.length; }

  run<T>(priority: 0 | 1, fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queues[priority]!.push(async () => { try { resolve(await fn()); } catch (e) { reject(e as Error); } });
      void this.pump();
    });
  }

  private async pump(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      for (;;) {
        const job = this.queues[0]!.shift() ?? this.queues[1]!.shift();
        if (job === undefined) break;
        await job();
      }
    } finally {
      this.running = false;
    }
  }
}

interface Attempt { mb: number; attempt: number; forwardDone: boolean; grads: Float32Array[] | null; batch: number; seqLen: number }

export class StageHost {
  readonly stage: Stage;
  readonly runId: string;
  readonly stageIndex: number;
  readonly wireCodec: FloatCodec;
  /** optimizer steps applied so far = the step currently being trained */
  step: number;
  private readonly optimizer: ShardOptimizer;
  private readonly runner = new PriorityRunner();
  private readonly attempts = new Map<string, Attempt>();
  /** committed micro-batch gradients of the current step, folded in micro-batch order at collect */
  private readonly committed = new Map<number, { attempt: number; grads: Float32Array[] }>();
  private stepSum: Float32Array[] | null = null;
  private finalGrads: Float32Array[] | null = null;
  /** params [0, finalCovered) of finalGrads hold this step's final gradient (meaningful while finalGrads is set) */
  private finalCovered = 0;
  /** tokens/s through this stage, measured over forward+backward compute */
  private computeMs = 0;
  private computeTokens = 0;
  /** the state from before the last optimizer update (a restarted coordinator may not have committed it) */
  private previous: StepSnapshot | null = null;
  private readonly snapshotOptions: SnapshotOptions;
  /** bumped when the step in flight is abandoned (coordinator lost): work started before is dropped */
  private generation = 0;
  /** testing aids (node/test-aids.ts): an artificial delay per job, poisoned outputs */
  private readonly aids = testAids();

  constructor(stage: Stage, a: Assignment, optimizer: ShardOptimizer, snapshot: Partial<SnapshotOptions> = {}) {
    this.stage = stage;
    this.runId = a.runId;
    this.stageIndex = a.stageIndex;
    this.wireCodec = a.wireCodec;
    this.step = a.step;
    this.optimizer = optimizer;
    this.snapshotOptions = { dir: snapshot.dir ?? null, residentBytes: snapshot.residentBytes ?? SNAPSHOT_RESIDENT_BYTES };
  }

  /** the step of the kept pre-update state, null before the first update */
  get previousStep(): number | null { return this.previous?.step ?? null; }

  get inflight(): number { return this.attempts.size; }
  get busy(): boolean { return this.runner.busy; }
  get tokensPerSecond(): number { return this.computeMs > 0 ? this.computeTokens / (this.computeMs / 1000) : 0; }

  private check(req: { runId: string; step: number; stageIndex?: number }, what: string): void {
    if (req.runId !== this.runId) throw new StaleError(`${what}: run ${req.runId} is not this peer's run ${this.runId}`);
    if (req.step !== this.step) throw new StaleError(`${what}: step ${req.step} is not the current step ${this.step}`);
    if (req.stageIndex !== undefined && req.stageIndex !== this.stageIndex) {
      throw new SchemaError(`${what}: addressed to stage ${req.stageIndex}, this peer holds stage ${this.stageIndex}`);
    }
  }

  private key(step: number, mb: number, attempt: number): string {
    return `${step}:${mb}:${attempt}`;
  }

  async forward(req: ForwardRequest): Promise<ForwardResponse> {
    this.check(req, 'forward');
    const C = this.stage.config.hiddenSize;
    const T = req.batch * req.seqLen;
    const key = this.key(req.step, req.mb, req.attempt);
    for (const a of this.attempts.values()) {
      if (a.mb === req.mb && a.attempt >= req.attempt) throw new StaleError(`forward: micro-batch ${req.mb} attempt ${req.attempt} is superseded by attempt ${a.attempt}`);
    }
    // every input is checked before anything changes: a refused request leaves no trace
    const V = this.stage.config.vocabSize;
    const input: Parameters<Stage['forward']>[0] = { key, batch: req.batch, seqLen: req.seqLen, dropoutSeed: req.dropoutSeed };
    if (this.stage.isFirst) {
      if (req.ids === undefined) throw new SchemaError('forward: the first stage needs token ids');
      input.ids = decodeInt(req.ids, 'forward.ids', [T]);
      for (let i = 0; i < T; i++) if (input.ids[i]! < 0 || input.ids[i]! >= V) throw new TensorError(`forward.ids: token ${input.ids[i]} at ${i} is outside the vocabulary [0, ${V})`);
    } else {
      if (req.hidden === undefined) throw new SchemaError(`forward: stage ${this.stageIndex} needs hidden states`);
      input.hidden = decodeFloat(req.hidden, 'forward.hidden', [T, C]);
    }
    if (this.stage.isLast) {
      if (req.labels === undefined) throw new SchemaError('forward: the last stage needs labels');
      input.labels = decodeInt(req.labels, 'forward.labels', [T]);
      for (let i = 0; i < T; i++) {
        const l = input.labels[i]!;
        if (l !== -100 && (l < 0 || l >= V)) throw new TensorError(`forward.labels: label ${l} at ${i} is neither -100 nor in the vocabulary [0, ${V})`);
      }
    }
    for (const [k, a] of this.attempts) {
      if (a.mb !== req.mb) continue;
      this.stage.release(k); // an older attempt that never committed: its route was abandoned
      this.attempts.delete(k);
    }
    const a: Attempt = { mb: req.mb, attempt: req.attempt, forwardDone: false, grads: null, batch: req.batch, seqLen: req.seqLen };
    if (req.train) this.attempts.set(key, a);
    const generation = this.generation;
    let out: Awaited<ReturnType<Stage['forward']>>;
    try {
      out = await this.runner.run(1, async () => {
        // released (commit: false) while it waited in the queue — e.g. the coordinator timed out on
        // it: computing it anyway would only delay the jobs behind it
        if (generation !== this.generation) throw new StaleError(`forward: step ${req.step} was abandoned (coordinator lost) while micro-batch ${req.mb} waited`);
        if (req.train && this.attempts.get(key) !== a) throw new StaleError(`forward: micro-batch ${req.mb} attempt ${req.attempt} of step ${req.step} was released while it waited`);
        const t0 = performance.now();
        const r = await this.stage.forward(input, { train: req.train });
        if (this.aids.delayMs > 0) await new Promise((res) => setTimeout(res, this.aids.delayMs));
        this.computeMs += performance.now() - t0;
        this.computeTokens += T;
        return r;
      });
    } catch (e) {
      // a forward that failed keeps nothing: the attempt cannot run backward
      if (this.attempts.get(key) === a) this.attempts.delete(key);
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
    const hidden = encodeTensor(out.hidden, [T, C], this.wireCodec, 'forward.hidden');
    return { hidden: this.aids.badOutput === 'nan' ? poisoned(hidden) : hidden };
  }

  async backward(req: BackwardRequest): Promise<BackwardResponse> {
    this.check(req, 'backward');
    const key = this.key(req.step, req.mb, req.attempt);
    const a = this.attempts.get(key);
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
      args.gradOut = decodeFloat(req.gradOut, 'backward.gradOut', [T, C]);
    }
    // a separate gradient per attempt: it only joins the step sum when the coordinator commits it
    const grads = this.stage.newGrads();
    a.grads = grads;
    let gradIn: Float32Array | undefined;
    try {
      ({ gradIn } = await this.runner.run(0, async () => {
        if (this.attempts.get(key) !== a) throw new StaleError(`backward: micro-batch ${req.mb} attempt ${req.attempt} of step ${req.step} was released while it waited`);
        const t0 = performance.now();
        const r = await this.stage.backward(key, grads, args);
        if (this.aids.delayMs > 0) await new Promise((res) => setTimeout(res, this.aids.delayMs));
        this.computeMs += performance.now() - t0;
        return r;
      }));
    } catch (e) {
      // a half-computed gradient must never be committed: the attempt is gone (the coordinator retries)
      if (this.attempts.get(key) === a) { this.stage.release(key); this.attempts.delete(key); }
      throw e;
    }
    if (this.stage.isFirst) return {};
    if (gradIn === undefined) throw new Error(`stage ${this.stageIndex} backward returned no input gradient`);
    const g = encodeTensor(gradIn, [T, C], this.wireCodec, 'backward.gradIn');
    return { gradIn: this.aids.badOutput === 'nan' ? poisoned(g) : g };
  }

  commit(req: CommitRequest): void {
    this.check(req, 'commit');
    const key = this.key(req.step, req.mb, req.attempt);
    const a = this.attempts.get(key);
    if (!req.commit) {
      // discard an abandoned attempt, or take back a committed one whose partner stage lost it
      if (a !== undefined) { this.stage.release(key); this.attempts.delete(key); }
      const c = this.committed.get(req.mb);
      if (c !== undefined && c.attempt === req.attempt) {
        // taking back a micro-batch after a collect (its partner replica was banned): re-fold later
        this.committed.delete(req.mb);
        this.stepSum = null;
      }
      return;
    }
    if (this.committed.has(req.mb)) throw new StaleError(`commit: micro-batch ${req.mb} of step ${req.step} was already committed`);
    if (a === undefined || a.grads === null) throw new StaleError(`commit: micro-batch ${req.mb} attempt ${req.attempt} has no gradient here`);
    this.committed.set(req.mb, { attempt: req.attempt, grads: a.grads });
    this.stepSum = null; // a re-run micro-batch committed after a collect joins the next fold
    this.attempts.delete(key);
  }

  /** Sum of committed micro-batch gradients, folded in micro-batch order so the sum is deterministic. */
  private async foldStepSum(): Promise<Float32Array[]> {
    if (this.stepSum !== null) return this.stepSum;
    const sum = this.stage.newGrads();
    for (const mb of [...this.committed.keys()].sort((x, y) => x - y)) {
      const g = this.committed.get(mb)!.grads;
      for (let i = 0; i < sum.length; i++) {
        const s = sum[i]!, gi = g[i]!;
        for (let j = 0; j < s.length; j++) s[j]! += gi[j]!;
      }
      // yield between micro-batches: a large stage's sum must not hold heartbeats back
      await new Promise((r) => setImmediate(r));
    }
    this.stepSum = sum;
    return sum;
  }

  async aggregate(req: AggregateRequest): Promise<AggregateResponse> {
    this.check(req, 'aggregate');
    const params = this.stage.params;
    const total = params.length;
    if (req.phase === 'collect') {
      if (req.from > total) throw new SchemaError(`aggregate collect: page starts at ${req.from}, the stage has ${total} params`);
      const sum = await this.foldStepSum();
      const grads = [];
      for (let i = req.from; i < Math.min(total, req.from + req.count); i++) {
        // the step sum always travels in f32: it is small and clipping needs its exact norm
        grads.push(encodeTensor(sum[i]!, params[i]!.shape, 'f32', `grad ${params[i]!.name}`));
      }
      return { total, grads, microBatches: this.committed.size };
    }
    if (req.from + req.count > total) throw new SchemaError(`aggregate apply: params [${req.from}, ${req.from + req.count}) outside [0, ${total})`);
    if (req.grads === undefined || req.grads.length !== req.count) throw new SchemaError(`aggregate apply: expected ${req.count} gradients, got ${req.grads?.length ?? 0}`);
    // pages arrive in order (a page may be sent again); the last one needs every param covered
    const covered = this.finalGrads === null ? 0 : this.finalCovered;
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
    if (this.finalGrads === null) this.finalGrads = this.stage.newGrads();
    for (let k = 0; k < req.count; k++) this.finalGrads[req.from + k]!.set(page[k]!);
    this.finalCovered = end;
    if (req.last === true) {
      const g = this.finalGrads;
      await this.runner.run(0, async () => {
        // keep the state of this step: the coordinator may die before it commits the update
        const snap = await StepSnapshot.take(this.step, this.stage.params, await this.optimizer.saveState(), this.snapshotOptions);
        await this.previous?.dispose();
        this.previous = snap;
        await this.optimizer.step(g, req.lr!);
        this.resetStep();
        this.step += 1;
      });
    }
    return { total };
  }

  /** Drop everything of the step in flight: attempts, committed micro-batches, partial final gradient. */
  private resetStep(): void {
    this.finalGrads = null;
    this.stepSum = null;
    this.committed.clear();
    for (const k of this.attempts.keys()) this.stage.release(k);
    this.attempts.clear();
    this.optimSnapshot = null;
  }

  /** The coordinator is gone: abandon the step in flight (once the job computing now is done) and
   *  say which steps this host can restore, with each one's adapter digest. */
  async detach(): Promise<KeptOffer> {
    return this.runner.run(0, async () => {
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
    return this.runner.run(0, async () => {
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

  private optimSnapshot: { step: number; bytes: Uint8Array } | null = null;

  /** A chunk of the optimizer state as of the current step (snapshotted on the first chunk so a
   *  paged transfer is consistent). */
  async optimizerChunk(req: OptimizerRequest): Promise<WeightsResponse> {
    this.check(req, 'optimizer');
    if (this.optimSnapshot === null || this.optimSnapshot.step !== this.step) {
      this.optimSnapshot = { step: this.step, bytes: await this.runner.run(0, async () => this.optimizer.saveState()) };
    }
    const b = this.optimSnapshot.bytes;
    if (req.offset > b.length) throw new SchemaError(`optimizer: offset ${req.offset} past the state's ${b.length} bytes`);
    return { sizeBytes: b.length, bytes: b.subarray(req.offset, Math.min(b.length, req.offset + req.length)) };
  }

  adapter(req: AdapterRequest): AdapterResponse {
    if (req.runId !== undefined && req.runId !== this.runId) throw new StaleError(`adapter: run ${req.runId} is not this peer's run ${this.runId}`);
    if (req.step !== undefined && req.step !== this.step) throw new StaleError(`adapter: this peer holds step ${this.step}, not step ${req.step}`);
    const params = this.stage.params;
    const end = Math.min(params.length, req.from + req.count);
    const tensors = [];
    for (let i = req.from; i < end; i++) {
      tensors.push({ name: params[i]!.name, tensor: encodeTensor(params[i]!.data, params[i]!.shape, 'f32', params[i]!.name) });
    }
    return { step: this.step, total: params.length, adapterSpecJson: null, tensors };
  }
}
