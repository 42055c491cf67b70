// One micro-batch attempt at this stage, as the coordinator's control message describes it: the
// activation from the previous stage's peer (or the token ids), forward, the activation to the next
// stage's peer, its gradient back, backward, the gradient on to the previous peer (protocol/hop.ts).
// Tensors come only from the peers the route names and are screened here, on arrival.
import type { Multiaddr } from '@multiformats/multiaddr';
import { parseMultiaddr } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { floatSha256, openHop, sendHop } from '../protocol/hop.ts';
import type { HopInbox, HopKind, HopReceived, HopSender } from '../protocol/hop.ts';
import type { MicroBatchRequest, MicroBatchResponse, RecallRequest, RecallResponse } from '../protocol/messages.ts';
import { SchemaError, TimeoutError } from '../protocol/errors.ts';
import type { Logger } from '../protocol/log.ts';
import type { StageHost } from './stage-host.ts';
import { poisoned } from './test-aids.ts';

export interface PipelineDeps {
  node: SwarmNode;
  inbox: HopInbox;
  host: StageHost;
  /** where a referee attempt sends the checked tensor, and the id that must answer there */
  coordinator: { addrs: Multiaddr[]; peerId: string };
  log: Logger;
}

type Failure = NonNullable<MicroBatchResponse['failure']>;

/** A hop failure caused by another peer: reported to the coordinator, which decides. */
function failureOf(e: Error, peerId: string): Failure | null {
  const kind = e.name === 'BadOutputError' ? 'bad-tensor' : e.name === 'TimeoutError' ? 'timeout' : e.name === 'HopError' ? 'hop' : null;
  return kind === null ? null : { peerId, kind, message: e.message.slice(0, 4000) };
}

/** Check a control message against this stage: its route must put this peer at its stage and name
 *  the neighbours' addresses it will send to. */
function checkRoute(req: MicroBatchRequest, host: StageHost, self: string, coordinator: string): void {
  const s = req.stageIndex, S = host.numStages;
  // a spot check's one-stage route names the coordinator as both neighbours (its address is known)
  const toCoordinator = (i: number) => req.route[i] === coordinator;
  if (req.route.length !== S) throw new SchemaError(`microbatch: a route of ${req.route.length} peers for ${S} stages`);
  if (req.route[s] !== self) throw new SchemaError(`microbatch: the route puts ${req.route[s]} at stage ${s}, not this peer`);
  if (s < S - 1 && req.referee !== 'act' && !toCoordinator(s + 1) && (req.nextAddrs ?? []).length === 0) throw new SchemaError('microbatch: no address for the next stage');
  if (s > 0 && req.referee !== 'grad' && !toCoordinator(s - 1) && (req.prevAddrs ?? []).length === 0) throw new SchemaError('microbatch: no address for the previous stage');
  if (s === 0 && req.ids === undefined) throw new SchemaError('microbatch: the first stage needs token ids');
  if (s === S - 1 && (req.labels === undefined || req.lossScale === undefined)) throw new SchemaError('microbatch: the last stage needs labels and lossScale');
  if (req.referee !== undefined && ((req.referee === 'act' && s === S - 1) || (req.referee === 'grad' && s === 0))) {
    throw new SchemaError(`microbatch: stage ${s} sends no ${req.referee === 'act' ? 'activation' : 'activation gradient'} to referee`);
  }
}

/** Run the attempt here; a failure caused by another peer comes back as the response's `failure`,
 *  one of this stage's own as an error. */
