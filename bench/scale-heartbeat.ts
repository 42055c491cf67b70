// The coordinator's CPU per heartbeat, measured: a real StagePeerClient in this process sends heartbeats over
// real libp2p (TCP + Noise + Yamux on 127.0.0.1) to volunteers' heartbeat handlers in a child process, so
// process.cpuUsage() here counts the coordinator's end only (request encode, stream open, schema check of the
// answer). The simulator's heartbeat cost (sim/, docs/scale.md) is this figure.
//   node bench/scale-heartbeat.ts [--beats N] [--peers N]       prints one JSON line
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { createSwarmNode, dialableAddrs, parseMultiaddr, serve } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { StagePeerClient } from '../protocol/stage-client.ts';

export interface HeartbeatCost {
  peers: number;
  beats: number;
  /** coordinator CPU (user + system) per heartbeat, ms */
  cpu_ms_per_heartbeat: number;
  /** the same, when the heartbeats of a round go out at once (as PeerRegistry.heartbeatAll sends them) */
  cpu_ms_per_heartbeat_concurrent: number;
  wall_ms_per_round_trip: number;
  loadavg: number[];
}

/** The child: `peers` swarm nodes answering heartbeats like a volunteer that holds its stage. */
async function servePeers(n: number): Promise<void> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-hb-peer-'));
  const nodes: SwarmNode[] = [];
  for (let i = 0; i < n; i++) {
    const node = await createSwarmNode({ dataDir: path.join(dir, String(i)) });
    await serve(node, 'heartbeat', async (req) => ({ runId: req.runId, ready: true, step: req.step, tokensPerSecond: 812.5, inflight: 1, busy: true, memoryRssBytes: 3_221_225_472 }));
    nodes.push(node);
    process.stdout.write(`${dialableAddrs(node)[0]}\n`);
  }
  // the parent closes stdin when done; a parent that died also ends it
  process.stdin.resume();
  const stop = async () => { for (const x of nodes) await x.stop(); await rm(dir, { recursive: true, force: true }); process.exit(0); };
  process.stdin.on('end', () => void stop());
  setTimeout(() => void stop(), 120_000).unref();
}

const cpuMs = (u: NodeJS.CpuUsage) => (u.user + u.system) / 1000;

export async function heartbeatCost(o: { beats: number; peers: number }): Promise<HeartbeatCost> {
  const child = spawn(process.execPath, [import.meta.filename, '--serve', String(o.peers)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const kill = setTimeout(() => child.kill('SIGKILL'), 110_000);
  const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-hb-coord-'));
  const coord = await createSwarmNode({ dataDir: dir });
  try {
    const addrs: string[] = [];
    const lines = createInterface({ input: child.stdout! });
    for await (const l of lines) { addrs.push(l.trim()); if (addrs.length === o.peers) break; }
    const targets = addrs.map((a) => parseMultiaddr(a));
    const client = new StagePeerClient({ node: coord, runId: 'hb-bench', timeouts: { computeTimeoutMs: 30_000, controlTimeoutMs: 30_000, heartbeatTimeoutMs: 5000, probeTimeoutMs: 1500, noticeTimeoutMs: 5000 } });
    // connections up and warm (the registry's heartbeats reuse a connection)
    for (let i = 0; i < 3; i++) await Promise.all(targets.map((t) => client.heartbeat([t], 0)));
    const rounds = Math.max(1, Math.ceil(o.beats / o.peers));
    let c0 = process.cpuUsage();
    let t0 = performance.now();
    for (let r = 0; r < rounds; r++) for (const t of targets) await client.heartbeat([t], r);
    const seqCpu = cpuMs(process.cpuUsage(c0)), seqWall = performance.now() - t0;
    c0 = process.cpuUsage();
    t0 = performance.now();
    for (let r = 0; r < rounds; r++) await Promise.all(targets.map((t) => client.heartbeat([t], r)));
    const conCpu = cpuMs(process.cpuUsage(c0));
    const n = rounds * targets.length;
    return {
      peers: o.peers, beats: n, cpu_ms_per_heartbeat: Number((seqCpu / n).toFixed(4)), cpu_ms_per_heartbeat_concurrent: Number((conCpu / n).toFixed(4)),
      wall_ms_per_round_trip: Number((seqWall / n).toFixed(3)), loadavg: os.loadavg().map((x) => Number(x.toFixed(2))),
    };
  } finally {
    child.stdin!.end();
    await coord.stop();
    await rm(dir, { recursive: true, force: true });
    await new Promise<void>((r) => { if (child.exitCode !== null) r(); else child.once('exit', () => r()); });
    clearTimeout(kill);
  }
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  if (argv[0] === '--serve') await servePeers(Number(argv[1] ?? '1'));
  else {
    const arg = (k: string, d: number) => { const i = argv.indexOf(k); return i >= 0 ? Number(argv[i + 1]) : d; };
    console.log(JSON.stringify(await heartbeatCost({ beats: arg('--beats', 2000), peers: arg('--peers', 8) })));
  }
}
