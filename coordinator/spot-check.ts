// A spot check of one micro-batch attempt, after its compute and before its commit (docs/security.md):
// the tensors each stage received on hops are recalled to the coordinator and held to the digests
// their sender and receiver reported; each stage's call is rebuilt from them (the ids and labels the
// coordinator sent itself, the activation from stage s-1, the gradient from s+1) and re-run on another
// replica of the stage as a one-stage route whose neighbours are the coordinator, or on the
// coordinator's own stage (coordinator/referee.ts), and compared (coordinator/verify.ts). The
// checker's attempt is discarded, never committed.
import { floatSha256, sendHop } from '../protocol/hop.ts';
import type { HopKind } from '../protocol/hop.ts';
import type { MicroBatchResponse } from '../protocol/messages.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { SwarmError } from '../protocol/errors.ts';
import { encodeTensor } from '../protocol/tensor.ts';
import { trainedOf } from './attempt.ts';
import type { AttemptContext, AttemptSpec } from './attempt.ts';
import { judge } from './verdicts.ts';
import type { Ban } from './verdicts.ts';
import type { Recompute, StageAnswer, StageCall, Verifier } from './verify.ts';

export interface SpotCheckContext extends AttemptContext {
  verifier: Verifier;
  /** the coordinator's node: it sends a checker its input by hop */
  node: SwarmNode;
}

export interface SpotCheckResult {
  /** the attempt may be committed */
  counts: boolean;
  bans: Ban[];
  strikes: string[];
  /** the peer whose answer may not count (absent: nobody could be blamed) */
  loser?: string;
  detail: string;
}

const sentField = { act: 'sentActSha256', grad: 'sentGradSha256' } as const;
const recvField = { act: 'actSha256', grad: 'gradSha256' } as const;

/** A recall that failed (the peer is gone, refused, or its hop broke): the attempt cannot be checked,
 *  and the failure is that peer's, as any failed request of an attempt. */
export class RecallError extends SwarmError {
  override name = 'RecallError';
  readonly peerId: string;
  constructor(peerId: string, message: string) {
    super(message);
    this.peerId = peerId;
  }
}

/** The tensor of `kind` that route[s] received in attempt a, sent to the coordinator by a hop. */
async function recall(ctx: SpotCheckContext, a: AttemptSpec, s: number, kind: HopKind, signal: AbortSignal): Promise<{ data: Float32Array; claimed: string }> {
  const id = a.route[s]!;
  const T = a.m.batch * a.m.seqLen;
  const stop = new AbortController();
  const sig = AbortSignal.any([signal, stop.signal]);
  const got = ctx.hops.receive({ runId: ctx.runId, ...a.key, kind }, { from: id, shape: [T, ctx.hiddenSize] }, { signal: sig, timeoutMs: ctx.computeTimeoutMs });
  const claimed = ctx.client.recall(ctx.peers.addrs(id), a.key, kind, { signal: sig });
  try {
    const [r, sha] = await Promise.all([got, claimed]);
    return { data: r.data, claimed: sha };
  } catch (e) {
    stop.abort(e);
    await Promise.allSettled([got, claimed]);
    if (signal.aborted) throw signal.reason;
    throw new RecallError(id, `recalling the ${kind} it received in step ${a.key.step} micro-batch ${a.key.mb} attempt ${a.key.attempt}: ${(e as Error).name}: ${(e as Error).message}`);
  }
}

/** Recompute stage s's call on replica `where`: a control message for a fresh attempt whose route
 *  names the coordinator as both neighbours; the coordinator sends the input activation and the
 *  gradient, and receives the replica's activation and input gradient (node/pipeline.ts unchanged). */
function replicaRecompute(ctx: SpotCheckContext, a: AttemptSpec, tensors: { act: Float32Array[]; grad: Float32Array[] }, nextAttempt: () => number): Recompute {
  return async (where, s, call, { signal }) => {
    const S = a.route.length, T = a.m.batch * a.m.seqLen, C = ctx.hiddenSize;
    const key = { step: a.key.step, mb: a.key.mb, attempt: nextAttempt() };
    const hk = (kind: HopKind) => ({ runId: ctx.runId, ...key, kind });
    const addrs = ctx.peers.addrs(where);
    const stop = new AbortController();
    const sig = AbortSignal.any([signal, stop.signal]);
    const wait = ctx.computeTimeoutMs * 2;
    const send = (kind: HopKind, data: Float32Array) => sendHop(ctx.node, addrs, hk(kind), [T, C], data, { signal: sig, timeoutMs: ctx.computeTimeoutMs, codec: 'f32', expectPeer: where });
    // expected before anything is sent, so neither output waits for its expectation
    const actOut = s < S - 1 ? ctx.hops.receive(hk('act'), { from: where, shape: [T, C] }, { signal: sig, timeoutMs: wait }) : null;
    const gradOut = s > 0 ? ctx.hops.receive(hk('grad'), { from: where, shape: [T, C] }, { signal: sig, timeoutMs: wait }) : null;
    const res = ctx.client.microBatch(addrs, {
      ...key, stageIndex: s, route: a.route.map((_, i) => (i === s ? where : ctx.coordinatorId)), batch: call.batch, seqLen: call.seqLen,
      ids: call.ids, labels: call.labels, lossScale: call.lossScale, dropoutSeed: call.dropoutSeed, train: true, trained: trainedOf(a),
      // a packed row: the recompute attends inside each example as the checked stage did
      segments: a.m.segments ? encodeTensor(a.m.segments, [a.m.segments.length], 'i32', 'segments') : undefined,
    }, S, { signal: sig });
    const flow = (async (): Promise<StageAnswer> => {
      const ans: StageAnswer = {};
      if (s > 0) await send('act', tensors.act[s]!);
      if (actOut !== null) {
        ans.hidden = (await actOut).data;
        await send('grad', tensors.grad[s]!);
      }
      if (gradOut !== null) ans.gradIn = (await gradOut).data;
      return ans;
    })();
    try {
      const [r, ans] = await Promise.all([res, flow]);
      if (r.failure !== undefined) throw new SwarmError(`the checker ${where} failed: ${r.failure.kind}: ${r.failure.message}`);
      if (s === S - 1) ans.lossSum = r.lossSum;
      return ans;
    } catch (e) {
      stop.abort(e);
      await Promise.allSettled([res, flow, actOut, gradOut]);
      throw e;
    } finally {
      // the check's attempt never commits on the checker
      await ctx.client.discard(addrs, key, { signal }).catch(() => undefined);
    }
  };
}

