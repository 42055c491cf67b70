// Stage-to-stage tensor streams (/swarmtune/hop/1.0.0): one activation or activation gradient per
// stream, in bounded chunks under credit-based back-pressure, taken only from the peer the
// coordinator's control message named for it, and screened by the receiver as it arrives.
//
//   sender → receiver   header {runId, step, mb, attempt, kind, shape [T, C], codec}
//   receiver → sender   {credit: HOP_CREDIT, cold?} once the sender is the peer the route names; cold:
//                                                 a delta codec's references (header.ref) do not match here
//   sender → receiver   chunk {offset, tensor}    whole rows [offset, offset + n) as [rows, C], n ≤ HOP_CHUNK_ELEMENTS
//   receiver → sender   {credit: 1}               after decoding each chunk but the last
//   receiver → sender   {ok: true} | error frame  the verdict, after the RMS screen
//
// The receiver never has more than HOP_CREDIT chunk frames in flight besides the tensor it
// assembles (which it allocates at the shape it expected, not one the sender claims), so neither the
// frame cap nor the tensor element cap bounds a micro-batch, and a slow receiver slows the sender.
import { createHash } from 'node:crypto';
import type { Connection, Stream } from '@libp2p/interface';
import type { Multiaddr } from '@multiformats/multiaddr';
import { HOP_CHUNK_ELEMENTS, HOP_CREDIT, HOP_EXPECT_WAIT_MS, HOP_FRAME_BYTES, MAX_HOP_ELEMENTS, PROTOCOLS } from './constants.ts';
import { encodeFrame, FrameReader } from './frame.ts';
import { errorFrame, hopChunk, hopHeader, hopReply } from './messages.ts';
import type { HopHeader, HopReply } from './messages.ts';
import { decodeFloat, encodeTensor, expectedByteLength, isDeltaCodec } from './tensor.ts';
import type { FloatCodec, WireTensor } from './tensor.ts';
import { decodeDelta, DELTA_SPECS, DIGEST_BYTES, encodeDelta } from './codecs/delta.ts';
import type { DeltaParams, DeltaRefs } from './codecs/delta.ts';
import type { DeltaCache } from './codecs/delta-cache.ts';
import { AuthError, errorFromWire, SchemaError, StaleError, SwarmError, TensorError, TimeoutError } from './errors.ts';
import { BadOutputError, rmsOf } from './screen.ts';
import { silentLogger } from './log.ts';
import type { Logger } from './log.ts';
import type { SwarmNode } from './net.ts';

export type HopKind = 'act' | 'grad';
export type HopKey = Omit<HopHeader, 'shape' | 'codec'>;

const keyOf = (k: HopKey): string => `${k.runId}/${k.step}/${k.mb}/${k.attempt}/${k.kind}`;
const describe = (k: HopKey): string => `the ${k.kind === 'act' ? 'activation' : 'activation gradient'} of step ${k.step} micro-batch ${k.mb} attempt ${k.attempt}`;

/** A hop broke in transport (reset, closed early, refused, timed out); `peerId` is the other end. */
export class HopError extends SwarmError {
  override name = 'HopError';
  readonly peerId: string;
  constructor(peerId: string, message: string) {
    super(message);
    this.peerId = peerId;
  }
}

/** What a receiver expects: the tensor of one attempt, from one peer, of one shape. */
export interface HopExpectation {
  /** the Noise-authenticated peer id the route names as the sender */
  from: string;
  /** [B·S, C] */
  shape: [number, number];
  /** the RMS screen (throws BadOutputError); shape, dtype and finiteness are checked per chunk */
  judge?: (rms: number) => void;
  /** the delta codec's state on this end (absent: a delta-coded tensor must come cold) */
  delta?: HopDelta;
}

/** One end's delta-codec state for one hop (the codecs aq4, aq2; node/codec-state.ts keeps them): its
 *  cache for this neighbour and direction, the rows' sample keys, the attempt its reconstruction is
 *  staged under (applied when the coordinator commits the attempt). Without it a delta codec is cold. */
