// Spot-check verification of stage computations: which micro-batches are checked (seeded), the
// comparison of two answers (bit for bit on the same CPU backend, within a tolerance derived from the
// backends and the wire codec otherwise), and the referee when they differ; the ban itself is
// coordinator/verdicts.ts's decision.
//
// The step calls one method per stage of a checked micro-batch:
//   verifier.check(stage, call, answer, { primary, replicas }, { signal }) → CheckVerdict
// where `call` is what the stage peer was given (its input, labels, dropout seed, the gradient it
// got back) and `answer` what it returned (hidden state or loss sum, input gradient), both rebuilt
// from the tensors its neighbours received (coordinator/spot-check.ts recalls them). The check
// re-runs the call on a second replica of the stage (`opts.recompute`: spot-check.ts's one-stage
// route) or on the coordinator, which can load a stage itself; a mismatch is refereed by a third
// replica or the coordinator. Only answers the verdict lets count may be committed.
import { createHash } from 'node:crypto';
import { decodeFloat, isDeltaCodec } from '../protocol/tensor.ts';
import type { FloatCodec, WireTensor } from '../protocol/tensor.ts';
import { SwarmError } from '../protocol/errors.ts';
import { judge } from './verdicts.ts';
import type { Ban, Result, Verdict } from './verdicts.ts';

/** The coordinator as the place a call is recomputed (not a peer id: peer ids are base58). */
export const COORDINATOR = 'coordinator';

/** What one stage peer was given for one micro-batch attempt, exactly as it went on the wire (a
 *  recomputation gets the same bytes). */
export interface StageCall {
  step: number;
  mb: number;
  attempt: number;
  batch: number;
  seqLen: number;
  /** stage 0: token ids (batch·seqLen) */
  ids?: WireTensor;
  /** stages > 0: the hidden state it received (batch·seqLen, hidden) */
  hidden?: WireTensor;
  /** last stage: shifted labels */
  labels?: WireTensor;
  dropoutSeed: number;
  /** stages before the last: the activation gradient it received in backward */
  gradOut?: WireTensor;
  /** last stage: the step's loss scale */
  lossScale?: number;
}

/** What it answered, as the next hop (or the coordinator) decoded it. */
export interface StageAnswer {
  hidden?: Float32Array;
  lossSum?: number;
  gradIn?: Float32Array;
}

/** A stage peer's answer from its forward response (hidden or loss sum) and backward response
 *  (input gradient), decoded (the step screened them already). */
export function answerOf(fwd: { hidden?: WireTensor; lossSum?: number }, gradIn: WireTensor | undefined): StageAnswer {
  const a: StageAnswer = {};
  if (fwd.hidden !== undefined) a.hidden = decodeFloat(fwd.hidden, 'the checked hidden state');
  if (fwd.lossSum !== undefined) a.lossSum = fwd.lossSum;
  if (gradIn !== undefined) a.gradIn = decodeFloat(gradIn, 'the checked input gradient');
  return a;
}

/** Run a call again, on a replica (its peer id) or on the coordinator (COORDINATOR). */
export type Recompute = (where: string, stage: number, call: StageCall, opts: { signal: AbortSignal }) => Promise<StageAnswer>;

/** A place's compute backend, for the tolerance: `backend` as in the join capabilities, `deviceName`
 *  tells one CPU build or GPU model from another. */
export interface DeviceOf { backend: string; deviceName: string }

export interface VerifierInit {
  /** fraction of micro-batches checked, in [0, 1] */
  fraction: number;
  /** which micro-batches are checked is a function of (secret, step, mb): the coordinator's own
   *  secret (random per process), never told to volunteers, so none can tell a checked micro-batch
   *  from another while it computes */
  secret: string;
  /** the wire codec activations and gradients travel in */
  codec: FloatCodec;
  recompute: Recompute;
  /** whether the coordinator can recompute stage s itself (it holds the weights and the adapter) */
  coordinatorCan: (stage: number) => boolean;
  /** the backend of a peer id, or of COORDINATOR */
  deviceOf: (where: string) => DeviceOf | undefined;
}

export interface CheckPeers {
  /** the peer whose answer is checked */
  primary: string;
  /** every live replica of the stage (the primary among them or not) */
  replicas: readonly string[];
}

export interface CheckVerdict {
  /** the primary's answer may count (it was confirmed, or a checker that disagreed lost) */
  counts: boolean;
  /** who to ban, with the evidence */
  bans: Ban[];
  /** peers a wrong result or accusation counts against without a ban */
  strikes: string[];
  /** where the call was recomputed, in order */
  checkedBy: string[];
  /** in words, for the run's events */
  detail: string;
}

/** Relative tolerance (of the reference's largest magnitude) between two backends that are not the
 *  same CPU build: fp32 GEMMs summed in another order through a stage's layers (docs/security.md). */
