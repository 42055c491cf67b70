// libp2p plumbing: a TCP+Noise+Yamux node with a persisted identity, and one-frame request/response RPCs.
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { createLibp2p } from 'libp2p';
import type { Libp2p } from 'libp2p';
import { tcp } from '@libp2p/tcp';
import { noise } from '@chainsafe/libp2p-noise';
import { yamux } from '@chainsafe/libp2p-yamux';
import { generateKeyPairFromSeed } from '@libp2p/crypto/keys';
import { multiaddr } from '@multiformats/multiaddr';
import type { Multiaddr } from '@multiformats/multiaddr';
import type { PeerId, Stream, Connection } from '@libp2p/interface';
import { PROTOCOLS, CONTROL_TIMEOUT_MS, MAX_FRAME_BYTES } from './constants.ts';
import { encodeFrame, FrameReader } from './frame.ts';
import { SCHEMAS, errorFrame } from './messages.ts';
import type { Req, Res, Schemas } from './messages.ts';
import { errorFromWire, FrameTooLargeError, SchemaError, SwarmError, TimeoutError } from './errors.ts';
import { silentLogger } from './log.ts';
import type { Logger } from './log.ts';
import { carryPassiveDials, natConfig } from './nat.ts';
import type { NatInit } from './nat.ts';

export type SwarmNode = Libp2p;
export type { Multiaddr, PeerId };

/** Load the node's Ed25519 identity seed from `<dataDir>/identity.key`, creating it on first use,
 *  so a peer keeps its id across restarts (the coordinator's multiaddr stays valid too). */
export async function loadIdentity(dataDir: string) {
  await mkdir(dataDir, { recursive: true });
  const file = path.join(dataDir, 'identity.key');
  let seed: Uint8Array;
  try {
    seed = new Uint8Array(await readFile(file));
    if (seed.length !== 32) throw new Error(`${file}: identity seed must be 32 bytes, got ${seed.length}`);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    seed = new Uint8Array(randomBytes(32));
    await writeFile(file, seed, { mode: 0o600 });
  }
  return generateKeyPairFromSeed('Ed25519', seed);
}

/** Take `<dataDir>/lock` for this process: two processes on one data dir would share a peer id.
 *  A lock left by a dead process is taken over. Returns a release function. */
export async function lockDataDir(dataDir: string): Promise<() => Promise<void>> {
  await mkdir(dataDir, { recursive: true });
  const file = path.join(dataDir, 'lock');
  for (let tries = 0; tries < 2; tries++) {
    try {
      await writeFile(file, String(process.pid), { flag: 'wx' });
      return async () => { await rm(file, { force: true }); };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const pid = Number(await readFile(file, 'utf8').catch(() => 'NaN'));
      let alive = false;
      try { if (Number.isInteger(pid) && pid > 0) { process.kill(pid, 0); alive = true; } } catch (k) { alive = (k as NodeJS.ErrnoException).code === 'EPERM'; }
      if (alive && pid !== process.pid) throw new SwarmError(`data dir ${dataDir} is in use by process ${pid} (each volunteer or coordinator needs its own --data-dir)`);
      await rm(file, { force: true });
    }
  }
  throw new SwarmError(`could not lock data dir ${dataDir}`);
}

export interface SwarmNodeInit {
  dataDir: string;
  /** listen multiaddrs, default /ip4/127.0.0.1/tcp/0 */
  listen?: string[];
  /** NAT traversal (protocol/nat.ts): identify, AutoNAT v2, circuit relay v2 for members only, DCUtR.
   *  Absent: a plain TCP node, as on a LAN or loopback. */
  nat?: NatInit;
  /** yamux per-stream windows, default STREAM_WINDOW_BYTES / MAX_STREAM_WINDOW_BYTES (bench/wan-rpc.ts
   *  compares them with a 4 MiB initial window) */
  streamWindow?: { initialBytes: number; maxBytes: number };
}

/** Yamux's initial per-stream receive window: the library's (and the yamux spec's) 256 KiB. A 4 MiB window
 *  saves ~0.6 RTT on a 2 MiB response at 100 Mbit/s 50 ms (bench/wan-rpc.ts), but it lets each bulk stream
 *  (blob chunks, pages) put 4 MiB ahead of every other stream's frames on the one TCP connection between
 *  two peers: at 20 Mbit/s a few parallel blob fetches then hold a heartbeat back for seconds (the
 *  bench's 20 Mbit/s runs lost a volunteer to "no heartbeat" while it fetched weights). A larger window
 *  needs control traffic kept apart from bulk first (its own connection or stream priorities). Every peer
 *  of a run must use the same value: this library assumes the remote's initial window equals its own. */
