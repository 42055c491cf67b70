// NAT traversal with libp2p's own parts: identify, AutoNAT v2, circuit relay v2 for run members only, DCUtR; and each connection's path.
//
// Roles (docs/swarm.md "NAT strategy"):
//   coordinator: relay server + AutoNAT server. A reservation is granted only to peers `isMember` admits, and
//     a relayed connection only between two members: no open relay. Because every reservation belongs to a
//     member, the relay's default limits (2 min and 128 KiB per relayed connection, js-libp2p 3) are lifted
//     for all of them (`applyDefaultLimit: false`): a relayed hop carries a pipeline's activations.
//   volunteer: relay client (after admission, listenOnRelay takes a reservation and listens on <relay>/p2p-circuit),
//     DCUtR (a relayed connection is upgraded to a direct, hole-punched one where both NATs allow it),
//     AutoNAT client. A publicly reachable volunteer (`join --nat --relay`: the operator's word) also serves relay
//     to members (`relayServer`): the same gater and lifted limits, with the member list the coordinator sends it
//     (RelayMembers, with heartbeats); NAT'd volunteers reserve on it too, the coordinator's relay the fallback.
// TCP hole punching needs each side to dial from the port the other dials (simultaneous open), so a volunteer
// behind a NAT dials everything from one fixed local port (`dialPort`) and announces the NAT's public address
// with that port (`announce`); a cone NAT keeps the port, a strict NAT does not (there only the relay works).
import { identify } from '@libp2p/identify';
import { autoNATv2 } from '@libp2p/autonat-v2';
import { circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2';
import type { CircuitRelayService } from '@libp2p/circuit-relay-v2';
import { dcutr } from '@libp2p/dcutr';
import type { Connection, ConnectionGater, PeerId } from '@libp2p/interface';
import { multiaddr } from '@multiformats/multiaddr';
import type { Multiaddr } from '@multiformats/multiaddr';
import type { Libp2p } from 'libp2p';
import { SchemaError, SwarmError } from './errors.ts';

export type NatRole = 'coordinator' | 'volunteer';
/** How a connection reaches its peer: dialed directly, upgraded from a relayed one by DCUtR, or through a relay. */
export type ConnectionPath = 'direct' | 'hole-punched' | 'relayed';
/** As the coordinator sees a peer: reachable directly, or holding a reservation on its relay (behind a NAT). */
export type Reachability = 'public' | 'relay';

export interface NatInit {
  role: NatRole;
  /** volunteer: relay multiaddrs (with /p2p/) it may hold a reservation on, usually the coordinator's. The
   *  reservation is taken by listenOnRelay once the coordinator admitted this peer (before, it is refused). */
  relays?: string[];
  /** serve circuit relay v2 (the coordinator always does; a reachable volunteer when set) */
  relayServer?: boolean;
  /** who may hold a reservation and be relayed to or from: the run's admitted peers. Required with a relay server. */
  isMember?: (peerId: string) => boolean;
  /** addresses announced besides the listen addresses, e.g. /ip4/<NAT public address>/tcp/<dialPort> */
  announce?: string[];
  /** dial every outbound TCP connection from this local port (a cone NAT keeps it: the announced port) */
  dialPort?: number;
  /** relay reservations held at once (default 1024: a run's peers) */
  maxReservations?: number;
  /** DCUtR: ms per hole-punching attempt (default 5000, libp2p's) */
  holePunchTimeoutMs?: number;
  /** with dialPort: relays besides `relays` whose direct addresses the peer store keeps (volunteer relays
   *  learned after start) */
  isRelay?: (peerId: string) => boolean;
}

const DEFAULT_MAX_RESERVATIONS = 1024;

function checkAddrs(what: string, addrs: readonly string[] | undefined): string[] {
  for (const a of addrs ?? []) {
    try { multiaddr(a); } catch (e) { throw new SchemaError(`${what}: not a multiaddr: "${a}" (${(e as Error).message})`); }
  }
  return [...(addrs ?? [])];
}

/** What createSwarmNode adds to its libp2p configuration for a role. */
export function natConfig(init: NatInit, listen: readonly string[] = []) {
  const relays = checkAddrs('nat.relays', init.relays);
  // With AutoNAT on, libp2p 3 reports a public listen address only once AutoNAT confirmed it; the coordinator's
  // is the address volunteers are told to join, and a volunteer relay's the one NAT'd peers reserve on (its
  // operator says it is reachable), so both announce their concrete (non-wildcard) listen addresses.
  const own = init.role === 'coordinator' || init.relayServer === true ? listen.filter((a) => /^\/ip[46]\/[^/]+\/tcp\/[1-9]\d*$/.test(a) && !/^\/ip4\/0\.0\.0\.0\/|^\/ip6\/::\//.test(a)) : [];
  const announce = [...checkAddrs('nat.announce', init.announce), ...own];
  if (init.role === 'volunteer' && relays.some((r) => !r.includes('/p2p/'))) throw new SchemaError('nat.relays: every relay address needs its /p2p/<peer id>');
  if (init.dialPort !== undefined && (!Number.isInteger(init.dialPort) || init.dialPort < 1 || init.dialPort > 65535)) throw new SchemaError(`nat.dialPort must be a port in [1, 65535], got ${init.dialPort}`);
  const serveRelay = init.role === 'coordinator' || init.relayServer === true;
  if (serveRelay && init.isMember === undefined) throw new SchemaError('nat: a relay server needs isMember (no open relay)');
  const isMember = init.isMember ?? (() => false);
  const services: Record<string, (components: any) => unknown> = {
    identify: identify(),
    autoNAT: autoNATv2(),
  };
  if (serveRelay) {
    services.relay = circuitRelayServer({
      reservations: { maxReservations: init.maxReservations ?? DEFAULT_MAX_RESERVATIONS, applyDefaultLimit: false },
    });
  }
  if (init.role === 'volunteer') services.dcutr = dcutr({ timeout: init.holePunchTimeoutMs });
  const relayIds = new Set(relays.map((r) => r.slice(r.lastIndexOf('/p2p/') + 5)));
  const gater: ConnectionGater = {
    // only members reserve a slot, and only members are relayed to each other
    denyInboundRelayReservation: (peer: PeerId) => !isMember(peer.toString()),
    denyOutboundRelayedConnection: (src: PeerId, dst: PeerId) => !isMember(src.toString()) || !isMember(dst.toString()),
    // A punching volunteer keeps no direct address of other peers in its peer store (its relays' excepted):
    // otherwise DCUtR first tries a "unilateral" direct dial to the other side's announced NAT address, from
    // dialPort; the other NAT drops it, but it leaves a mapping on this side's NAT that turns the real punch's
    // inbound SYN into a reset (measured in tests/nat.test.ts's lab: every punch failed after it). Hops dial
    // the addresses the route gives, not the peer store.
    ...(init.dialPort !== undefined ? { filterMultiaddrForPeer: (peer: PeerId, ma: Multiaddr) => relayIds.has(peer.toString()) || init.isRelay?.(peer.toString()) === true || ma.toString().includes('/p2p-circuit') } : {}),
  };
  return {
    services,
    transports: init.role === 'volunteer' ? [circuitRelayTransport()] : [],
    relays,
    appendAnnounce: announce,
    connectionGater: gater,
    dialOpts: init.dialPort !== undefined ? { localPort: init.dialPort } : undefined,
  };
}

const isRelayed = (c: Connection): boolean => c.remoteAddr.toString().includes('/p2p-circuit');

/** The peer id an address ends in (…/p2p/<id>), or undefined. */
export function peerIdOf(addr: string): string | undefined {
  return /\/p2p\/([^/]+)$/.exec(addr)?.[1];
}

/** The relay's peer id in a circuit address (<relay>/p2p/<relay id>/p2p-circuit/...), or undefined. */
export function relayIdOf(addr: string): string | undefined {
  const i = addr.indexOf('/p2p-circuit');
  return i < 0 ? undefined : peerIdOf(addr.slice(0, i));
}

/** A path to a peer, and for a relayed one the relay it goes through. */
export interface PeerPath { peerId: string; path: ConnectionPath; via?: string }

/** The path of every connection, recorded as it opens: relayed (a /p2p-circuit address), hole-punched (a
 *  direct connection opened while a relayed one to the same peer was up: DCUtR's upgrade), or direct. */
export class PathBook {
  private readonly paths = new WeakMap<Connection, ConnectionPath>();
  private readonly node: Libp2p;
  private readonly onOpen = (e: CustomEvent<Connection>): void => { this.record(e.detail); };

  constructor(node: Libp2p) {
    this.node = node;
    node.addEventListener('connection:open', this.onOpen);
    for (const c of node.getConnections()) this.record(c);
  }

  private record(c: Connection): void {
    if (this.paths.has(c)) return;
    if (isRelayed(c)) { this.paths.set(c, 'relayed'); return; }
    const relayedUp = this.node.getConnections(c.remotePeer).some((o) => o !== c && isRelayed(o) && o.status === 'open');
    this.paths.set(c, relayedUp ? 'hole-punched' : 'direct');
  }

  pathOf(c: Connection): ConnectionPath {
    this.record(c);
    return this.paths.get(c)!;
  }

  /** The best open connection's path to a peer (direct or hole-punched before relayed), or null when none is open. */
  pathTo(peer: PeerId | string): ConnectionPath | null {
    const id = peer.toString();
    const conns = this.node.getConnections().filter((c) => c.remotePeer.toString() === id && c.status === 'open');
    const paths = conns.map((c) => this.pathOf(c));
    return paths.find((p) => p === 'direct') ?? paths.find((p) => p === 'hole-punched') ?? paths.find((p) => p === 'relayed') ?? null;
  }

  /** The relay the open relayed connection to a peer goes through (its peer id), or undefined. */
  relayTo(peer: PeerId | string): string | undefined {
    const id = peer.toString();
    const c = this.node.getConnections().find((k) => k.remotePeer.toString() === id && k.status === 'open' && isRelayed(k));
    return c !== undefined ? relayIdOf(c.remoteAddr.toString()) : undefined;
  }

  /** The best path to every peer with an open connection but those in `except` (at most `max`), sorted by peer
   *  id; a relayed one names its relay (`via`). */
  peers(except: ReadonlySet<string>, max: number): PeerPath[] {
    const ids = [...new Set(this.node.getConnections().map((c) => c.remotePeer.toString()))].filter((id) => !except.has(id)).sort().slice(0, max);
    return ids.flatMap((peerId) => {
      const path = this.pathTo(peerId);
      if (path === null) return [];
      const via = path === 'relayed' ? this.relayTo(peerId) : undefined;
      return [via !== undefined ? { peerId, path, via } : { peerId, path }];
    });
  }

  stop(): void { this.node.removeEventListener('connection:open', this.onOpen); }
}

/** The peers holding a reservation on this node's relay (they are behind a NAT), or null when it serves none. */
export function relayReservations(node: Libp2p): Set<string> | null {
  const relay = (node.services as Record<string, unknown>).relay as CircuitRelayService | undefined;
  if (relay === undefined) return null;
  return new Set([...relay.reservations.keys()].map((p) => p.toString()));
}

/** A peer's reachability as this relay sees it: behind a NAT when it holds a reservation here. */
export function reachabilityOf(node: Libp2p, peerId: string): Reachability | undefined {
  const r = relayReservations(node);
  if (r === null) return undefined;
  return r.has(peerId) ? 'relay' : 'public';
}

/** Take a reservation on a relay and listen on <relay>/p2p-circuit: the node's addresses then include a
 *  circuit address other members can dial. The relay refuses a peer it has not admitted (RelayRefusedError). */
export async function listenOnRelay(node: Libp2p, relay: string, opts: { signal: AbortSignal }): Promise<string[]> {
  if (!relay.includes('/p2p/')) throw new SchemaError(`relay address needs its /p2p/<peer id>: "${relay}"`);
  const ma = multiaddr(`${relay}/p2p-circuit`);
  opts.signal.throwIfAborted();
  // libp2p 3 has no public listen() after start; its transport manager does (the circuit listener makes the reservation)
  const tm = (node as unknown as { components?: { transportManager?: { listen(a: unknown[]): Promise<void> } } }).components?.transportManager;
  if (tm === undefined) throw new SwarmError('listenOnRelay: this libp2p node exposes no transport manager');
  try {
    await raceSignal(tm.listen([ma]), opts.signal);
  } catch (e) {
    if (opts.signal.aborted) throw opts.signal.reason;
    // the first line that is not a stack frame (libp2p's messages carry the relay's status, e.g. PERMISSION_DENIED)
    const line = (e as Error).message.split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('at ')).slice(-1)[0];
    throw new RelayRefusedError(`relay ${relay} gave no reservation: ${(e as Error).name}${line !== undefined ? `: ${line}` : ''}`);
  }
  return node.getMultiaddrs().map((m) => m.toString()).filter((a) => a.includes('/p2p-circuit'));
}

async function raceSignal<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  let onAbort: (() => void) | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => { onAbort = () => rej(signal.reason); signal.addEventListener('abort', onAbort, { once: true }); })]);
  } finally { if (onAbort) signal.removeEventListener('abort', onAbort); }
}

