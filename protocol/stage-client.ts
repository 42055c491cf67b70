// The typed client of a stage peer: every request the coordinator makes of a volunteer, with timeouts from one config and pages through the pager.
import { request } from './net.ts';
import type { DialTarget, ProtoName, SwarmNode } from './net.ts';
import type { HeartbeatResponse, MicroBatchRequest, MicroBatchResponse, Req, Res } from './messages.ts';
import type { WireTensor } from './tensor.ts';
import { planPages, readChunks, readPages } from './pager.ts';
import { PAGE_TENSORS } from './constants.ts';
import { silentLogger } from './log.ts';
import type { Logger } from './log.ts';

/** How long each kind of request may take. */
export interface StageClientTimeouts {
  /** compute-class requests: one compute job (a micro-batch's per-job hop deadline), gradient collect
   *  and apply, optimizer state */
  computeTimeoutMs: number;
  /** commits and adapter uploads */
  controlTimeoutMs: number;
  /** the periodic heartbeat */
  heartbeatTimeoutMs: number;
  /** the short heartbeat that checks a peer right after it failed a request */
  probeTimeoutMs: number;
  /** best-effort notices the peer may miss: discarding an attempt, finish and release */
  noticeTimeoutMs: number;
}

export interface CallOptions { signal?: AbortSignal }

/** Which attempt of which micro-batch a commit or discard is about. */
export interface AttemptKey { step: number; mb: number; attempt: number }

export interface StagePeerClientInit {
  node: SwarmNode;
  runId: string;
  timeouts: StageClientTimeouts;
  /** one line per request (net.ts request); default silent */
  log?: Logger;
}

export interface CollectedGradient {
  /** the stage's summed gradient, one tensor per LoRA parameter in stage order */
  grads: WireTensor[];
  /** committed micro-batches folded into it */
  microBatches: number;
}

/** What a replica answers to `reduce`: Σ g² of the reduced gradient (absent: not finite) and of its
 *  own step gradient (NaN: not finite), or the partner whose gradient it could not take. */
export interface ReducedGradient {
  microBatches: number;
  sumSq?: number;
  ownSumSq: number;
  /** Σ g² of each replica's gradient as this peer summed it (request order; NaN: not finite) */
  partsSumSq: number[];
  failed?: { peerId: string; message: string; bad: boolean };
}

/** What a replica reports after its optimizer step (absent from a peer that does not report them). */
export interface AppliedDigests { adapterSha256?: string; optimizerSha256?: string }

/** A request cancelled through the caller's signal rejects with the signal's reason, never as a
 *  timeout, so a stopping caller can tell its own abort from a peer's failure. */
export class StagePeerClient {
  private readonly init: StagePeerClientInit;
  private readonly log: Logger;

  constructor(init: StagePeerClientInit) {
    this.init = init;
    this.log = init.log ?? silentLogger;
  }

  get runId(): string { return this.init.runId; }

  /** The same client writing its request lines to another logger (one namespace per component). */
  withLog(log: Logger): StagePeerClient {
    return new StagePeerClient({ ...this.init, log });
  }

  private async call<P extends ProtoName>(peer: DialTarget, proto: P, msg: Req<P>, timeoutMs: number, opts: CallOptions): Promise<Res<P>> {
    try {
      return await request(this.init.node, peer, proto, msg, { timeoutMs, signal: opts.signal, log: this.log });
    } catch (e) {
      if (opts.signal?.aborted === true) throw opts.signal.reason;
      throw e;
    }
  }

  /** One micro-batch attempt at one stage of its route: control only (the tensors go stage to stage).
   *  The stage waits at most jobTimeoutMs per compute job for each hop input; this request's own
   *  deadline is the backstop for a route of S stages (2·S jobs and the hops between them). */
  microBatch(peer: DialTarget, req: Omit<MicroBatchRequest, 'runId' | 'jobTimeoutMs'>, numStages: number, opts: CallOptions = {}): Promise<MicroBatchResponse> {
    const job = this.init.timeouts.computeTimeoutMs;
    return this.call(peer, 'microbatch', { runId: this.init.runId, ...req, jobTimeoutMs: job }, job * (2 * numStages + 1), opts);
  }

  /** The attempt is done on every stage: the peer folds its LoRA gradient into the step sum. */
  async commit(peer: DialTarget, key: AttemptKey, opts: CallOptions = {}): Promise<void> {
    await this.call(peer, 'commit', { runId: this.init.runId, ...key, commit: true }, this.init.timeouts.controlTimeoutMs, opts);
  }

  /** The attempt will never commit: the peer drops what it kept for it. */
  async discard(peer: DialTarget, key: AttemptKey, opts: CallOptions = {}): Promise<void> {
    await this.call(peer, 'commit', { runId: this.init.runId, ...key, commit: false }, this.init.timeouts.noticeTimeoutMs, opts);
  }

  /** Spot check: the peer sends the tensor of `kind` it received in attempt `key` to the coordinator
   *  by a hop (receive it on the coordinator's HopInbox); resolves to the sha256 it claims for it. */
  async recall(peer: DialTarget, key: AttemptKey, kind: 'act' | 'grad', opts: CallOptions = {}): Promise<string> {
    const res = await this.call(peer, 'recall', { runId: this.init.runId, ...key, kind }, this.init.timeouts.computeTimeoutMs, opts);
    return res.sha256;
  }