export interface HopDelta {
  cache: DeltaCache;
  /** per row (B) of the [B·S, C] tensor; undefined: that row is never coded against a reference */
  keys: ReadonlyArray<string | undefined>;
  seqLen: number;
  attempt: string;
}

const ZERO_DIGEST = new Uint8Array(DIGEST_BYTES);
const sameBytes = (a: Uint8Array, b: Uint8Array): boolean => a.length === b.length && a.every((x, i) => x === b[i]);
export const deltaParamsOf = (codec: FloatCodec, kind: HopKind): DeltaParams | undefined =>
  isDeltaCodec(codec) ? DELTA_SPECS[codec][kind] : undefined;

export interface HopReceived {
  data: Float32Array;
  rms: number;
}

/** What one receive held: tests and the bench read it (onReceived). */
export interface HopStats {
  key: string;
  from: string;
  /** hop bytes that arrived (frames included) */
  bytesIn: number;
  /** the most bytes that had arrived but were not yet decoded, at any moment */
  maxBufferedBytes: number;
  chunks: number;
}

interface Pending {
  key: HopKey;
  e: HopExpectation;
  claimed: boolean;
  settled: boolean;
  resolve: (r: HopReceived) => void;
  reject: (e: Error) => void;
  abortStream?: (e: Error) => void;
}

export interface HopInboxInit {
  log?: Logger;
  /** how long a hop stream that arrives before its expectation waits for it */
  expectWaitMs?: number;
  /** called after every completed receive */
  onReceived?: (s: HopStats) => void;
}

/** Errors that mean the bytes the sender wrote are malformed (a frame or chunk that does not parse). */
const MALFORMED = new Set(['DecodeError', 'SchemaError', 'FrameTooLargeError', 'TensorError']);

/** A truncated stream reads as a DecodeError from FrameReader: that is transport, not a bad tensor. */
function truncated(e: Error): boolean {
  return e.name === 'DecodeError' && e.message.startsWith('stream ended');
}

async function sendFrame(stream: Stream, msg: unknown, maxBytes?: number): Promise<void> {
  if (!stream.send(encodeFrame(msg, maxBytes))) await stream.onDrain();
}

/** The receiving side: expectations registered by the stage's micro-batch handler, and the protocol
 *  handler that matches incoming hop streams to them. */
export class HopInbox {
  private readonly pending = new Map<string, Pending>();
  /** hop streams waiting for their expectation */
  private readonly early = new Map<string, Array<() => void>>();
  private readonly log: Logger;
  private readonly expectWaitMs: number;
  private readonly onReceived?: (s: HopStats) => void;

  constructor(init: HopInboxInit = {}) {
    this.log = init.log ?? silentLogger;
    this.expectWaitMs = init.expectWaitMs ?? HOP_EXPECT_WAIT_MS;
    this.onReceived = init.onReceived;
  }

  /** Register on a node (the handler reads only streams it can match to an expectation). */
  async register(node: SwarmNode): Promise<void> {
    await node.handle(PROTOCOLS.hop, (stream, connection) => this.handle(stream, connection), { maxInboundStreams: 256, maxOutboundStreams: 256 });
  }