/** A relay refused this peer a reservation (not admitted, or full), or could not be reached. */
export class RelayRefusedError extends SwarmError {
  override name = 'RelayRefusedError';
}

const hostPort = (ma: { toString(): string }): string => {
  const s = ma.toString();
  const i = s.indexOf('/p2p/');
  return i >= 0 ? s.slice(0, i) : s;
};

/** js-libp2p 3.3's dial queue drops the `initiator: false` that DCUtR passes for its hole-punching dial
 *  (connection-manager/dial-queue.js builds the job's options from peerId, priority, multiaddrs, signal and
 *  onProgress only), so after a TCP simultaneous open both ends upgrade as the initiator and Noise fails
 *  ("handshake stage 1 validation fail"); and the muxer takes its side from the raw connection's direction, not
 *  the upgrader's. This carries the flag around the queue: openConnection notes the addresses of a dial that
 *  must not initiate, and the upgrader takes such a connection as the responder, muxer included. */
export function carryPassiveDials(node: Libp2p): void {
  const c = (node as unknown as { components?: { connectionManager?: any; upgrader?: any } }).components;
  const cm = c?.connectionManager, up = c?.upgrader;
  if (cm === undefined || up === undefined || typeof cm.openConnection !== 'function' || typeof up.upgradeOutbound !== 'function') {
    throw new SwarmError('carryPassiveDials: this libp2p has no connection manager or upgrader to patch');
  }
  const passive = new Map<string, number>();
  const openConnection = cm.openConnection.bind(cm);
  cm.openConnection = async (target: unknown, options: { initiator?: boolean } = {}) => {
    if (options.initiator !== false) return openConnection(target, options);
    const keys = (Array.isArray(target) ? target : [target]).map(hostPort);
    for (const k of keys) passive.set(k, (passive.get(k) ?? 0) + 1);
    try { return await openConnection(target, options); } finally {
      for (const k of keys) { const n = (passive.get(k) ?? 1) - 1; if (n <= 0) passive.delete(k); else passive.set(k, n); }
    }
  };
  const upgradeOutbound = up.upgradeOutbound.bind(up);
  up.upgradeOutbound = (maConn: { remoteAddr: unknown; direction: string }, opts: Record<string, unknown>) => {
    if (!passive.has(hostPort(maConn.remoteAddr as object))) return upgradeOutbound(maConn, opts);
    // the muxer takes its side from the raw connection's direction (yamux: "Both endpoints are clients" otherwise)
    maConn.direction = 'inbound';
    return upgradeOutbound(maConn, { ...opts, initiator: false });
  };
}

