// One micro-batch attempt along a route, as control messages: every stage of the route gets its part
// at once (the tensors go stage to stage, protocol/hop.ts), the reports come back, and a failure is
// blamed on one peer. A receiver's bad-tensor report is only an accusation: the referee re-runs the
// micro-batch with the accused peer sending its tensor to the coordinator, and the coordinator decides.
import { REPORT_GRACE_MS } from '../protocol/constants.ts';
import { SwarmError, TimeoutError } from '../protocol/errors.ts';
import { HopError } from '../protocol/hop.ts';
import type { HopInbox, HopKind } from '../protocol/hop.ts';
import type { MicroBatchRequest, MicroBatchResponse } from '../protocol/messages.ts';
import type { AttemptKey, StagePeerClient } from '../protocol/stage-client.ts';
import { encodeTensor } from '../protocol/tensor.ts';
import { labelTokensOf } from '../engine/train/step-plan.ts';
import type { MicroBatch } from '../engine/train/step-plan.ts';
import type { PeerRegistry } from './peers.ts';
import type { Route } from './routes.ts';
import type { Screens } from './screening.ts';

/** A report that another peer's tensor failed a screen (not yet a verdict). */
export interface Accusation {
  accuser: string;
  accused: string;
  /** the accused's stage and what it sent */
  stage: number;
  kind: HopKind;
  message: string;
}

export type AttemptOutcome =
  | { ok: true; lossSum: number; responses: MicroBatchResponse[] }
  | { ok: false; blame: string; cause: Error; accusation?: Accusation };

/** A receiver reported a tensor the referee then found within every bound. */
export class FalseReportError extends SwarmError {
  override name = 'FalseReportError';
}

export interface AttemptContext {
  runId: string;
  client: StagePeerClient;
  peers: PeerRegistry;
  screens: Screens;
  hiddenSize: number;
  computeTimeoutMs: number;
  /** the referee's end of hop streams */
  hops: HopInbox;
  coordinatorId: string;
}

export interface AttemptSpec {
  m: MicroBatch;
  route: Route;
  key: AttemptKey;
  lossScale: number;
  dropoutSeed: number;
}

export type Settled = { s: number; res?: MicroBatchResponse; err?: Error };

/** Whether the micro-batch has trained positions: its activation gradients must not be near zero
 *  (the screens' lower bound, protocol/screen.ts). */
export function trainedOf(a: AttemptSpec): boolean {
  return labelTokensOf(a.m) > 0 && a.lossScale > 0;
}

/** The control message for stage s. */
function requestFor(ctx: AttemptContext, a: AttemptSpec, s: number, referee?: HopKind): Omit<MicroBatchRequest, 'runId' | 'jobTimeoutMs'> {
  const S = a.route.length, T = a.m.batch * a.m.seqLen;
  const addrs = (id: string | undefined) => (id === undefined ? undefined : ctx.peers.addrs(id).map((x) => x.toString()));
  return {
    ...a.key, stageIndex: s, route: a.route, batch: a.m.batch, seqLen: a.m.seqLen,
    ids: s === 0 ? encodeTensor(a.m.ids, [T], 'i32', 'ids') : undefined,
    labels: s === S - 1 ? encodeTensor(a.m.labels, [T], 'i32', 'labels') : undefined,
    segments: a.m.segments ? encodeTensor(a.m.segments, [a.m.segments.length], 'i32', 'segments') : undefined,
    lossScale: s === S - 1 ? a.lossScale : undefined,
    dropoutSeed: a.dropoutSeed, train: true,
    nextAddrs: s < S - 1 && referee !== 'act' ? addrs(a.route[s + 1]) : undefined,
    prevAddrs: s > 0 && referee !== 'grad' ? addrs(a.route[s - 1]) : undefined,
    referee, trained: trainedOf(a), samples: a.m.samples !== undefined ? [...a.m.samples] : undefined,
  };
}