/** Check attempt `a` (its stages answered `responses`, in route order). */
export async function spotCheck(ctx: SpotCheckContext, a: AttemptSpec, responses: readonly MicroBatchResponse[], nextAttempt: () => number, signal: AbortSignal): Promise<SpotCheckResult> {
  const S = a.route.length;
  const what = `step ${a.key.step} micro-batch ${a.key.mb} attempt ${a.key.attempt}`;
  // act[s]: what stage s received from s-1 (stage s-1's answer); grad[s]: what s received from s+1
  const tensors: { act: Float32Array[]; grad: Float32Array[] } = { act: [], grad: [] };
  const bans: Ban[] = [], strikes: string[] = [];
  let disputed: string | null = null;
  // tensors of one kind share a hop key: one recall of each kind at a time
  const recallKind = async (kind: HopKind) => {
    for (let s = kind === 'act' ? 1 : 0; s < (kind === 'act' ? S : S - 1); s++) {
      const receiver = a.route[s]!, sender = a.route[kind === 'act' ? s - 1 : s + 1]!;
      const r = await recall(ctx, a, s, kind, signal);
      const got = floatSha256(r.data);
      const own = responses[s]![recvField[kind]];
      const sent = responses[kind === 'act' ? s - 1 : s + 1]![sentField[kind]];
      const tname = `the ${kind === 'act' ? 'activation' : 'activation gradient'} of stage ${kind === 'act' ? s - 1 : s + 1} in ${what}`;
      if (got !== r.claimed || got !== own) {
        // the receiver's upload contradicts what it reported: direct evidence against it
        const v = judge({ kind: 'bad-upload', peerId: receiver, what: `its recalled copy of ${tname} does not hash to the digest it reported` });
        if (v.kind === 'ban') bans.push(...v.bans);
      } else if (sent !== own) {
        // sender and receiver disagree about the same hop: one of them lies, and nothing here tells which
        disputed ??= `${sender} and ${receiver} report different digests of ${tname}`;
        strikes.push(sender, receiver);
      }
      tensors[kind][s] = r.data;
    }
  };
  await Promise.all([recallKind('act'), recallKind('grad')]);
  if (bans.length > 0) return { counts: false, bans, strikes, loser: bans[0]!.peerId, detail: `${what}: ${bans.map((b) => `${b.peerId}: ${b.reason}`).join('; ')}` };
  if (disputed !== null) return { counts: false, bans, strikes, detail: `${what}: ${disputed}; it runs again` };
  const T = a.m.batch * a.m.seqLen, C = ctx.hiddenSize;
  const f32 = (x: Float32Array | undefined, name: string) => (x === undefined ? undefined : encodeTensor(x, [T, C], 'f32', name));
  const recompute = replicaRecompute(ctx, a, tensors, nextAttempt);
  const details: string[] = [];
  for (let s = 0; s < S; s++) {
    const call: StageCall = {
      ...a.key, batch: a.m.batch, seqLen: a.m.seqLen, dropoutSeed: a.dropoutSeed,
      ids: s === 0 ? encodeTensor(a.m.ids, [T], 'i32', 'ids') : undefined,
      labels: s === S - 1 ? encodeTensor(a.m.labels, [T], 'i32', 'labels') : undefined,
      lossScale: s === S - 1 ? a.lossScale : undefined,
      hidden: f32(tensors.act[s], 'hidden'), gradOut: f32(tensors.grad[s], 'gradOut'),
    };
    const answer: StageAnswer = {};
    if (s < S - 1) answer.hidden = tensors.act[s + 1];
    if (s > 0) answer.gradIn = tensors.grad[s - 1];
    if (s === S - 1) answer.lossSum = responses[s]!.lossSum;
    const v = await ctx.verifier.check(s, call, answer, { primary: a.route[s]!, replicas: ctx.peers.liveReplicas(s) }, { signal, recompute });
    bans.push(...v.bans);
    strikes.push(...v.strikes);
    details.push(v.detail);
    if (!v.counts) return { counts: false, bans, strikes, loser: a.route[s], detail: v.detail };
  }
  return { counts: true, bans, strikes, detail: details.join('; ') };
}