/** Peer statuses with each one's reachability as this node's relay sees it (unchanged when it serves none). */
export function withReachability<P extends { peerId: string }>(node: Libp2p, peers: P[]): (P & { reachability?: Reachability })[] {
  const r = relayReservations(node);
  if (r === null) return peers;
  return peers.map((p) => ({ ...p, reachability: r.has(p.peerId) ? 'relay' as const : 'public' as const }));
}

const PRIVATE_V4: [number, number][] = [[0x0a000000, 8], [0xac100000, 12], [0xc0a80000, 16], [0x7f000000, 8], [0x64400000, 10], [0xa9fe0000, 16], [0, 8]];
/** An /ip4/ address outside the private, loopback, shared (CGNAT), link-local and "this network" ranges. */
export function isPublicIp4(addr: string): boolean {
  const m = /^\/ip4\/(\d+)\.(\d+)\.(\d+)\.(\d+)\//.exec(addr);
  if (m === null) return false;
  const v = ((Number(m[1]) << 24) | (Number(m[2]) << 16) | (Number(m[3]) << 8) | Number(m[4])) >>> 0;
  return !PRIVATE_V4.some(([net, bits]) => (v >>> (32 - bits)) === (net >>> (32 - bits)));
}

/** The addresses a NAT-traversing volunteer gives the coordinator for routes: its public listen addresses
 *  and its circuit addresses, in the order given (a volunteer relay's first, the coordinator's last: a dialer
 *  tries circuits in this order). Not its private ones (unreachable from other homes: a dial there hangs
 *  before the circuit is tried) nor the announced NAT address it punches from (a NAT drops unsolicited SYNs
 *  to it; DCUtR learns it through identify). */