/** Send stages [0, upTo] their control messages; resolve with every reply once all settled. After
 *  the first failure the others are cancelled — after REPORT_GRACE_MS when it is a broken hop (a
 *  receiver's bad-tensor report outranks the refusal it causes at the sender); `stopWhen` cancels
 *  them all. */
async function fanOut(ctx: AttemptContext, a: AttemptSpec, upTo: number, signal: AbortSignal, referee?: { stage: number; kind: HopKind }, stopWhen?: Promise<unknown>): Promise<{ settled: Settled[]; cancelled: Error }> {
  const S = a.route.length;
  const cancel = new AbortController();
  const cancelled = new SwarmError(`step ${a.key.step} micro-batch ${a.key.mb} attempt ${a.key.attempt} failed elsewhere`);
  const sig = AbortSignal.any([signal, cancel.signal]);
  const settled: Settled[] = [];
  let grace: NodeJS.Timeout | undefined;
  const failed = (x: Settled) => x.err !== undefined || x.res?.failure !== undefined;
  void stopWhen?.finally(() => cancel.abort(cancelled));
  await Promise.all(Array.from({ length: upTo + 1 }, async (_, s) => {
    const x: Settled = { s };
    try {
      x.res = await ctx.client.microBatch(ctx.peers.addrs(a.route[s]!), requestFor(ctx, a, s, referee?.stage === s ? referee.kind : undefined), S, { signal: sig });
    } catch (e) {
      x.err = e as Error;
    }
    settled.push(x);
    // a broken hop may be the sender's side of a receiver's bad-tensor verdict: wait for that report;
    // any other failure names its culprit already
    if (failed(x) && grace === undefined) grace = setTimeout(() => cancel.abort(cancelled), x.res?.failure?.kind === 'hop' ? REPORT_GRACE_MS : 0);
  }));
  clearTimeout(grace);
  cancel.abort(cancelled);
  if (signal.aborted) throw signal.reason;
  return { settled, cancelled };
}

/** Who failed the attempt: an accusation first, then the earliest failure — a stage's own (its
 *  request failed) or the peer a stage reported (a hop that broke or never came). */
export function blameOf(a: AttemptSpec, settled: Settled[], cancelled: Error): AttemptOutcome | null {
  const route = a.route;
  for (const x of settled) {
    const f = x.res?.failure;
    if (f?.kind !== 'bad-tensor') continue;
    const accuser = route[x.s]!;
    const stage = f.peerId === route[x.s - 1] ? x.s - 1 : f.peerId === route[x.s + 1] ? x.s + 1 : -1;
    // an accusation of a peer that is not its neighbour on this route is the accuser's own fault
    if (stage < 0) return { ok: false, blame: accuser, cause: new FalseReportError(`it reported a bad tensor from ${f.peerId}, which is not its neighbour on the route`) };
    return { ok: false, blame: f.peerId, cause: new SwarmError(f.message), accusation: { accuser, accused: f.peerId, stage, kind: stage < x.s ? 'act' : 'grad', message: f.message } };
  }
  // a stage whose own job ran past its deadline aborts the hops it had opened, so its neighbour's
  // report of the broken hop may come first: the peer's own timeout is then the cause (it counts
  // towards marking the peer slow; a broken hop does not)
  const ownTimeout = (peer: string): Error | undefined => {
    const y = settled.find((z) => z.s === route.indexOf(peer));
    const g = y?.res?.failure;
    if (g?.kind === 'timeout' && g.peerId === peer) return new TimeoutError(g.message);
    return y?.err?.name === 'TimeoutError' ? y.err : undefined;
  };
  for (const x of settled) {
    if (x.err !== undefined && x.err !== cancelled) return { ok: false, blame: route[x.s]!, cause: x.err };
    const f = x.res?.failure;
    if (f !== undefined) {
      if (!route.includes(f.peerId)) return { ok: false, blame: route[x.s]!, cause: new FalseReportError(`it blamed ${f.peerId}, which is not on the route`) };
      return { ok: false, blame: f.peerId, cause: f.kind === 'timeout' ? new TimeoutError(f.message) : ownTimeout(f.peerId) ?? new HopError(f.peerId, f.message) };
    }
  }
  return null;
}