export async function runMicroBatch(d: PipelineDeps, req: MicroBatchRequest, opts: { signal: AbortSignal }): Promise<MicroBatchResponse> {
  const { host, inbox, node } = d;
  const signal = opts.signal;
  host.check(req, 'microbatch');
  const self = node.peerId.toString();
  checkRoute(req, host, self, d.coordinator.peerId);
  // parsed before anything runs: a refused request leaves no trace
  const nextAddrs = (req.nextAddrs ?? []).map(parseMultiaddr), prevAddrs = (req.prevAddrs ?? []).map(parseMultiaddr);
  const s = req.stageIndex, S = host.numStages;
  const T = req.batch * req.seqLen, C = host.stage.config.hiddenSize;
  const base = { runId: req.runId, step: req.step, mb: req.mb, attempt: req.attempt };
  const job = req.jobTimeoutMs;
  const res: MicroBatchResponse = {};
  const what = (kind: HopKind, from: number) => `the stage ${from} ${kind === 'act' ? 'activation' : 'activation gradient'} of step ${req.step} micro-batch ${req.mb}`;

  /** receive `kind` from stage `from`, waiting at most `jobs` compute jobs' time */
  const receive = async (kind: HopKind, from: number, jobs: number): Promise<HopReceived | Failure> => {
    const peer = req.route[from]!;
    const key = `${kind}:${from}`;
    try {
      // the lower bound: on activations always, on activation gradients only of trained micro-batches
      const floor = kind === 'act' || req.trained === true;
      const delta = host.codecState.hop('recv', kind, peer, req, d.coordinator.peerId);
      const r = await inbox.receive({ ...base, kind }, { from: peer, shape: [T, C], delta, judge: (rms) => host.screen.judge(key, rms, `${what(kind, from)} from ${peer}`, { floor }) },
        { signal, timeoutMs: job * Math.max(1, jobs) });
      if (floor) host.screen.accept(key, r.rms);
      host.keepReceived(req, kind, r.data);
      res[kind === 'act' ? 'actSha256' : 'gradSha256'] = floatSha256(r.data);
      return r;
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      const f = failureOf(e as Error, peer);
      if (f === null) throw e;
      return f;
    }
  };
  /** open the hop of `kind` to the route's stage `to` (or the referee) now, while this stage still
   *  computes its tensor: the dial, the stream's negotiation and the receiver's first credit (about two
   *  round trips) overlap the compute instead of following it */
  const open = (kind: HopKind, to: number): { hop: HopSender; peer: string } => {
    const referee = req.referee === kind;
    const peer = referee ? d.coordinator.peerId : req.route[to]!;
    const addrs = referee || peer === d.coordinator.peerId ? d.coordinator.addrs : kind === 'act' ? nextAddrs : prevAddrs;
    const hop = openHop(node, addrs, { ...base, kind }, [T, C], {
      signal, timeoutMs: job, codec: host.wireCodec, expectPeer: peer, log: d.log, mutate: host.poisonsOutput ? poisoned : undefined, digest: true,
      delta: referee ? undefined : host.codecState.hop('send', kind, peer, req, d.coordinator.peerId),
    });
    return { hop, peer };
  };
  /** send `data` on the opened hop of `kind` */
  const send = async (kind: HopKind, h: { hop: HopSender; peer: string }, data: Float32Array): Promise<Failure | null> => {
    try {
      const sent = await h.hop.send(host.tamper(data));
      if (sent.sha256 !== null) res[kind === 'act' ? 'sentActSha256' : 'sentGradSha256'] = sent.sha256;
      return null;
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      const f = failureOf(e as Error, h.peer);
      if (f === null) throw e; // this stage's own fault (e.g. a non-finite value it made)
      return f;
    }
  };

  /** this stage's own job (queue wait included) under the per-job deadline: one that runs past it
   *  fails the attempt here, as a timeout of this peer (a queued job is dropped at the deadline) */
  const own = async <R>(what: string, fn: (o: { signal: AbortSignal }) => Promise<R>): Promise<R> => {
    const deadline = AbortSignal.timeout(job);
    try {
      const r = await fn({ signal: AbortSignal.any([signal, deadline]) });
      if (deadline.aborted) throw new TimeoutError(`${what} of step ${req.step} micro-batch ${req.mb} took longer than the ${job} ms per job`);
      return r;
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      if (deadline.aborted) throw new TimeoutError(`${what} of step ${req.step} micro-batch ${req.mb} was not done within the ${job} ms per job`);
      throw e;
    }
  };

  // hops not yet sent when this stage fails on its own are aborted (the receiver sees a broken hop
  // from this peer at once); when the attempt fails because of another peer they are left to the
  // receiver, which drops them when the coordinator cancels the attempt, as before they were opened
  let actHop: { hop: HopSender; peer: string } | undefined, gradHop: { hop: HopSender; peer: string } | undefined;
  try {
    if (s < S - 1) actHop = open('act', s + 1);
    let hidden: Float32Array | undefined;
    if (s > 0) {
      // the activation comes after the forward of stages 0..s-1
      const r = await receive('act', s - 1, s);
      if (!('data' in r)) return { failure: r };
      hidden = r.data;
      res.actRms = r.rms;
      // the previous stage expects the gradient once it has sent this activation
      if (req.train && req.referee !== 'act') gradHop = open('grad', s - 1);
    }
    const out = await own('forward', (o) => host.forward({ ...base, stageIndex: s, batch: req.batch, seqLen: req.seqLen, ids: req.ids, labels: req.labels, dropoutSeed: req.dropoutSeed, train: req.train, segments: req.segments, hidden }, o));
    let gradIn: Float32Array | undefined;
    if (s === S - 1) {
      res.lossSum = out.lossSum;
      res.tokens = out.tokens;
      if (!req.train) return res; // an evaluation forward keeps nothing to run backward on
      ({ gradIn } = await own('backward', (o) => host.backward({ ...base, stageIndex: s, lossScale: req.lossScale }, o)));
    } else {
      const f = await send('act', actHop!, out.hidden!);
      if (f !== null) return { ...res, failure: f };
      if (req.referee === 'act' || !req.train) return res;
      // the gradient comes after the forward and backward of stages s+1..S-1
      const r = await receive('grad', s + 1, 2 * (S - 1 - s));
      if (!('data' in r)) return { ...res, failure: r };
      res.gradRms = r.rms;
      ({ gradIn } = await own('backward', (o) => host.backward({ ...base, stageIndex: s, gradOut: r.data }, o)));
    }
    if (s > 0) {
      const f = await send('grad', gradHop!, gradIn!);
      if (f !== null) return { ...res, failure: f };
    }
    return res;
  } catch (e) {
    actHop?.hop.cancel(e as Error);
    gradHop?.hop.cancel(e as Error);
    throw e;
  }
}

/** A spot check's recall: send the tensor of `kind` that attempt `req` received here to the
 *  coordinator (f32, so it arrives bit for bit), answering with its digest. */
export async function recallTensor(d: PipelineDeps, req: RecallRequest, opts: { signal: AbortSignal; timeoutMs: number }): Promise<RecallResponse> {
  const data = d.host.received(req);
  const C = d.host.stage.config.hiddenSize;
  await sendHop(d.node, d.coordinator.addrs, { runId: req.runId, step: req.step, mb: req.mb, attempt: req.attempt, kind: req.kind }, [data.length / C, C], data, {
    signal: opts.signal, timeoutMs: opts.timeoutMs, codec: 'f32', expectPeer: d.coordinator.peerId, log: d.log,
  });
  return { sha256: floatSha256(data) };
}