export const CROSS_BACKEND_RTOL = 1e-3;
/** What the wire codec adds across backends: both answers are rounded by it, each by up to its
 *  error bound of protocol/tensor.ts (bf16: 8 mantissa bits; int8 absmax/254, int4 absmax/14, nf4
 *  0.1519 absmax, int2 absmax/3 per block). A low-rank codec has no elementwise bound (the best
 *  rank-K error depends on the tensor): across backends it is compared within the tensor's own
 *  magnitude only, which catches gross errors and nothing subtle (docs/security.md). On the same CPU
 *  backend every codec compares bit for bit: the codecs are deterministic. */
export const CODEC_RTOL: Readonly<Record<FloatCodec, number>> = {
  f32: 0, bf16: 2 * 2 ** -9, int8: 2 / 254, int4: 2 / 14, nf4: 2 * 0.1519, int2: 2 / 3, lowrank32: 1, lowrank8: 1,
  // the delta codecs: the checked answer is the receiver's warm reconstruction (a SAME row is last
  // visit's value, up to τ·rms off), the recomputation reaches the coordinator cold; no elementwise
  // bound relates the two, so, as lowrank, within twice the tensor's magnitude: gross errors only
  aq4: 2, aq2: 2,
};

/** 0 (bit for bit) when both run the same CPU backend build; else the cross-backend tolerance plus
 *  the codec's rounding. An unknown device is never exact. */
export function toleranceFor(a: DeviceOf | undefined, b: DeviceOf | undefined, codec: FloatCodec): number {
  // a delta codec's answers are never bit-comparable, even on one backend (see CODEC_RTOL)
  if (isDeltaCodec(codec)) return (sameCpu(a, b) ? 0 : CROSS_BACKEND_RTOL) + CODEC_RTOL[codec];
  if (a !== undefined && b !== undefined && a.backend === 'cpu' && b.backend === 'cpu' && a.deviceName === b.deviceName) return 0;
  return CROSS_BACKEND_RTOL + CODEC_RTOL[codec];
}

function sameCpu(a: DeviceOf | undefined, b: DeviceOf | undefined): boolean {
  return a !== undefined && b !== undefined && a.backend === 'cpu' && b.backend === 'cpu' && a.deviceName === b.deviceName;
}

function sameArray(a: Float32Array, b: Float32Array, rtol: number): boolean {
  if (a.length !== b.length) return false;
  if (rtol === 0) {
    const ua = new Uint32Array(a.buffer, a.byteOffset, a.length), ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
    for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return false;
    return true;
  }
  let max = 0;
  for (let i = 0; i < b.length; i++) max = Math.max(max, Math.abs(b[i]!));
  const tol = rtol * max;
  for (let i = 0; i < a.length; i++) if (!(Math.abs(a[i]! - b[i]!) <= tol)) return false;
  return true;
}

/** Two answers to one call agree: every field present in either is present in both and equal
 *  (bit for bit at rtol 0, else within rtol of the larger magnitude). */
export function sameAnswer(a: StageAnswer, b: StageAnswer, rtol: number): boolean {
  for (const k of ['hidden', 'gradIn'] as const) {
    const x = a[k], y = b[k];
    if ((x === undefined) !== (y === undefined)) return false;
    if (x !== undefined && !sameArray(x, y!, rtol)) return false;
  }
  if ((a.lossSum === undefined) !== (b.lossSum === undefined)) return false;
  if (a.lossSum !== undefined) {
    const x = a.lossSum, y = b.lossSum!;
    if (rtol === 0 ? x !== y : !(Math.abs(x - y) <= rtol * Math.max(Math.abs(x), Math.abs(y)))) return false;
  }
  return true;
}

/** Is micro-batch mb of step `step` checked: a keyed hash below the fraction (1 checks all, 0 none). */
export function isSelected(secret: string | number, step: number, mb: number, fraction: number): boolean {
  if (fraction >= 1) return true;
  if (fraction <= 0) return false;
  const h = createHash('sha256').update(`verify:${secret}:${step}:${mb}`).digest();
  return h.readUInt32LE(0) / 2 ** 32 < fraction;
}

/** A check that failed: the answer of `peerId` may not count (or the verifier is misconfigured). */
export class VerifyError extends SwarmError {
  override name = 'VerifyError';
  readonly peerId: string | undefined;
  constructor(message: string, peerId?: string) {
    super(message);
    this.peerId = peerId;
  }
}

/** What the checks cost and found so far (bench and status). */
export interface VerifyStats {
  checks: number;
  mismatches: number;
  bans: number;
  unverified: number;
  /** wall time spent recomputing, ms */
  recomputeMs: number;
}

export class Verifier {
  private readonly o: VerifierInit;
  readonly stats: VerifyStats = { checks: 0, mismatches: 0, bans: 0, unverified: 0, recomputeMs: 0 };

  constructor(o: VerifierInit) {
    if (!(o.fraction >= 0 && o.fraction <= 1)) throw new VerifyError(`verify_fraction must be in [0, 1], got ${o.fraction}`);
    this.o = o;
  }

  get fraction(): number { return this.o.fraction; }