  /** Expect `key` from `e.from`: resolves with the assembled, screened tensor; rejects with
   *  BadOutputError (the sender's tensor failed a screen), HopError (the stream broke),
   *  TimeoutError (nothing complete within `timeoutMs`) or the signal's reason. */
  receive(key: HopKey, e: HopExpectation, opts: { signal: AbortSignal; timeoutMs: number }): Promise<HopReceived> {
    const k = keyOf(key);
    if (this.pending.has(k)) return Promise.reject(new StaleError(`${describe(key)} is already expected`));
    return new Promise<HopReceived>((resolve, reject) => {
      const p: Pending = { key, e, claimed: false, settled: false, resolve: () => {}, reject: () => {} };
      const settle = () => {
        p.settled = true;
        clearTimeout(timer);
        opts.signal.removeEventListener('abort', onAbort);
        if (this.pending.get(k) === p) this.pending.delete(k);
      };
      p.resolve = (r) => { if (p.settled) return; settle(); resolve(r); };
      p.reject = (err) => { if (p.settled) return; settle(); p.abortStream?.(err); reject(err); };
      const onAbort = () => p.reject(opts.signal.reason as Error);
      const timer = setTimeout(() => p.reject(new TimeoutError(`no complete ${describe(key)} from ${e.from} within ${opts.timeoutMs} ms`)), opts.timeoutMs);
      if (opts.signal.aborted) { onAbort(); return; }
      opts.signal.addEventListener('abort', onAbort, { once: true });
      this.pending.set(k, p);
      for (const wake of this.early.get(k) ?? []) wake();
      this.early.delete(k);
    });
  }

  /** The expectation for `k` from `peer`, waiting up to expectWaitMs for it to be registered. */
  private async claim(key: HopKey, peer: string, signal: AbortSignal): Promise<Pending> {
    const k = keyOf(key);
    if (!this.pending.has(k)) {
      await new Promise<void>((resolve) => {
        const wakers = this.early.get(k) ?? [];
        const done = () => { clearTimeout(t); signal.removeEventListener('abort', done); const i = wakers.indexOf(done); if (i >= 0) wakers.splice(i, 1); resolve(); };
        const t = setTimeout(done, this.expectWaitMs);
        signal.addEventListener('abort', done, { once: true });
        wakers.push(done);
        this.early.set(k, wakers);
      });
    }
    const p = this.pending.get(k);
    if (p === undefined) throw new StaleError(`hop: ${describe(key)} is not expected here (no current route names it)`);
    if (p.e.from !== peer) throw new AuthError(`hop: ${describe(key)} is expected from ${p.e.from}, not from ${peer}`);
    if (p.claimed) throw new StaleError(`hop: ${describe(key)} is already being received`);
    p.claimed = true;
    return p;
  }

