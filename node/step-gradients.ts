// The step's LoRA gradients on one stage, kept by attempt: each uncommitted attempt's gradient apart,
// committed micro-batches folded into the step sum in micro-batch order, the final gradient as its pages arrive.
import type { Stage } from '../engine/types.ts';
import { AuthError, StaleError } from '../protocol/errors.ts';

/** One micro-batch attempt this stage ran forward (and maybe backward) for. */
export interface Attempt { mb: number; attempt: number; forwardDone: boolean; grads: Float32Array[] | null; batch: number; seqLen: number }

/** What the book needs of the stage: fresh gradient buffers, and releasing an attempt's kept input. */
export type GradientStage = Pick<Stage, 'newGrads' | 'release'>;

/** The key of an attempt, and of its kept input in the stage. */
export function attemptKey(step: number, mb: number, attempt: number): string {
  return `${step}:${mb}:${attempt}`;
}

/** How long a replica keeps asking a partner that has not had its own reduce request of the step yet
 *  (the coordinator sends every replica's at once): past it, the partner's reduce is not coming (it
 *  failed, or the coordinator gave the round up). */
export const ROSTER_WAIT_MS = 30_000;
/** The words of the refusal a pull gets before the partner's own reduce arrived (its partner retries). */
export const NOT_YET_REDUCED = 'this peer has had no reduce request of step';

/** Pull a partner's step sum, asking again (20 ms, growing to 250 ms apart) while the partner answers
 *  that its own reduce of the step has not arrived yet, for at most `waitMs`. */
export async function pullWhenNamed<T>(pull: () => Promise<T>, signal: AbortSignal | undefined, waitMs = ROSTER_WAIT_MS): Promise<T> {
  const until = Date.now() + waitMs;
  for (let delay = 20; ; delay = Math.min(250, delay * 2)) {
    try {
      return await pull();
    } catch (e) {
      const err = e as Error;
      if (err.name !== 'StaleError' || !err.message.includes(NOT_YET_REDUCED) || Date.now() + delay > until) throw e;
    }
    signal?.throwIfAborted();
    await new Promise((r) => setTimeout(r, delay));
  }
}

export class StepGradients {
  private readonly stage: GradientStage;
  private readonly attempts = new Map<string, Attempt>();
  /** committed micro-batch gradients of the current step, folded in micro-batch order at collect */
  private readonly committed = new Map<number, { attempt: number; grads: Float32Array[] }>();
  private stepSum: Float32Array[] | null = null;
  private finalGrads: Float32Array[] | null = null;
  /** params [0, covered) of finalGrads hold this step's final gradient (meaningful while finalGrads is set) */
  private covered = 0;
  /** the light tail: the replicas the coordinator named for this step's reduce (who may pull this
   *  peer's step sum), and the reduced gradient the step's apply runs on */
  private roster: { step: number; ids: ReadonlySet<string> } | null = null;
  private reduced: { step: number; grads: Float32Array[] } | null = null;

  constructor(stage: GradientStage) {
    this.stage = stage;
  }

  /** attempts forwarded and not yet committed or dropped */
  get inflight(): number { return this.attempts.size; }
  /** micro-batches committed this step */
  get committedCount(): number { return this.committed.size; }

  get(key: string): Attempt | undefined { return this.attempts.get(key); }

  /** `a` is still the attempt kept under `key` (not released, superseded or reset meanwhile) */
  holds(key: string, a: Attempt): boolean { return this.attempts.get(key) === a; }

  /** A forward for an attempt older than (or as old as) one held for its micro-batch is stale. */
  checkCurrent(mb: number, attempt: number): void {
    for (const a of this.attempts.values()) {
      if (a.mb === mb && a.attempt >= attempt) throw new StaleError(`forward: micro-batch ${mb} attempt ${attempt} is superseded by attempt ${a.attempt}`);
    }
  }

  /** Start an attempt's forward: older attempts of its micro-batch, which never committed, are
   *  released (their route was abandoned); a training attempt is kept under `key` for its backward. */
  open(key: string, mb: number, attempt: number, shape: { batch: number; seqLen: number }, train: boolean): Attempt {
    for (const [k, a] of this.attempts) {
      if (a.mb !== mb) continue;
      this.stage.release(k);
      this.attempts.delete(k);
    }
    const a: Attempt = { mb, attempt, forwardDone: false, grads: null, batch: shape.batch, seqLen: shape.seqLen };
    if (train) this.attempts.set(key, a);
    return a;
  }

  /** Forget a failed attempt, if it is still the one held; `releaseInput` also drops its kept input. */
  drop(key: string, a: Attempt, releaseInput: boolean): void {
    if (!this.holds(key, a)) return;
    if (releaseInput) this.stage.release(key);
    this.attempts.delete(key);
  }