  /** whether micro-batch mb of `step` is checked */
  selected(step: number, mb: number): boolean {
    return isSelected(this.o.secret, step, mb, this.o.fraction);
  }

  private rtol(a: string, b: string): number {
    return toleranceFor(this.o.deviceOf(a), this.o.deviceOf(b), this.o.codec);
  }

  /** Recompute at the first of `candidates` that answers; null when none does. */
  private async recomputeAt(recompute: Recompute, candidates: readonly string[], stage: number, call: StageCall, signal: AbortSignal, tried: string[]): Promise<{ where: string; answer: StageAnswer } | null> {
    for (const where of candidates) {
      tried.push(where);
      const t0 = performance.now();
      try {
        const answer = await recompute(where, stage, call, { signal });
        return { where, answer };
      } catch (e) {
        if (signal.aborted) throw signal.reason;
        // a checker that fails is no evidence either way: the next one is asked
      } finally {
        this.stats.recomputeMs += performance.now() - t0;
      }
    }
    return null;
  }

  /** Check the primary's answer to `call` at `stage` (see the file comment). */
  async check(stage: number, call: StageCall, answer: StageAnswer, peers: CheckPeers, opts: { signal: AbortSignal; recompute?: Recompute }): Promise<CheckVerdict> {
    this.stats.checks++;
    const { primary } = peers;
    const what = `stage ${stage} of step ${call.step} micro-batch ${call.mb} (attempt ${call.attempt})`;
    // the checker: another replica, chosen by micro-batch so checks spread over them; the coordinator last
    const others = peers.replicas.filter((id) => id !== primary);
    const rot = others.length > 0 ? (call.step * 7919 + call.mb) % others.length : 0;
    const replicaOrder = [...others.slice(rot), ...others.slice(0, rot)];
    const coord = this.o.coordinatorCan(stage) ? [COORDINATOR] : [];
    const tried: string[] = [];
    const recompute: Recompute = (where, s, c, o) => (where !== COORDINATOR && opts.recompute !== undefined ? opts.recompute(where, s, c, o) : this.o.recompute(where, s, c, o));
    const first = await this.recomputeAt(recompute, [...replicaOrder, ...coord], stage, call, opts.signal, tried);
    if (first === null) {
      this.stats.unverified++;
      // at verify_fraction 1 nothing unverified may count; at lower fractions the unchecked majority
      // of micro-batches counts anyway, so one that could not be checked is no worse
      const counts = this.o.fraction < 1;
      return { counts, bans: [], strikes: [], checkedBy: [], detail: `${what}: no replica or coordinator could recompute it (${tried.length > 0 ? `tried ${tried.join(', ')}` : 'none to ask'})` };
    }
    const checkedBy = [first.where];
    if (sameAnswer(answer, first.answer, this.rtol(primary, first.where))) {
      return { counts: true, bans: [], strikes: [], checkedBy, detail: `${what}: ${first.where} agrees` };
    }
    this.stats.mismatches++;
    const results: Result[] = [{ peerId: primary, value: 'primary' }, { peerId: first.where, value: 'checker' }];
    let reference: string | undefined = first.where === COORDINATOR ? 'checker' : undefined;
    if (reference === undefined) {
      // the referee: a third replica, else the coordinator
      const rest = [...replicaOrder.filter((id) => id !== first.where), ...coord];
      const ref = await this.recomputeAt(recompute, rest, stage, call, opts.signal, tried);
      if (ref !== null) {
        checkedBy.push(ref.where);
        const asPrimary = sameAnswer(answer, ref.answer, this.rtol(primary, ref.where));
        const asChecker = sameAnswer(first.answer, ref.answer, this.rtol(first.where, ref.where));
        const value = asPrimary && !asChecker ? 'primary' : asChecker && !asPrimary ? 'checker' : asPrimary ? 'primary' : 'referee';
        if (ref.where === COORDINATOR) reference = value;
        else results.push({ peerId: ref.where, value });
      }
    }
    const v: Verdict = judge({ kind: 'disagreement', what, results, reference });
    return this.outcome(v, primary, checkedBy, what);
  }

  private outcome(v: Verdict, primary: string, checkedBy: string[], what: string): CheckVerdict {
    switch (v.kind) {
      case 'ban': {
        this.stats.bans += v.bans.length;
        const counts = !v.bans.some((b) => b.peerId === primary);
        return { counts, bans: v.bans, strikes: v.strikes ?? [], checkedBy, detail: `${what}: ${v.bans.map((b) => `${b.peerId} loses (${b.reason})`).join('; ')}` };
      }
      case 'clear':
        // a referee agreeing with neither side of a disagreement cannot clear it
        return { counts: true, bans: [], strikes: v.strikes, checkedBy, detail: `${what}: agreed after refereeing` };
      case 'unresolved':
        return { counts: false, bans: [], strikes: [], checkedBy, detail: `${what}: ${v.peers.join(', ')} disagree and nothing referees them; it runs again elsewhere` };
      case 'confirm':
        throw new VerifyError(`${what}: a disagreement never asks for a confirmation`);
    }
  }
}
