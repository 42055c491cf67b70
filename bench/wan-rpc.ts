// Round trips a request costs over a WAN link: one `request()` (protocol/net.ts: a new yamux stream,
// protocol negotiation, one request frame, one response frame) of a 2 MiB `weights` response between two
// libp2p nodes in two netlab namespaces, on one long-lived connection, with protocol/net.ts's yamux windows
// (the library's 256 KiB initial) and with a 4 MiB initial window. Prints one JSON object on its last stdout line.
//
//   node bench/wan-rpc.ts [--rate=100] [--rtt=50] [--bytes=2097152] [--reps=5] [--idle-ms=300] [--keep-cwnd]
//
// --keep-cwnd sets tcp_slow_start_after_idle=0 in the server's namespace (the Linux default, 1, restarts
// TCP slow start on a connection idle for an RTO: that, not yamux, then dominates).
//
// RTTs needed = (median request time − bytes on the wire / rate) / RTT, the bytes on the wire being the
// response plus Noise (16 B per 64 KiB record), yamux (12 B per frame) and TCP/IP/Ethernet (66 B per
// 1448 B segment) overheads, as the shaper counts them.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createSwarmNode, MAX_STREAM_WINDOW_BYTES, request, serve, STREAM_WINDOW_BYTES } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { multiaddr } from '@multiformats/multiaddr';
import { runOverLink } from '../tests/netlab/bench.ts';
import { labSupport } from '../tests/netlab/lab.ts';
import { NODE } from './procs.ts';

/** protocol/net.ts's windows (the library's defaults) and a window of 4 MiB, which holds 100 Mbit/s × 330 ms in flight */
const LIBRARY = { initialBytes: STREAM_WINDOW_BYTES, maxBytes: MAX_STREAM_WINDOW_BYTES };
const TUNED = { initialBytes: 4 * 1024 * 1024, maxBytes: MAX_STREAM_WINDOW_BYTES };
const SHA = 'a'.repeat(64);
const median = (xs: number[]): number => { const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };
const arg = (name: string, dflt: number): number => { const a = process.argv.find((x) => x.startsWith(`--${name}=`)); return a === undefined ? dflt : Number(a.slice(name.length + 3)); };

async function node(dir: string, listen: string, window: typeof TUNED): Promise<SwarmNode> {
  return createSwarmNode({ dataDir: dir, listen: [listen], streamWindow: window });
}

/** In the server namespace: serve `weights` with `bytes`-long chunks on two ports (library, tuned windows). */
async function server(addr: string, bytes: number, keepCwnd: boolean): Promise<void> {
  // the sender's congestion window after idle: Linux (per network namespace) restarts slow start after an
  // idle RTO unless tcp_slow_start_after_idle is 0; this namespace is the lab's own
  if (keepCwnd) await writeFile('/proc/sys/net/ipv4/tcp_slow_start_after_idle', '0');
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-wan-rpc-'));
  const body = new Uint8Array(bytes).map((_, i) => (i * 2654435761) >>> 24);
  const nodes = [await node(path.join(tmp, 'l'), `/ip4/${addr}/tcp/4101`, LIBRARY), await node(path.join(tmp, 't'), `/ip4/${addr}/tcp/4102`, TUNED)];
  for (const n of nodes) await serve(n, 'weights', async (req) => ({ sizeBytes: bytes, bytes: body.subarray(0, req.length) }));
  console.log(`listening ${nodes.map((n) => n.getMultiaddrs()[0]!.toString()).join(' ')}`);
  await new Promise<void>((r) => process.once('SIGTERM', () => r()));
  for (const n of nodes) await n.stop();
  await rm(tmp, { recursive: true, force: true });
}