export const STREAM_WINDOW_BYTES = 256 * 1024;
/** The most a stream's window grows to (the library doubles it while the reader keeps up): the library's 16 MiB. */
export const MAX_STREAM_WINDOW_BYTES = 16 * 1024 * 1024;

export async function createSwarmNode(init: SwarmNodeInit): Promise<SwarmNode> {
  const privateKey = await loadIdentity(init.dataDir);
  const listen = init.listen ?? ['/ip4/127.0.0.1/tcp/0'];
  const nat = init.nat !== undefined ? natConfig(init.nat, listen) : undefined;
  const node = await createLibp2p({
    privateKey,
    addresses: { listen, appendAnnounce: nat?.appendAnnounce },
    transports: [tcp(nat?.dialOpts !== undefined ? { dialOpts: nat.dialOpts as Record<string, unknown> } : {}), ...(nat?.transports ?? [])],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux({ streamOptions: {
      initialStreamWindowSize: init.streamWindow?.initialBytes ?? STREAM_WINDOW_BYTES,
      maxStreamWindowSize: init.streamWindow?.maxBytes ?? MAX_STREAM_WINDOW_BYTES,
    } })],
    // the swarm's own heartbeats decide liveness; no discovery or DHT traffic on a training run
    connectionManager: { maxConnections: 1024 },
    ...(nat !== undefined ? { services: nat.services, connectionGater: nat.connectionGater } : {}),
  });
  // DCUtR's hole-punching dial needs it (a volunteer with NAT traversal)
  if (init.nat?.role === 'volunteer') carryPassiveDials(node);
  await node.start();
  return node;
}

/** A dialable address: the listen address with /p2p/<id>, preferring non-wildcard ones. */
export function dialableAddrs(node: SwarmNode): string[] {
  return node.getMultiaddrs().map((m) => m.toString());
}

export function parseMultiaddr(s: string): Multiaddr {
  try {
    return multiaddr(s);
  } catch (e) {
    throw new SchemaError(`not a multiaddr: "${s}" (${(e as Error).message})`);
  }
}

async function sendFrame(stream: Stream, msg: unknown): Promise<void> {
  const buf = encodeFrame(msg);
  if (!stream.send(buf)) await stream.onDrain();
}

export type DialTarget = PeerId | Multiaddr | Multiaddr[];
export type ProtoName = keyof Schemas;

export interface RequestOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
  /** one line per request (method, peer, step, micro-batch, outcome, ms) when its namespace is enabled */
  log?: Logger;
}

/** The request keys a log line names: step, micro-batch, attempt, stage, phase, page. */
export function describeRequest(msg: unknown): string {
  if (msg === null || typeof msg !== 'object') return '';
  const m = msg as Record<string, unknown>;
  const parts: string[] = [];
  for (const k of ['step', 'mb', 'attempt', 'stageIndex', 'phase', 'from', 'offset'] as const) {
    if (typeof m[k] === 'number' || typeof m[k] === 'string') parts.push(`${k === 'stageIndex' ? 'stage' : k}=${m[k] as string | number}`);
  }
  return parts.join(' ');
}

function targetName(target: DialTarget): string {
  const t = Array.isArray(target) ? target[0] : target;
  const s = t === undefined ? '?' : t.toString();
  const i = s.lastIndexOf('/p2p/');
  return i >= 0 ? s.slice(i + 5) : s;
}

/** Open a stream, send one request frame, read and validate one response frame. Remote failures
 *  come back as the typed error named in the error frame. */