  /** The stage's summed gradient of `step`, every page of it. */
  async collect(peer: DialTarget, step: number, opts: CallOptions = {}): Promise<CollectedGradient> {
    let microBatches = 0;
    const grads = await readPages(async (from, signal) => {
      const res = await this.call(peer, 'aggregate', { runId: this.init.runId, step, phase: 'collect', from, count: PAGE_TENSORS },
        this.init.timeouts.computeTimeoutMs, { signal });
      microBatches = res.microBatches ?? 0;
      return { total: res.total, items: res.grads ?? [] };
    }, `step ${step} gradient`, opts);
    return { grads, microBatches };
  }

  /** Send the step's final gradient (one tensor per parameter, stage order) in pages; the last page
   *  makes the peer run its optimizer step with `lr`. Resolves to the digests the peer reports after it. */
  async apply(peer: DialTarget, step: number, grads: readonly WireTensor[], lr: number, opts: CallOptions = {}): Promise<AppliedDigests> {
    const pages = planPages(grads.map((g) => g.bytes.length));
    let last: Res<'aggregate'> | null = null;
    for (let i = 0; i < pages.length; i++) {
      opts.signal?.throwIfAborted();
      const { from, count } = pages[i]!;
      last = await this.call(peer, 'aggregate', {
        runId: this.init.runId, step, phase: 'apply', from, count, grads: grads.slice(from, from + count), lr, last: i === pages.length - 1,
      }, this.init.timeouts.computeTimeoutMs, opts);
    }
    return { adapterSha256: last?.adapterSha256, optimizerSha256: last?.optimizerSha256 };
  }

  /** The light tail's first round: the peer sums the step gradients of `replicas` (peer-id order,
   *  itself among them) pulling the others' from them, and answers the float64 sums of squares. */
  async reduce(peer: DialTarget, step: number, replicas: ReadonlyArray<{ peerId: string; addrs: string[] }>, opts: CallOptions = {}): Promise<ReducedGradient> {
    const res = await this.call(peer, 'aggregate', { runId: this.init.runId, step, phase: 'reduce', from: 0, count: 0, replicas: [...replicas] },
      // its own pulls are compute-class requests, one per partner (each paged)
      this.init.timeouts.computeTimeoutMs * Math.max(2, replicas.length), opts);
    return {
      microBatches: res.microBatches ?? 0, sumSq: res.sumSq, ownSumSq: res.ownFinite === false ? Number.NaN : res.ownSumSq ?? Number.NaN,
      partsSumSq: res.partsSumSq ?? replicas.map(() => Number.NaN), failed: res.failed,
    };
  }

  /** The light tail's apply: the peer clips its reduced gradient by `clipScale` (when `clip`) and runs
   *  its optimizer step with `lr`; resolves to the digests it reports after it. */
  async step(peer: DialTarget, step: number, clip: { clip: boolean; clipScale: number }, lr: number, opts: CallOptions = {}): Promise<AppliedDigests> {
    const res = await this.call(peer, 'aggregate', { runId: this.init.runId, step, phase: 'step', from: 0, count: 0, lr, ...clip },
      this.init.timeouts.computeTimeoutMs, opts);
    return { adapterSha256: res.adapterSha256, optimizerSha256: res.optimizerSha256 };
  }

  /** The peer's LoRA tensors of its stage at its current step, every page. */
  adapter(peer: DialTarget, opts: CallOptions = {}): Promise<Array<{ name: string; tensor: WireTensor }>> {
    return readPages(async (from, signal) => {
      const res = await this.call(peer, 'adapter', { runId: this.init.runId, from, count: PAGE_TENSORS }, this.init.timeouts.controlTimeoutMs, { signal });
      return { total: res.total, items: res.tensors };
    }, 'adapter upload', opts);
  }

  /** The stage's optimizer state after `step` steps (the trainer optimizer's own bytes), chunk by chunk. */
  optimizerState(peer: DialTarget, step: number, opts: CallOptions = {}): Promise<Uint8Array> {
    return readChunks((offset, length, signal) => this.call(peer, 'optimizer', { runId: this.init.runId, step, offset, length },
      this.init.timeouts.computeTimeoutMs, { signal }), `step ${step} optimizer state`, opts);
  }

  /** `probe`: the short heartbeat right after a failed request; `members`: the run's members, to a volunteer relay;
   *  `periodMs`: the coordinator's heartbeat period when it grew past the base interval. */
  heartbeat(peer: DialTarget, step: number, opts: CallOptions & { probe?: boolean; members?: { version: number; peers: string[] }; periodMs?: number } = {}): Promise<HeartbeatResponse> {
    const t = this.init.timeouts;
    const req = { runId: this.init.runId, step, sentAtMs: Date.now(), ...(opts.members !== undefined ? { members: opts.members } : {}), ...(opts.periodMs !== undefined ? { periodMs: opts.periodMs } : {}) };
    return this.call(peer, 'heartbeat', req, opts.probe === true ? t.probeTimeoutMs : t.heartbeatTimeoutMs, opts);
  }

  /** The run is over for this peer; with `rejoinAfterMs` it is only released from its stage and joins
   *  again after that long. */
  async finish(peer: DialTarget, reason: string, rejoinAfterMs?: number, opts: CallOptions = {}): Promise<void> {
    await this.call(peer, 'finish', { runId: this.init.runId, reason, ...(rejoinAfterMs !== undefined ? { rejoinAfterMs } : {}) },
      this.init.timeouts.noticeTimeoutMs, opts);
  }
}