  /** commit: true. The attempt's gradient joins the step sum; a micro-batch counts once. */
  commit(step: number, mb: number, attempt: number): void {
    const key = attemptKey(step, mb, attempt);
    const a = this.attempts.get(key);
    if (this.committed.has(mb)) throw new StaleError(`commit: micro-batch ${mb} of step ${step} was already committed`);
    if (a === undefined || a.grads === null) throw new StaleError(`commit: micro-batch ${mb} attempt ${attempt} has no gradient here`);
    this.committed.set(mb, { attempt, grads: a.grads });
    this.stepSum = null; // a re-run micro-batch committed after a collect joins the next fold
    this.attempts.delete(key);
  }

  /** commit: false. Discard an abandoned attempt, or take back a committed one whose partner stage lost it. */
  discard(step: number, mb: number, attempt: number): void {
    const key = attemptKey(step, mb, attempt);
    if (this.attempts.has(key)) { this.stage.release(key); this.attempts.delete(key); }
    const c = this.committed.get(mb);
    if (c !== undefined && c.attempt === attempt) {
      // taking back a micro-batch after a collect (its partner replica was banned): re-fold later
      this.committed.delete(mb);
      this.stepSum = null;
    }
  }

  /** Sum of committed micro-batch gradients, folded in micro-batch order so the sum is deterministic. */
  async stepSumOf(opts: { signal?: AbortSignal } = {}): Promise<Float32Array[]> {
    if (this.stepSum !== null) return this.stepSum;
    const sum = this.stage.newGrads();
    for (const mb of [...this.committed.keys()].sort((x, y) => x - y)) {
      opts.signal?.throwIfAborted();
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

  /** params [0, n) of the final gradient have arrived (0 before its first page) */
  get finalCovered(): number { return this.finalGrads === null ? 0 : this.covered; }

  /** Keep a decoded page of the final gradient, params [from, from + page.length); `from` must not
   *  leave a gap (pages arrive in order, a page may be sent again). Returns the whole final gradient. */
  putFinalPage(from: number, page: readonly Float32Array[]): Float32Array[] {
    const end = Math.max(this.finalCovered, from + page.length);
    if (this.finalGrads === null) this.finalGrads = this.stage.newGrads();
    for (let k = 0; k < page.length; k++) this.finalGrads[from + k]!.set(page[k]!);
    this.covered = end;
    return this.finalGrads;
  }

  /** The coordinator named these replicas (peer ids) for step `step`'s reduce. */
  setRoster(step: number, ids: Iterable<string>): void {
    this.roster = { step, ids: new Set(ids) };
  }

  /** A partner replica may pull this peer's step sum of `step` only once this peer's own reduce of
   *  that step named it. Nothing waits here (a stranger cannot hold a handler): a pull that comes before
   *  this peer's reduce request is refused with NOT_YET_REDUCED and the partner asks again
   *  (pullWhenNamed). */
  allowPull(peerId: string, step: number): void {
    if (this.roster?.step !== step) throw new StaleError(`aggregate collect: ${NOT_YET_REDUCED} ${step} yet`);
    if (!this.roster.ids.has(peerId)) throw new AuthError(`aggregate collect: peer ${peerId} is not a replica the coordinator named for step ${step}'s reduce`);
  }

  /** The step's reduced gradient (replicas summed in the coordinator's order), for its apply. */
  setReduced(step: number, grads: Float32Array[]): void { this.reduced = { step, grads }; }
  reducedOf(step: number): Float32Array[] {
    if (this.reduced?.step !== step) throw new StaleError(`aggregate step: no reduced gradient of step ${step} here (reduce first)`);
    return this.reduced.grads;
  }

  /** Drop everything of the step in flight: attempts (and their kept inputs), committed micro-batches,
   *  the step sum, a partial final gradient, the reduce's roster and result. */
  reset(): void {
    this.reduced = null;
    this.roster = null;
    this.finalGrads = null;
    this.stepSum = null;
    this.committed.clear();
    for (const k of this.attempts.keys()) this.stage.release(k);
    this.attempts.clear();
  }
}

/** The replicas' step gradients summed in the given order, into fresh arrays (the inputs are left as
 *  they are: a partner may still be pulling this peer's own): the first copied, each next one added
 *  element by element in float32, the same operations as the coordinator's sumReplicas, so every
 *  replica of a stage gets the same bits. */
export function sumInOrder(replicas: readonly (readonly Float32Array[])[]): Float32Array[] {
  if (replicas.length === 0) throw new Error('sumInOrder: no replicas');
  const out = replicas[0]!.map((g) => Float32Array.from(g));
  for (let r = 1; r < replicas.length; r++) {
    const rg = replicas[r]!;
    if (rg.length !== out.length) throw new Error(`sumInOrder: replica ${r} has ${rg.length} tensors, replica 0 has ${out.length}`);
    for (let i = 0; i < out.length; i++) {
      const o = out[i]!, g = rg[i]!;
      if (g.length !== o.length) throw new Error(`sumInOrder: tensor ${i} of replica ${r} has ${g.length} elements, expected ${o.length}`);
      for (let j = 0; j < o.length; j++) o[j]! += g[j]!;
    }
  }
  return out;
}