  private async handle(stream: Stream, connection: Connection): Promise<void> {
    const peer = connection.remotePeer.toString();
    const closed = new AbortController();
    const onClose = () => closed.abort(new HopError(peer, 'the hop stream closed'));
    stream.addEventListener('close', onClose, { once: true });
    const stats: HopStats = { key: '', from: peer, bytesIn: 0, maxBufferedBytes: 0, chunks: 0 };
    let decoded = 0;
    const onMessage = (ev: Event) => {
      const d = (ev as unknown as { data: { byteLength: number } }).data;
      stats.bytesIn += d.byteLength;
      stats.maxBufferedBytes = Math.max(stats.maxBufferedBytes, stats.bytesIn - decoded);
    };
    stream.addEventListener('message', onMessage);
    let p: Pending | null = null;
    try {
      const reader = new FrameReader(stream, HOP_FRAME_BYTES);
      const raw = await reader.read();
      if (raw === undefined) throw new SchemaError('hop: empty stream');
      const h = hopHeader(raw, 'hop header');
      stats.key = keyOf(h);
      p = await this.claim(h, peer, closed.signal);
      const pend = p;
      pend.abortStream = (err) => { try { stream.abort(err); } catch { /* already gone */ } };
      const [T, C] = pend.e.shape;
      const what = `${describe(h)} from ${peer}`;
      if (h.shape.length !== 2 || h.shape[0] !== T || h.shape[1] !== C) throw new BadOutputError(`${what}: shape [${h.shape}], expected [${T}, ${C}]`);
      const n = T * C;
      if (n > MAX_HOP_ELEMENTS) throw new BadOutputError(`${what}: ${n} elements exceeds the hop cap ${MAX_HOP_ELEMENTS}`);
      const out = new Float32Array(n);
      decoded = reader.consumedBytes;
      // a delta codec: decode against this end's references when they are the ones the sender names
      const dp = deltaParamsOf(h.codec, h.kind);
      const dl = dp !== undefined && pend.e.delta !== undefined && h.ref !== undefined ? pend.e.delta.cache.lookup(pend.e.delta.keys, pend.e.delta.seqLen, C) : undefined;
      const warm = dl !== undefined && sameBytes(h.ref!, dl.digest);
      await sendFrame(stream, (h.ref !== undefined && !warm ? { credit: HOP_CREDIT, cold: true } : { credit: HOP_CREDIT }) satisfies HopReply);
      let off = 0, ss = 0;
      while (off < n) {
        let c;
        try {
          const rc = await reader.read();
          if (rc === undefined) throw new HopError(peer, `${what}: the stream ended after ${off} of ${n} elements`);
          c = hopChunk(rc, 'hop chunk');
        } catch (e) {
          if ((e as Error).name === 'HopError') throw e;
          // only what the sender wrote can be a bad tensor: a malformed frame or chunk; a stream that
          // ended, was reset, aborted or timed out is transport (the attempt fails, nobody is accused)
          if (!truncated(e as Error) && MALFORMED.has((e as Error).name)) throw new BadOutputError(`${what}: ${(e as Error).message}`);
          throw new HopError(peer, `${what}: ${(e as Error).name}: ${(e as Error).message}`);
        }
        const len = Math.min(chunkRows(C) * C, n - off);
        if (c.offset !== off) throw new BadOutputError(`${what}: chunk at element ${c.offset}, expected ${off}`);
        let x: Float32Array;
        try {
          const cw = `${what}, elements [${off}, ${off + len})`;
          if (dp !== undefined && isDeltaCodec(c.tensor.codec)) {
            const t = c.tensor;
            if (t.codec !== h.codec || t.dtype !== 'f32' || t.shape.length !== 2 || t.shape[0] !== len / C || t.shape[1] !== C) throw new BadOutputError(`${cw}: a ${t.codec} chunk of shape [${t.shape}] in a ${h.codec} hop, expected [${len / C}, ${C}]`);
            if (t.bytes.length > expectedByteLength(t.codec, [len / C, C])) throw new BadOutputError(`${cw}: ${t.bytes.length} bytes is more than a cold ${t.codec} chunk takes`);
            const r0 = off / C;
            x = decodeDelta(dp, t.bytes, len / C, C, warm ? dl!.refs.slice(r0, r0 + len / C) : [], warm ? dl!.digest : ZERO_DIGEST, cw);
          } else x = decodeFloat(c.tensor, cw, [len / C, C]);
        } catch (e) {
          throw new BadOutputError((e as Error).message);
        }
        out.set(x, off);
        for (let i = 0; i < x.length; i++) ss += x[i]! * x[i]!;
        off += len;
        stats.chunks++;
        // the frames read so far are decoded; what arrived after them still counts as buffered
        decoded = reader.consumedBytes;
        if (off < n) await sendFrame(stream, { credit: 1 } satisfies HopReply);
      }
      const rms = rmsOf(ss, n);
      pend.e.judge?.(rms);
      const de = pend.e.delta;
      if (dp !== undefined && de !== undefined) de.cache.stage(de.attempt, de.keys, de.seqLen, C, out);
      await sendFrame(stream, { ok: true } satisfies HopReply);
      await stream.close();
      this.onReceived?.(stats);
      pend.resolve({ data: out, rms });
    } catch (e) {
      const err = e as Error;
      this.log('hop <- %s %s: %s: %s', peer, stats.key, err.name, err.message);
      if (p !== null) {
        // this handler answers the sender itself (an error frame names what was wrong)
        p.abortStream = undefined;
        p.reject(err.name === 'BadOutputError' || err.name === 'HopError' ? err : new HopError(peer, `${err.name}: ${err.message}`));
      }
      try {
        await sendFrame(stream, { error: { name: err.name, message: err.message.slice(0, 4000) } });
        await stream.close();
      } catch {
        stream.abort(err);
      }
    } finally {
      stream.removeEventListener('close', onClose);
      stream.removeEventListener('message', onMessage);
    }
  }
}