/** Run the attempt along the whole route. */
export async function runAttempt(ctx: AttemptContext, a: AttemptSpec, signal: AbortSignal): Promise<AttemptOutcome> {
  const S = a.route.length;
  const { settled, cancelled } = await fanOut(ctx, a, S - 1, signal);
  const blame = blameOf(a, settled, cancelled);
  if (blame !== null) return blame;
  let lossSum: number | undefined;
  const responses: MicroBatchResponse[] = [];
  const trained = trainedOf(a);
  for (const x of settled) {
    const r = x.res!;
    responses[x.s] = r;
    if (x.s === S - 1) lossSum = r.lossSum;
    // the receivers' view of what they accepted: the referee's reference (gradients only where the
    // lower bound applies, as on the receivers)
    if (r.actRms !== undefined) ctx.screens.outputs.accept(`act:${x.s - 1}`, r.actRms);
    if (r.gradRms !== undefined && trained) ctx.screens.outputs.accept(`grad:${x.s + 1}`, r.gradRms);
  }
  if (lossSum === undefined) return { ok: false, blame: a.route[S - 1]!, cause: new SwarmError('the last stage reported no loss') };
  return { ok: true, lossSum, responses };
}

export type Verdict =
  | { bad: true; message: string }
  | { bad: false; failure?: { blame: string; cause: Error } };

/** The coordinator checks the accused tensor itself: attempt `a.key` (a fresh attempt number) runs
 *  the stages the tensor needs, with the accused peer sending it to the coordinator, where the same
 *  screens (shape, finiteness, RMS against what receivers reported accepting) judge it. */
export async function referee(ctx: AttemptContext, a: AttemptSpec, acc: Accusation, signal: AbortSignal): Promise<Verdict> {
  const S = a.route.length;
  const T = a.m.batch * a.m.seqLen;
  const upTo = acc.kind === 'act' ? acc.stage : S - 1;
  const jobs = acc.kind === 'act' ? acc.stage + 1 : 2 * S - 1 - acc.stage;
  const screenKey = `${acc.kind}:${acc.stage}`;
  const what = `the stage ${acc.stage} ${acc.kind === 'act' ? 'activation' : 'activation gradient'} of step ${a.key.step} micro-batch ${a.key.mb}`;
  // the accused's request settles only once its send did, so when every request has settled and no
  // tensor came, none will: stop waiting then
  const noTensor = new AbortController();
  const got = ctx.hops.receive({ runId: ctx.runId, ...a.key, kind: acc.kind }, {
    from: acc.accused, shape: [T, ctx.hiddenSize], judge: (rms) => ctx.screens.outputs.judge(screenKey, rms, `${what} from ${acc.accused}`, { floor: acc.kind === 'act' || trainedOf(a) }),
  }, { signal: AbortSignal.any([signal, noTensor.signal]), timeoutMs: ctx.computeTimeoutMs * jobs + REPORT_GRACE_MS });
  const verdict: Promise<Verdict | Error> = got.then(() => ({ bad: false }) as Verdict, (e: Error) => (e.name === 'BadOutputError' ? { bad: true, message: e.message } : e));
  const { settled, cancelled } = await fanOut(ctx, a, upTo, signal, { stage: acc.stage, kind: acc.kind }, verdict);
  noTensor.abort(new HopError(acc.accused, `${what}: the accused peer's attempt ended without sending it to the referee`));
  const v = await verdict;
  if (!(v instanceof Error)) return v;
  if (signal.aborted) throw signal.reason;
  // the tensor never came: the attempt's own failure decides (the accused, most likely)
  const b = blameOf(a, settled, cancelled);
  return { bad: false, failure: b !== null && !b.ok ? { blame: b.blame, cause: b.cause } : { blame: acc.accused, cause: v } };
}
