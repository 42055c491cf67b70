// A swarm node with NAT traversal (protocol/nat.ts) run inside a netlab namespace and driven over stdin/stdout,
// one JSON object a line each way. tests/nat.test.ts starts one per host.
//
//   argv[2]: JSON { role, dataDir, listen, announce?, dialPort?, relayServer? }
//   in:  {id, cmd: 'admit', peerId} | {id, cmd: 'expel', peerId} | {id, cmd: 'reserve', relay} | {id, cmd: 'dial', addr} | {id, cmd: 'paths'}
//        {id, cmd: 'expect', key, from, shape, timeoutMs} | {id, cmd: 'send', addrs, key, to, shape, seed, timeoutMs}
//        {id, cmd: 'reservations'} | {id, cmd: 'waitPath', peer, path, timeoutMs}
//   out: {event: 'ready', peerId, addrs} first, then {id, ok: true, ...} or {id, ok: false, error} per command
import { createInterface } from 'node:readline';
import { createSwarmNode } from '../../protocol/net.ts';
import { listenOnRelay, PathBook, RelayMembers, relayReservations } from '../../protocol/nat.ts';
import type { NatRole } from '../../protocol/nat.ts';
import { HopInbox, sendHop } from '../../protocol/hop.ts';
import type { HopKey } from '../../protocol/hop.ts';
import { multiaddr } from '@multiformats/multiaddr';

interface PeerArgs { role: NatRole; dataDir: string; listen: string[]; relays?: string[]; announce?: string[]; dialPort?: number; relayServer?: boolean; holePunchTimeoutMs?: number }
const args = JSON.parse(process.argv[2] ?? '{}') as PeerArgs;
// the relay's members as a volunteer relay holds them (RelayMembers: a new version per change; one dropped is hung up on)
const members = new RelayMembers();
const admitted = new Set<string>();
const node = await createSwarmNode({
  dataDir: args.dataDir, listen: args.listen,
  nat: { role: args.role, relays: args.relays, announce: args.announce, dialPort: args.dialPort, relayServer: args.relayServer, holePunchTimeoutMs: args.holePunchTimeoutMs, isMember: (p) => members.has(p) },
});
const paths = new PathBook(node);
const inbox = new HopInbox();
await inbox.register(node);
const stop = new AbortController();
const out = (o: unknown): void => { process.stdout.write(JSON.stringify(o) + '\n'); };

/** Deterministic data of n elements (the receiver checks the same function's output). */
export function pattern(n: number, seed: number): Float32Array {
  const x = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; x[i] = (s / 2 ** 32) - 0.5; }
  return x;
}

const pathList = () => node.getConnections().filter((c) => c.status === 'open').map((c) => ({ peer: c.remotePeer.toString(), addr: c.remoteAddr.toString(), path: paths.pathOf(c) }));

async function handle(m: Record<string, any>): Promise<Record<string, unknown>> {
  const signal = AbortSignal.any([stop.signal, AbortSignal.timeout(Math.min(Number(m.timeoutMs ?? 20_000), 60_000))]);
  switch (m.cmd) {
    case 'admit': admitted.add(String(m.peerId)); await members.update(members.current + 1, [...admitted], node); return {};
    case 'expel': admitted.delete(String(m.peerId)); return { dropped: await members.update(members.current + 1, [...admitted], node) };
    case 'reserve': return { addrs: await listenOnRelay(node, String(m.relay), { signal }) };
    case 'reservations': return { peers: [...(relayReservations(node) ?? [])] };
    case 'dial': { const c = await node.dial(multiaddr(String(m.addr)), { signal }); return { peer: c.remotePeer.toString(), path: paths.pathOf(c) }; }
    case 'paths': return { connections: pathList() };
    case 'waitPath': {
      // bounded: until the best connection to the peer has the path, or the deadline
      for (let i = 0; i < 1200 && !signal.aborted; i++) {
        if (paths.pathTo(String(m.peer)) === m.path) return { connections: pathList() };
        await new Promise((r) => setTimeout(r, 50));
      }
      throw new Error(`no ${String(m.path)} connection to ${String(m.peer)} in time; connections: ${JSON.stringify(pathList())}`);
    }
    case 'expect': {
      const shape = m.shape as [number, number];
      const got = await inbox.receive(m.key as HopKey, { from: String(m.from), shape }, { signal, timeoutMs: Number(m.timeoutMs ?? 20_000) });
      const want = pattern(shape[0] * shape[1], Number(m.seed));
      const same = got.data.length === want.length && got.data.every((v, i) => Object.is(v, want[i]));
      return { same, path: paths.pathTo(String(m.from)) };
    }
    case 'send': {
      const shape = m.shape as [number, number];
      const r = await sendHop(node, (m.addrs as string[]).map((a) => multiaddr(a)), m.key as HopKey, shape, pattern(shape[0] * shape[1], Number(m.seed)),
        { expectPeer: String(m.to), codec: 'f32', timeoutMs: Number(m.timeoutMs ?? 20_000), signal });
      return { bytes: r.bytes, path: paths.pathTo(String(m.to)) };
    }
    default: throw new Error(`unknown command ${JSON.stringify(m.cmd)}`);
  }
}

out({ event: 'ready', peerId: node.peerId.toString(), addrs: node.getMultiaddrs().map((a) => a.toString()) });
const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  let m: Record<string, any>;
  try { m = JSON.parse(line) as Record<string, any>; } catch { out({ ok: false, error: `not JSON: ${line.slice(0, 200)}` }); return; }
  handle(m).then((r) => out({ id: m.id, ok: true, ...r }), (e: Error) => out({ id: m.id, ok: false, error: `${e.name}: ${e.message}` }));
});
const quit = async (): Promise<void> => { stop.abort(); lines.close(); paths.stop(); await Promise.resolve(node.stop()).catch(() => {}); process.exit(0); };
lines.on('close', () => { void quit(); });
process.once('SIGTERM', () => { void quit(); });