export interface SendHopOptions {
  signal: AbortSignal;
  /** the whole transfer's deadline */
  timeoutMs: number;
  codec: FloatCodec;
  /** the peer id the addresses must authenticate as (Noise) */
  expectPeer: string;
  /** testing aid: what a bad peer does to each chunk it sends */
  mutate?: (t: WireTensor) => WireTensor;
  /** also compute the sha256 of the tensor as the receiver decodes it (each chunk as sent, decoded
   *  again here: free in f32, one more decode per chunk in a lossy codec); a spot check holds
   *  the receiver's copy to it (docs/security.md) */
  digest?: boolean;
  /** the delta codec's state on this end (absent: a delta codec sends every row cold) */
  delta?: HopDelta;
  log?: Logger;
}

/** Rows of a [T, C] tensor per chunk: whole rows, so that every codec (blockwise and low-rank
 *  alike) encodes a chunk as a [rows, C] matrix of its own; at most HOP_CHUNK_ELEMENTS elements. */
export function chunkRows(C: number): number {
  return Math.max(1, Math.floor(HOP_CHUNK_ELEMENTS / C));
}

/** sha256 (hex) of a float32 tensor's bytes: the digest a hop's sender and receiver report (each
 *  of the tensor as the receiver decodes it) and a recalled tensor is held to. */
export function floatSha256(x: Float32Array): string {
  return createHash('sha256').update(new Uint8Array(x.buffer, x.byteOffset, x.byteLength)).digest('hex');
}

export interface HopSent { bytes: number; sha256: string | null }

/** A hop stream opened ahead of its tensor (openHop): the stream is negotiated, the header sent and
 *  the receiver's first credit in while the sender still computes what it will send. */
export interface HopSender {
  /** resolves once the receiver granted the first credit (it knows this sender is the one the route
   *  names); rejects as the opening failed. For tests and logs: send() waits for it itself. */
  readonly ready: Promise<void>;
  /** Stream `data` (the flattened [T, C] tensor) under a deadline of its own (`timeoutMs` from
   *  now); resolves once the receiver accepted it. Rejects as sendHop does, and with the opening's
   *  HopError when the stream never opened. At most once. */
  send(data: Float32Array): Promise<HopSent>;
  /** The tensor will never come (the sender's own job failed): the stream is aborted, so the
   *  receiver sees a broken hop at once instead of waiting out its deadline. No-op after send. */
  cancel(reason: Error): void;
}

/** Open hop `key` to the peer at `addrs` now (dial, protocol negotiation, header, the first credit:
 *  about two round trips) and send its tensor later, when it is computed. The opening runs under
 *  `opts.timeoutMs`; a failure there is kept and comes back from `send` (never unhandled). */
