// What opening a hop ahead of its tensor saves over a WAN link: one stage-to-stage hop (protocol/hop.ts) of
// the bench model's activation (4 × 256 tokens × hidden 512, int8 on the wire) between two libp2p nodes in
// two netlab namespaces, on one long-lived connection, from the moment the tensor is ready to the
// receiver's verdict: sendHop as the tensor is ready (dial reuse, stream negotiation, header, first credit,
// chunk, verdict) against openHop done while the sender "computes" (its stream negotiated and credited
// before the tensor exists; only the chunk and the verdict after). Prints one JSON object on its last line.
//
//   node bench/wan-hop.ts [--rate=100] [--rtt=50] [--reps=5] [--codec=int8]
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { multiaddr } from '@multiformats/multiaddr';
import { createSwarmNode, request, serve } from '../protocol/net.ts';
import { HopInbox, openHop, sendHop } from '../protocol/hop.ts';
import type { HopKey } from '../protocol/hop.ts';
import type { FloatCodec } from '../protocol/tensor.ts';
import { runOverLink } from '../tests/netlab/bench.ts';
import { labSupport } from '../tests/netlab/lab.ts';
import { NODE } from './procs.ts';

const T = 4 * 256, C = 512;
const median = (xs: number[]): number => { const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };
const arg = (name: string, dflt: string): string => { const a = process.argv.find((x) => x.startsWith(`--${name}=`)); return a === undefined ? dflt : a.slice(name.length + 3); };
const keyOf = (attempt: number): HopKey => ({ runId: 'wan-hop', step: 0, mb: 0, attempt, kind: 'act' });

/** The receiving stage: a `heartbeat` request with `step: n` means "expect hop attempt n from me". */
async function server(addr: string): Promise<void> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-wan-hop-'));
  const n = await createSwarmNode({ dataDir: tmp, listen: [`/ip4/${addr}/tcp/4111`] });
  const inbox = new HopInbox();
  await inbox.register(n);
  const never = new AbortController().signal;
  await serve(n, 'heartbeat', async (req, ctx) => {
    inbox.receive(keyOf(req.step), { from: ctx.peerId, shape: [T, C] }, { signal: never, timeoutMs: 120_000 }).catch(() => undefined);
    return { runId: null, ready: true, step: req.step, tokensPerSecond: 0, inflight: 0, busy: false, memoryRssBytes: 0 };
  });
  console.log(`listening ${n.getMultiaddrs()[0]!.toString()}`);
  await new Promise<void>((r) => process.once('SIGTERM', () => r()));
  await n.stop();
  await rm(tmp, { recursive: true, force: true });
}

/** The sending stage: per repetition, one hop sent as its tensor is ready and one opened ahead. */
async function client(target: string, reps: number, codec: FloatCodec): Promise<Record<string, number[]>> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-wan-hop-'));
  const n = await createSwarmNode({ dataDir: tmp, listen: ['/ip4/0.0.0.0/tcp/0'] });
  try {
    const conn = await n.dial(multiaddr(target));
    const peer = conn.remotePeer, addrs = [conn.remoteAddr];
    const data = new Float32Array(T * C).map((_, i) => Math.sin(i * 0.37) * (1 + (i % 7)));
    const signal = new AbortController().signal;
    const opts = { signal, timeoutMs: 120_000, codec, expectPeer: peer.toString() };
    let attempt = 0;
    const expect = async () => { const a = attempt++; await request(n, peer, 'heartbeat', { runId: 'wan-hop', step: a, sentAtMs: Date.now() }, { timeoutMs: 60_000 }); return a; };
    const out: Record<string, number[]> = { cold: [], opened_ahead: [] };
    for (let i = 0; i <= reps; i++) {
      // as the tensor is ready: everything from the dial on follows it
      let a = await expect();
      await new Promise((r) => setTimeout(r, 300));
      let t0 = performance.now();
      await sendHop(n, addrs, keyOf(a), [T, C], data, opts);
      if (i > 0) out.cold!.push(performance.now() - t0);   // the first of each is a warm-up
      // opened while the sender computes (here: waits 300 ms, more than the opening's round trips)
      a = await expect();
      const h = openHop(n, addrs, keyOf(a), [T, C], opts);
      await new Promise((r) => setTimeout(r, 300));
      t0 = performance.now();
      await h.send(data);
      if (i > 0) out.opened_ahead!.push(performance.now() - t0);
    }
    return out;
  } finally {
    await n.stop();
    await rm(tmp, { recursive: true, force: true });
  }
}

export async function benchWanHop(o: { rateMbit: number; rttMs: number; reps: number; codec: FloatCodec }): Promise<Record<string, unknown>> {
  const why = labSupport({ delay: true });
  if (why !== null) return { skipped: why };
  const r = await runOverLink({ rateMbit: o.rateMbit, delayMs: o.rttMs / 2 }, {
    server: { cmd: NODE, args: [import.meta.filename, '--serve', '{server}'], ready: /listening/ },
    client: { cmd: NODE, args: [import.meta.filename, '--client', '{server}', String(o.reps), o.codec] },
    timeoutMs: 300_000,
  });
  if (r.client.code !== 0) throw new Error(`bench/wan-hop client failed: ${r.client.stderr.slice(-1500)}`);
  const ms = JSON.parse(r.client.stdout.trim().split('\n').at(-1)!) as Record<string, number[]>;
  const fig = (xs: number[]) => ({ ms_median: Number(median(xs).toFixed(1)), ms_all: xs.map((x) => Number(x.toFixed(1))) });
  const cold = fig(ms.cold!), ahead = fig(ms.opened_ahead!);
  return {
    how: 'one hop of a [1024, 512] activation per repetition on one long-lived connection, from the tensor being ready to the receiver\'s verdict: sendHop then (cold) against openHop 300 ms before (opened ahead); medians after one warm-up each',
    rate_mbit: o.rateMbit, rtt_ms: o.rttMs, codec: o.codec, cold, opened_ahead: ahead,
    saved_ms: Number((cold.ms_median - ahead.ms_median).toFixed(1)), saved_rtts: Number(((cold.ms_median - ahead.ms_median) / o.rttMs).toFixed(2)),
  };
}

if (import.meta.main) {
  const i = process.argv.indexOf('--serve'), j = process.argv.indexOf('--client');
  if (i >= 0) await server(process.argv[i + 1]!);
  else if (j >= 0) console.log(JSON.stringify(await client(`/ip4/${process.argv[j + 1]!}/tcp/4111`, Number(process.argv[j + 2]), process.argv[j + 3] as FloatCodec)));
  else console.log(JSON.stringify(await benchWanHop({ rateMbit: Number(arg('rate', '100')), rttMs: Number(arg('rtt', '50')), reps: Number(arg('reps', '5')), codec: arg('codec', 'int8') as FloatCodec })));
}
