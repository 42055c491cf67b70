// Loopback throughput: libp2p streams (the project's own node setup, protocol/net.ts: TCP + Noise +
// Yamux) against raw TCP (node:net), for large transfers, plus the project's one-frame RPC path
// (msgpack frame + schema check + one stream per request) on the `weights` protocol with 8 MiB chunks,
// and the bytes libp2p adds on the wire (counted by a TCP proxy in front of the receiver).
//
// The receiver runs in a child process (`node bench/net.ts --sink`), as a remote peer would, so sender
// and receiver each have their own event loop; on a 2-core machine they share the cores.
import net from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Stream, Connection } from '@libp2p/interface';
import { createSwarmNode, request, serve, parseMultiaddr } from '../protocol/net.ts';
import { CHUNK_BYTES } from '../protocol/constants.ts';
import { startProc, NODE, kill } from './procs.ts';

const SINK_PROTO = '/swarmtune-bench/sink/1.0.0';
const r1 = (x: number) => Number(x.toFixed(1));
const MB = 1e6;

type Chunk = Uint8Array | { subarray(): Uint8Array };
const len = (c: Chunk) => (c instanceof Uint8Array ? c : c.subarray()).length;

/** the receiver: runs until its parent kills it (the parent owns and removes `dir`) */
async function sink(dir: string): Promise<void> {
  const node = await createSwarmNode({ dataDir: dir });
  await node.handle(SINK_PROTO, async (stream: Stream, _c: Connection) => {
    let n = 0;
    for await (const c of stream as AsyncIterable<Chunk>) n += len(c);
    const ack = new Uint8Array(8);
    new DataView(ack.buffer).setFloat64(0, n);
    stream.send(ack);
    await stream.close();
  }, { maxInboundStreams: 16 });
  const blob = new Uint8Array(CHUNK_BYTES).fill(7);
  await serve(node, 'weights', async (req) => ({ sizeBytes: 1 << 40, bytes: blob.subarray(0, Math.min(blob.length, req.length)) }));
  const server = net.createServer((sock) => {
    let n = 0;
    sock.on('data', (d) => { n += d.length; });
    sock.on('end', () => { const ack = Buffer.alloc(8); ack.writeDoubleBE(n); sock.end(ack); });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const tcpPort = (server.address() as net.AddressInfo).port;
  const ma = node.getMultiaddrs()[0]!.toString();
  const libp2pPort = Number(/\/tcp\/(\d+)/.exec(ma)![1]);
  process.stdout.write(JSON.stringify({ multiaddr: ma, peerId: node.peerId.toString(), libp2pPort, tcpPort }) + '\n');
}

/** a counting TCP proxy in front of `port` */
async function proxy(port: number): Promise<{ port: number; up: () => number; down: () => number; close: () => void }> {
  let up = 0, down = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(port, '127.0.0.1');
    client.on('data', (d) => { up += d.length; if (!upstream.write(d)) { client.pause(); upstream.once('drain', () => client.resume()); } });
    upstream.on('data', (d) => { down += d.length; if (!client.write(d)) { upstream.pause(); client.once('drain', () => upstream.resume()); } });
    client.on('end', () => upstream.end());
    upstream.on('end', () => client.end());
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as net.AddressInfo).port, up: () => up, down: () => down, close: () => server.close() };
}

async function tcpSend(port: number, bytes: number, chunk: Uint8Array): Promise<number> {
  const sock = net.connect(port, '127.0.0.1');
  await new Promise<void>((r, j) => { sock.once('connect', () => r()); sock.once('error', j); });
  sock.setNoDelay(true);
  const t0 = performance.now();
  let sent = 0;
  const ack = new Promise<number>((r) => { const parts: Buffer[] = []; sock.on('data', (d) => parts.push(d)); sock.on('end', () => r(Buffer.concat(parts).readDoubleBE(0))); });
  while (sent < bytes) {
    const c = chunk.subarray(0, Math.min(chunk.length, bytes - sent));
    sent += c.length;
    if (!sock.write(c)) await new Promise((r) => sock.once('drain', r));
  }
  sock.end();
  const got = await ack;
  const ms = performance.now() - t0;
  if (got !== bytes) throw new Error(`tcp sink got ${got} of ${bytes} bytes`);
  return ms;
}