export function openHop(node: SwarmNode, addrs: Multiaddr[], key: HopKey, shape: [number, number], opts: SendHopOptions): HopSender {
  const to = opts.expectPeer;
  const what = `${describe(key)} to ${to}`;
  const n = shape[0] * shape[1];
  const log = opts.log ?? silentLogger;
  const cancelled = new AbortController();
  let stream: Stream | undefined;
  let reader: FrameReader | undefined;
  let credit = 0;
  let used = false;
  let deadline = AbortSignal.timeout(opts.timeoutMs);
  const abortStream = (e: Error) => { if (stream !== undefined && stream.status === 'open') stream.abort(e); };
  /** run `fn` under the current phase's signal, naming a transport failure as this hop's */
  const net = async <T>(signal: AbortSignal, fn: () => Promise<T>): Promise<T> => {
    const onAbort = () => abortStream(cancelled.signal.aborted ? cancelled.signal.reason as Error : new TimeoutError(`${what}: not accepted within ${opts.timeoutMs} ms`));
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      if (signal.aborted) onAbort();
      return await fn();
    } catch (e) {
      if (opts.signal.aborted) throw opts.signal.reason;
      if (cancelled.signal.aborted) throw cancelled.signal.reason;
      if (deadline.aborted) throw new HopError(to, `${what}: not accepted within ${opts.timeoutMs} ms`);
      if (e instanceof HopError) throw e;
      throw new HopError(to, `${what}: ${(e as Error).name}: ${(e as Error).message}`);
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
  };
  const next = async (): Promise<HopReply> => {
    const raw = await reader!.read();
    if (raw === undefined) throw new HopError(to, `${what}: the receiver closed the stream`);
    if (raw !== null && typeof raw === 'object' && 'error' in raw) {
      const er = errorFrame(raw, 'hop error');
      const re = errorFromWire(er.error.name, er.error.message);
      throw new HopError(to, `${what}: refused: ${re.message}`);
    }
    return hopReply(raw, 'hop reply');
  };
  // the caller giving up aborts the stream also while it is idle (opened, its tensor not yet ready)
  const onCallerAbort = () => abortStream(opts.signal.reason instanceof Error ? opts.signal.reason : new SwarmError('hop: the sender gave up'));
  opts.signal.addEventListener('abort', onCallerAbort, { once: true });
  // a delta codec's references (the cached reconstructions of these samples, docs/protocol.md): looked
  // up now, named by digest in the header; a cold receiver's first credit says to send without them
  const C = shape[1];
  const dp = deltaParamsOf(opts.codec, key.kind);
  const de = dp !== undefined ? opts.delta : undefined;
  const dl = de !== undefined ? de.cache.lookup(de.keys, de.seqLen, C) : undefined;
  let refs: DeltaRefs = dl !== undefined && dl.warm > 0 ? dl.refs : [];
  const openSignal = AbortSignal.any([opts.signal, deadline, cancelled.signal]);
  const opened = (async (): Promise<void> => {
    const conn = await net(openSignal, () => node.dial(addrs, { signal: openSignal }));
    // Noise authenticated the remote; it must be the peer the route names
    if (conn.remotePeer.toString() !== to) throw new HopError(to, `${what}: the address reached ${conn.remotePeer.toString()}`);
    stream = await net(openSignal, () => conn.newStream(PROTOCOLS.hop, { signal: openSignal }));
    if (cancelled.signal.aborted) { abortStream(cancelled.signal.reason as Error); throw cancelled.signal.reason; }
    reader = new FrameReader(stream, 64 * 1024);
    const header: HopHeader = { ...key, shape: [...shape], codec: opts.codec, ...(refs.length > 0 ? { ref: dl!.digest } : {}) };
    await net(openSignal, () => sendFrame(stream!, header));
    while (credit === 0) {
      const r = await net(openSignal, next);
      if (r.credit === undefined) throw new HopError(to, `${what}: a verdict before every chunk was sent`);
      if (r.cold === true) {
        if (refs.length > 0) log('hop -> %s %s: the receiver lacks the references, sending cold', to, keyOf(key));
        refs = [];
      }
      credit += r.credit;
    }
  })();
  // kept for send(); a failed opening must not surface as an unhandled rejection meanwhile
  opened.catch((e: Error) => { log('hop -> %s %s: opening failed: %s: %s', to, keyOf(key), e.name, e.message); abortStream(e); });

  const send = async (data: Float32Array): Promise<HopSent> => {
    if (used) throw new SwarmError(`${what}: sent twice`);
    used = true;
    if (data.length !== n) { abortStream(new SchemaError('hop: wrong size')); throw new SchemaError(`${what}: ${data.length} elements, shape [${shape}] needs ${n}`); }
    let bytes = 0;
    // the digest of what the receiver decodes: each chunk as sent, decoded here again (null when a
    // chunk cannot be decoded: the bad-peer aid's NaN)
    const digest = createHash('sha256');
    let digestOk = opts.digest === true;
    try {
      await opened;
      // the transfer's own deadline, from the moment its tensor is ready
      deadline = AbortSignal.timeout(opts.timeoutMs);
      const signal = AbortSignal.any([opts.signal, deadline, cancelled.signal]);
      const s = stream!;
      // what the receiver reconstructs: this end's next references
      const recon = de !== undefined ? new Float32Array(n) : undefined;
      let off = 0;
      while (off < n) {
        while (credit === 0) {
          const r = await net(signal, next);
          if (r.credit === undefined) throw new HopError(to, `${what}: a verdict before every chunk was sent`);
          credit += r.credit;
        }
        const len = Math.min(chunkRows(C) * C, n - off);
        const cw = `${what}, elements [${off}, ${off + len})`;
        let t: WireTensor, mine: Float32Array | undefined;
        if (dp !== undefined) {
          const r0 = off / C, rs = refs.slice(r0, r0 + len / C), dg = refs.length > 0 ? dl!.digest : ZERO_DIGEST;
          for (let i = off; i < off + len; i++) if (!Number.isFinite(data[i]!)) throw new TensorError(`${cw}: non-finite value ${data[i]} at element ${i}`);
          const b = encodeDelta(dp, data.subarray(off, off + len), len / C, C, rs, dg);
          t = { dtype: 'f32', shape: [len / C, C], codec: opts.codec, bytes: b };
          mine = decodeDelta(dp, b, len / C, C, rs, dg, cw);
          recon?.set(mine, off);
        } else t = encodeTensor(data.subarray(off, off + len), [len / C, C], opts.codec, cw);
        const sent = opts.mutate !== undefined ? opts.mutate(t) : t;
        if (digestOk) {
          try {
            const d = sent === t && opts.codec === 'f32' ? data.subarray(off, off + len) : sent === t && mine !== undefined ? mine : decodeFloat(sent, what, [len / C, C]);
            digest.update(new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
          } catch { digestOk = false; }
        }
        const frame = encodeFrame({ offset: off, tensor: sent }, HOP_FRAME_BYTES);
        bytes += frame.length;
        await net(signal, async () => { if (!s.send(frame)) await s.onDrain({ signal }); });
        credit--;
        off += len;
      }
      for (;;) {
        const r = await net(signal, next);
        if (r.ok === true) break;
      }
      await net(signal, () => s.close({ signal }));
      if (de !== undefined) de.cache.stage(de.attempt, de.keys, de.seqLen, C, recon!);
      log('hop -> %s %s: ok (%d bytes)', to, keyOf(key), bytes);
      return { bytes, sha256: digestOk ? digest.digest('hex') : null };
    } catch (e) {
      log('hop -> %s %s: %s: %s', to, keyOf(key), (e as Error).name, (e as Error).message);
      throw e;
    } finally {
      opts.signal.removeEventListener('abort', onCallerAbort);
      abortStream(new Error('hop done'));
    }
  };
  return {
    ready: opened,
    send,
    cancel: (reason) => {
      if (used) return;
      used = true;
      cancelled.abort(reason);
      opts.signal.removeEventListener('abort', onCallerAbort);
      abortStream(reason);
    },
  };
}

/** Send `data` (the flattened [T, C] tensor) to the peer at `addrs` as hop `key`. Resolves once
 *  the receiver accepted it; a refusal, a broken stream or the deadline is a HopError naming the
 *  receiver. A value this peer cannot encode (non-finite: its own fault) is a TensorError. */
export async function sendHop(node: SwarmNode, addrs: Multiaddr[], key: HopKey, shape: [number, number], data: Float32Array, opts: SendHopOptions): Promise<HopSent> {
  const n = shape[0] * shape[1];
  if (data.length !== n) throw new SchemaError(`${describe(key)} to ${opts.expectPeer}: ${data.length} elements, shape [${shape}] needs ${n}`);
  return openHop(node, addrs, key, shape, opts).send(data);
}