export function routeAddrs(own: readonly string[], announce: readonly string[], circuits: string | readonly string[]): string[] {
  const skip = new Set(announce);
  return [...new Set([...own.filter((a) => isPublicIp4(a) && !skip.has(a.replace(/\/p2p\/[^/]+$/, '')) && !a.includes('/p2p-circuit')), ...(typeof circuits === 'string' ? [circuits] : circuits)])];
}

/** A volunteer relay's view of the run's members (the coordinator sends the list with heartbeats, each with a
 *  version): `has` is its relay's isMember. A newer list replaces the older one; a peer that left it (banned)
 *  loses its reservation and its connections, relayed ones included, at once (the relay hangs up on it). */
export class RelayMembers {
  private members = new Set<string>();
  private version = -1;

  has(peerId: string): boolean { return this.members.has(peerId); }
  get current(): number { return this.version; }

  /** Apply a list (at once, before the first await); resolves with the peers dropped from it, hung up on when
   *  `node` is given. */
  async update(version: number, peers: readonly string[], node?: Libp2p): Promise<string[]> {
    if (version <= this.version) return [];
    const next = new Set(peers);
    const dropped = [...this.members].filter((p) => !next.has(p));
    this.members = next;
    this.version = version;
    if (node !== undefined && dropped.length > 0) {
      const gone = new Set(dropped);
      // the relay keeps a reservation until its TTL (2 h) even after the connection closed: drop it now
      const relay = (node.services as Record<string, unknown>).relay as CircuitRelayService | undefined;
      for (const k of [...(relay?.reservations.keys() ?? [])]) if (gone.has(k.toString())) relay!.reservations.delete(k);
      for (const c of node.getConnections().filter((k) => gone.has(k.remotePeer.toString()))) await c.close().catch(() => c.abort(new Error('no longer a member of the run')));
    }
    return dropped;
  }
}