/** In the client namespace: `reps` requests per window setting on one connection after one warm-up request. */
async function client(targets: string[], bytes: number, reps: number, idleMs: number): Promise<Record<string, number[]>> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-wan-rpc-'));
  const out: Record<string, number[]> = {};
  try {
    for (const [name, window, target] of [['library', LIBRARY, targets[0]!], ['tuned', TUNED, targets[1]!]] as const) {
      const n = await node(path.join(tmp, name), '/ip4/0.0.0.0/tcp/0', window);
      // by peer id, as the swarm's requests go: the address only for the first dial (an address without
      // /p2p/ would open a new connection per request)
      const peer = (await n.dial(multiaddr(target))).remotePeer;
      const ask = () => request(n, peer, 'weights', { sha256: SHA, offset: 0, length: bytes }, { timeoutMs: 120_000 });
      await ask();    // warm-up (yamux's per-stream window growth does not carry over to the next stream)
      const ms: number[] = [];
      for (let i = 0; i < reps; i++) {
        if (idleMs > 0) await new Promise((r) => setTimeout(r, idleMs));   // idle between requests, as a step's are
        const t0 = performance.now();
        const r = await ask();
        ms.push(performance.now() - t0);
        if (r.bytes.length !== bytes) throw new Error(`got ${r.bytes.length} bytes, wanted ${bytes}`);
      }
      out[name] = ms;
      await n.stop();
    }
    return out;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

export async function benchWanRpc(o: { rateMbit: number; rttMs: number; bytes: number; reps: number; keepCwnd: boolean; idleMs: number }): Promise<Record<string, unknown>> {
  const why = labSupport({ delay: true });
  if (why !== null) return { skipped: why };
  const r = await runOverLink({ rateMbit: o.rateMbit, delayMs: o.rttMs / 2 }, {
    server: { cmd: NODE, args: [import.meta.filename, '--serve', '{server}', String(o.bytes), o.keepCwnd ? 'keep-cwnd' : 'slow-start-after-idle'], ready: /listening/ },
    client: { cmd: NODE, args: [import.meta.filename, '--client', '{server}', String(o.bytes), String(o.reps), String(o.idleMs)] },
    timeoutMs: 300_000,
  });
  if (r.client.code !== 0) throw new Error(`bench/wan-rpc client failed: ${r.client.stderr.slice(-1500)}`);
  const ms = JSON.parse(r.client.stdout.trim().split('\n').at(-1)!) as Record<string, number[]>;
  const records = Math.ceil(o.bytes / 65519), segments = Math.ceil((o.bytes + 16 * records + 12 * (records + 2)) / 1448);
  const wireBytes = o.bytes + 16 * records + 12 * (records + 2) + 66 * segments;
  const transferMs = wireBytes * 8 / (o.rateMbit * 1e6) * 1000;
  const fig = (xs: number[]) => ({ ms_median: Number(median(xs).toFixed(1)), ms_all: xs.map((x) => Number(x.toFixed(1))), rtts_needed: Number(((median(xs) - transferMs) / o.rttMs).toFixed(2)) });
  return {
    how: 'one request() of a `weights` response per repetition, on one long-lived libp2p connection (after a warm-up request), idle_ms between requests; RTTs needed = (median − wire bytes / rate) / RTT',
    rate_mbit: o.rateMbit, rtt_ms: o.rttMs, tcp_slow_start_after_idle: o.keepCwnd ? 0 : 1, idle_ms: o.idleMs, response_bytes: o.bytes, transfer_ms_at_rate: Number(transferMs.toFixed(1)),
    library_window: { initial_bytes: LIBRARY.initialBytes, max_bytes: LIBRARY.maxBytes, ...fig(ms.library!) },
    tuned_window: { initial_bytes: TUNED.initialBytes, max_bytes: TUNED.maxBytes, ...fig(ms.tuned!) },
  };
}

if (import.meta.main) {
  const i = process.argv.indexOf('--serve'), j = process.argv.indexOf('--client');
  if (i >= 0) await server(process.argv[i + 1]!, Number(process.argv[i + 2]), process.argv[i + 3] === 'keep-cwnd');
  else if (j >= 0) {
    // fixed ports; no peer id in the address (Noise learns it)
    const server = process.argv[j + 1]!;
    console.log(JSON.stringify(await client([`/ip4/${server}/tcp/4101`, `/ip4/${server}/tcp/4102`], Number(process.argv[j + 2]), Number(process.argv[j + 3]), Number(process.argv[j + 4]))));
  } else {
    console.log(JSON.stringify(await benchWanRpc({ rateMbit: arg('rate', 100), rttMs: arg('rtt', 50), bytes: arg('bytes', 2 * 1024 * 1024), reps: arg('reps', 5), keepCwnd: process.argv.includes('--keep-cwnd'), idleMs: arg('idle-ms', 300) })));
  }
}