export async function request<P extends ProtoName>(node: SwarmNode, target: DialTarget, proto: P, msg: Req<P>, opts: RequestOptions = {}): Promise<Res<P>> {
  const timeoutMs = opts.timeoutMs ?? CONTROL_TIMEOUT_MS;
  const signal = opts.signal !== undefined ? AbortSignal.any([opts.signal, AbortSignal.timeout(timeoutMs)]) : AbortSignal.timeout(timeoutMs);
  let stream: Stream | undefined;
  const onAbort = () => stream?.abort(new TimeoutError(`${proto} request timed out after ${timeoutMs} ms`));
  signal.addEventListener('abort', onAbort, { once: true });
  const log = opts.log ?? silentLogger;
  const t0 = log.enabled ? performance.now() : 0;
  let outcome = 'ok';
  try {
    stream = await node.dialProtocol(target, PROTOCOLS[proto], { signal });
    await sendFrame(stream, msg);
    await stream.close({ signal });
    const reader = new FrameReader(stream, MAX_FRAME_BYTES);
    const raw = await reader.read();
    if (raw === undefined) throw new SwarmError(`${proto}: remote closed the stream without a response`);
    if (raw !== null && typeof raw === 'object' && 'error' in raw) {
      const e = errorFrame(raw, `${proto}.error`);
      throw errorFromWire(e.error.name, e.error.message);
    }
    return SCHEMAS[proto].res(raw, `${proto} response`) as Res<P>;
  } catch (e) {
    outcome = `${(e as Error).name}: ${(e as Error).message}`;
    if (signal.aborted && !(e instanceof SwarmError && e.name !== 'SwarmError')) {
      throw new TimeoutError(`${proto} request timed out after ${timeoutMs} ms: ${(e as Error).message}`);
    }
    throw e;
  } finally {
    if (log.enabled) log('%s -> %s %s: %s (%d ms)', proto, targetName(target), describeRequest(msg), outcome, Math.round(performance.now() - t0));
    signal.removeEventListener('abort', onAbort);
    if (stream !== undefined && stream.status === 'open') stream.abort(new Error('request done'));
  }
}

export interface HandlerContext {
  /** remote peer id (authenticated by Noise) */
  peerId: string;
  connection: Connection;
  /** aborted when the request's stream closes or resets (the requester gave up) or the handler's
   *  server stops */
  signal: AbortSignal;
}
export type Handler<P extends ProtoName> = (req: Req<P>, ctx: HandlerContext) => Promise<Res<P>>;

/** Called for every request that failed validation or threw, so callers can count it against the peer. */
export type ViolationHook = (peerId: string, proto: string, err: Error) => void;

/** Register a handler: read one request frame (capped), validate it against the schema, run the
 *  handler, answer with the response or an error frame naming the failure. */
export interface ServeOptions {
  /** called for every request that failed validation or threw */
  onError?: ViolationHook;
  /** aborts every running handler's signal (the server is stopping) */
  signal?: AbortSignal;
  /** one line per request served (method, peer, step, micro-batch, outcome, ms) */
  log?: Logger;
}

export async function serve<P extends ProtoName>(node: SwarmNode, proto: P, handler: Handler<P>, opts: ViolationHook | ServeOptions = {}): Promise<void> {
  const o: ServeOptions = typeof opts === 'function' ? { onError: opts } : opts;
  const onError = o.onError;
  const log = o.log ?? silentLogger;
  await node.handle(PROTOCOLS[proto], async (stream: Stream, connection: Connection) => {
    const peerId = connection.remotePeer.toString();
    const done = new AbortController();
    const onClose = () => done.abort(new SwarmError(`${proto}: the requester closed the stream`));
    stream.addEventListener('close', onClose, { once: true });
    const signal = o.signal !== undefined ? AbortSignal.any([o.signal, done.signal]) : done.signal;
    const t0 = log.enabled ? performance.now() : 0;
    let req: unknown;
    let outcome = 'ok';
    try {
      const reader = new FrameReader(stream, MAX_FRAME_BYTES);
      const raw = await reader.read();
      if (raw === undefined) throw new SchemaError(`${proto}: empty request stream`);
      req = SCHEMAS[proto].req(raw, `${proto} request`) as Req<P>;
      const res = await handler(req as Req<P>, { peerId, connection, signal });
      await sendFrame(stream, res);
      await stream.close();
    } catch (e) {
      const err = e as Error;
      outcome = `${err.name}: ${err.message}`;
      onError?.(peerId, proto, err);
      if (err instanceof FrameTooLargeError) {
        stream.abort(err);
        return;
      }
      try {
        await sendFrame(stream, { error: { name: err.name ?? 'Error', message: String(err.message).slice(0, 4000) } });
        await stream.close();
      } catch {
        stream.abort(err);
      }
    } finally {
      stream.removeEventListener('close', onClose);
      if (log.enabled) log('%s <- %s %s: %s (%d ms)', proto, peerId, describeRequest(req), outcome, Math.round(performance.now() - t0));
    }
  }, { maxInboundStreams: 256, maxOutboundStreams: 256 });
}