export async function benchNet(opts: { bytes?: number; reps?: number; log?: (s: string) => void } = {}): Promise<Record<string, unknown>> {
  const bytes = opts.bytes ?? 128 * 1024 * 1024;
  const reps = opts.reps ?? 3;
  const log = opts.log ?? (() => {});
  const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-net-'));
  const child = startProc(NODE, [path.join(import.meta.dirname, 'net.ts'), `--sink=${path.join(dir, 'sink')}`]);
  const node = await createSwarmNode({ dataDir: path.join(dir, 'sender') });
  try {
    while (child.events.length === 0) {
      if (child.child.exitCode !== null) throw new Error(`net sink exited: ${child.stderr.join('')}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    const info = child.events[0]! as unknown as { multiaddr: string; peerId: string; libp2pPort: number; tcpPort: number };
    const target = parseMultiaddr(info.multiaddr);
    const chunk = new Uint8Array(64 * 1024).fill(1);

    const p2pSend = async (to: typeof target, n: number, from = node): Promise<number> => {
      const t0 = performance.now();
      const stream = await from.dialProtocol(to, SINK_PROTO);
      let sent = 0;
      while (sent < n) {
        const c = chunk.subarray(0, Math.min(chunk.length, n - sent));
        sent += c.length;
        if (!stream.send(c)) await stream.onDrain();
      }
      await stream.close();
      let got = -1;
      for await (const c of stream as AsyncIterable<Chunk>) { const b = c instanceof Uint8Array ? c : c.subarray(); got = new DataView(b.buffer, b.byteOffset, 8).getFloat64(0); }
      if (got !== n) throw new Error(`libp2p sink got ${got} of ${n} bytes`);
      return performance.now() - t0;
    };
    log(`net: raw TCP and libp2p streams, ${bytes / 2 ** 20} MiB x ${reps}`);
    await p2pSend(target, 4 * 1024 * 1024); // connection + Noise handshake, warm-up
    await tcpSend(info.tcpPort, 4 * 1024 * 1024, chunk);
    const tcpMs: number[] = [], p2pMs: number[] = [];
    for (let i = 0; i < reps; i++) {
      tcpMs.push(await tcpSend(info.tcpPort, bytes, chunk));
      p2pMs.push(await p2pSend(target, bytes));
    }
    // one-frame RPCs on the project's weights protocol: 8 MiB chunks, as blob downloads use
    const rpcBytes = Math.min(bytes, 64 * 1024 * 1024);
    const rpcOnce = async () => {
      const t0 = performance.now();
      for (let off = 0; off < rpcBytes; off += CHUNK_BYTES) await request(node, target, 'weights', { sha256: '0'.repeat(64), offset: off, length: CHUNK_BYTES });
      return performance.now() - t0;
    };
    await rpcOnce();
    const rpcMs: number[] = [];
    for (let i = 0; i < reps; i++) rpcMs.push(await rpcOnce());
    // small-request latency (one stream, one tiny frame each way)
    const rtt: number[] = [];
    for (let i = 0; i < 50; i++) { const t0 = performance.now(); await request(node, target, 'weights', { sha256: '0'.repeat(64), offset: 0, length: 16 }); rtt.push(performance.now() - t0); }
    rtt.sort((a, b) => a - b);
    // bytes on the wire through a counting proxy: a fresh connection (handshake) then a large stream
    // (a second sender node: the first one would reuse its direct connection to the receiver's peer id)
    const px = await proxy(info.libp2pPort);
    const viaProxy = parseMultiaddr(`/ip4/127.0.0.1/tcp/${px.port}/p2p/${info.peerId}`);
    const fresh = await createSwarmNode({ dataDir: path.join(dir, 'sender2') });
    let handshakeUp = 0, handshakeDown = 0, streamUp = 0;
    const probe = 32 * 1024 * 1024;
    try {
      await p2pSend(viaProxy, 1, fresh);
      handshakeUp = px.up(); handshakeDown = px.down();
      await p2pSend(viaProxy, probe, fresh);
      streamUp = px.up() - handshakeUp;
    } finally {
      await fresh.stop();
      px.close();
    }
    const best = (xs: number[]) => Math.min(...xs);
    const tcpMBps = bytes / MB / (best(tcpMs) / 1000), p2pMBps = bytes / MB / (best(p2pMs) / 1000);
    return {
      how: 'receiver in a child process; sender writes 64 KiB chunks and waits for the receiver to acknowledge the byte count; best of reps after a warm-up; MB = 1e6 bytes',
      transfer_mib: bytes / 2 ** 20, reps,
      tcp_MBps: r1(tcpMBps),
      libp2p_stream_MBps: r1(p2pMBps),
      libp2p_over_tcp: Number((p2pMBps / tcpMBps).toFixed(3)),
      rpc_weights_8MiB_frames_MBps: r1(rpcBytes / MB / (best(rpcMs) / 1000)),
      rpc_small_request_ms: { median: Number(rtt[rtt.length >> 1]!.toFixed(2)), p90: Number(rtt[Math.floor(rtt.length * 0.9)]!.toFixed(2)) },
      wire_overhead: {
        connection_setup_and_1_byte_stream_bytes: { to_receiver: handshakeUp, from_receiver: handshakeDown },
        stream_payload_bytes: probe, stream_wire_bytes: streamUp,
        overhead_pct: Number((100 * (streamUp - probe) / probe).toFixed(3)),
      },
    };
  } finally {
    await node.stop();
    kill(child);
    await child.exit;
    await rm(dir, { recursive: true, force: true });
  }
}

const sinkArg = process.argv.find((a) => a.startsWith('--sink='));
if (sinkArg !== undefined) {
  await sink(sinkArg.slice(7));
} else if (import.meta.main) {
  console.log(JSON.stringify(await benchNet({ log: (s) => process.stderr.write(s + '\n') })));
}
