// Weights from peers: how long a joining volunteer takes to have its shard blob on disk and verified when 1, 4
// or 8 peers hold it. Real libp2p nodes on 127.0.0.1 (protocol/net.ts: TCP + Noise + Yamux), each provider in
// its own process (`node bench/blob-fetch.ts --provider=...`, as a remote peer would be), serving `weights`
// from its own BlobStore through a token bucket of `rateMBps` (a home uplink: without it
// loopback is as fast with one provider as with eight, and the figure would say nothing); the joiner fetches
// with BlobStore.fetch exactly as node/assignment.ts does (chunks from every provider at once, each chunk's
// sha256 and then the whole blob's checked, fsync, rename).
//
//   node bench/blob-fetch.ts [--quick]     (JSON on stdout; npm run bench -- --only blobs runs it)
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BlobStore, hashBlob, type BlobEvent } from '../protocol/blobs.ts';
import { CHUNK_BYTES } from '../protocol/constants.ts';
import type { BlobRef } from '../protocol/messages.ts';
import { createSwarmNode, dialableAddrs, serve, type SwarmNode } from '../protocol/net.ts';
import { startProc, NODE, kill, waitEvent, type Proc } from './procs.ts';

export interface BlobBenchOptions {
  /** the blob's size (default 256 MiB, 32 MiB quick) */
  sizeBytes: number;
  /** the publisher's chunk size (default CHUNK_BYTES, the coordinator's) */
  chunkBytes: number;
  /** each provider's upload rate, MB/s (10^6 bytes); 0: no limit (what this machine's CPUs allow) */
  rateMBps: number;
  providerCounts: number[];
  /** fetches per provider count (each by a fresh joiner); the best one is reported with all of them */
  reps: number;
  log?: (s: string) => void;
}

/** A provider's uplink: a chunk leaves only when the bucket has its bytes (no burst beyond one chunk). */
class TokenBucket {
  private freeAtMs = 0;
  private readonly bytesPerMs: number;
  constructor(bytesPerMs: number) { this.bytesPerMs = bytesPerMs; }
  async take(n: number): Promise<void> {
    const now = performance.now();
    this.freeAtMs = Math.max(now, this.freeAtMs) + n / this.bytesPerMs;
    const wait = this.freeAtMs - now;
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
}

function blobBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = 0x9e3779b9;
  for (let i = 0; i < n; i += 4) { x = (x * 1664525 + 1013904223) >>> 0; b[i] = x & 255; b[i + 1] = (x >>> 8) & 255; b[i + 2] = (x >>> 16) & 255; b[i + 3] = x >>> 24; }
  return b;
}

const r1 = (x: number) => Number(x.toFixed(1));

export async function benchBlobFetch(o: BlobBenchOptions): Promise<Record<string, unknown>> {
  const log = o.log ?? (() => {});
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-blobs-'));
  const nodes: SwarmNode[] = [];
  const procs: Proc[] = [];
  try {
    const bytes = blobBytes(o.sizeBytes);
    const sha256 = createHash('sha256').update(bytes).digest('hex');
    const { chunkSha256 } = hashBlob(bytes, o.chunkBytes);
    const maxProviders = Math.max(...o.providerCounts);
    const providers: Array<{ proc: Proc; addr: string; served: () => number }> = [];
    for (let i = 0; i < maxProviders; i++) {
      const proc = startProc(NODE, [import.meta.filename, `--provider=${path.join(tmp, `p${i}`)}`, `--size=${o.sizeBytes}`, `--chunk=${o.chunkBytes}`, `--rate=${o.rateMBps}`]);
      procs.push(proc);
      const ready = await waitEvent(proc, (e) => e.addr !== undefined, `blob provider ${i}`, 300_000);
      // each served chunk is one {"served": bytes} line on the provider's stdout
      const served = () => proc.events.reduce((a, e) => a + (typeof e.served === 'number' ? e.served : 0), 0);
      providers.push({ proc, addr: String(ready.addr), served });
    }
    const runs = [];
    for (const count of o.providerCounts) {
      const ms: number[] = [];
      let shares: number[] = [];
      let failures = 0;
      for (let rep = 0; rep < o.reps; rep++) {
        const dir = path.join(tmp, `j${count}-${rep}`);
        const node = await createSwarmNode({ dataDir: dir });
        nodes.push(node);
        const joiner = new BlobStore(dir);
        const events: BlobEvent[] = [];
        joiner.onEvent = (e) => events.push(e);
        const use = providers.slice(0, count);
        const before = use.map((p) => p.served());
        const ref: BlobRef = { name: 'bench', sha256, sizeBytes: o.sizeBytes, providers: use.map((p) => p.addr), chunkBytes: o.chunkBytes, chunkSha256 };
        const t0 = performance.now();
        await joiner.fetch(node, ref);
        ms.push(performance.now() - t0);
        // a provider that failed (a reset stream under load) is counted, not fatal: its chunks came from the others
        failures += events.filter((e) => e.kind === 'provider-failed').length;
        // the providers' stdout lines may trail their responses: wait for them (up to 10 s)
        const share = () => use.map((p, k) => p.served() - before[k]!);
        for (const t1 = performance.now() + 10_000; share().reduce((a, b) => a + b, 0) < o.sizeBytes && performance.now() < t1;) await new Promise((r) => setTimeout(r, 20));
        shares = share();
        if (shares.reduce((a, b) => a + b, 0) !== o.sizeBytes) throw new Error(`providers served ${shares.join('+')} bytes of a ${o.sizeBytes}-byte blob`);
        await node.stop();
        nodes.pop();
        await rm(dir, { recursive: true, force: true });
      }
      const best = Math.min(...ms);
      const run = {
        providers: count, ready_ms: r1(best), ready_ms_all: ms.map(r1), MBps: r1(o.sizeBytes / 1e6 / (best / 1000)),
        link_bound_ms: o.rateMBps > 0 ? r1(o.sizeBytes / 1e6 / (o.rateMBps * Math.min(count, Math.ceil(o.sizeBytes / o.chunkBytes))) * 1000) : null,
        served_bytes_per_provider: shares, provider_failures: failures,
      };
      log(`blobs: ${o.rateMBps > 0 ? `${o.rateMBps} MB/s` : 'unlimited'} providers, ${count}: ready in ${run.ready_ms} ms (${run.MBps} MB/s; the links alone allow ${run.link_bound_ms ?? '–'} ms)`);
      runs.push(run);
    }
    const one = runs.find((r) => r.providers === 1)?.ready_ms;
    return {
      blob_bytes: o.sizeBytes, chunk_bytes: o.chunkBytes, chunks: chunkSha256.length, provider_rate_MBps: o.rateMBps, reps: o.reps,
      runs: runs.map((r) => ({ ...r, speedup_vs_1: one !== undefined ? Number((one / r.ready_ms).toFixed(2)) : null })),
    };
  } finally {
    for (const n of nodes) await n.stop();
    for (const p of procs) { kill(p); await p.exit; }
    await rm(tmp, { recursive: true, force: true });
  }
}

/** The section's settings: a 128 MiB blob in the coordinator's 8 MiB chunks from providers at 12.5 MB/s
 *  (100 Mbit/s) each, a 64 MiB blob in 2 MiB chunks at 2.5 MB/s (20 Mbit/s, a typical home uplink), and the
 *  first one unthrottled (the ceiling this machine's CPUs set: every node runs Noise in this one process);
 *  quick: 16 MiB in 1 MiB chunks at 12.5 MB/s. Every blob has ≥ 16 chunks, so 8 providers × 2 requests
 *  in flight all have work. */
export function blobBenchOptions(quick: boolean, log?: (s: string) => void): BlobBenchOptions[] {
  const providerCounts = [1, 4, 8];
  return quick
    ? [{ sizeBytes: 16 * 2 ** 20, chunkBytes: 2 ** 20, rateMBps: 12.5, providerCounts, reps: 1, log }]
    : [
      { sizeBytes: 128 * 2 ** 20, chunkBytes: CHUNK_BYTES, rateMBps: 12.5, providerCounts, reps: 1, log },
      { sizeBytes: 64 * 2 ** 20, chunkBytes: 2 * 2 ** 20, rateMBps: 2.5, providerCounts, reps: 1, log },
      { sizeBytes: 128 * 2 ** 20, chunkBytes: CHUNK_BYTES, rateMBps: 0, providerCounts: [1, 8], reps: 1, log },
    ];
}

/** The section: every setting of blobBenchOptions, one after another. */
export async function benchBlobSection(quick: boolean, log?: (s: string) => void): Promise<Record<string, unknown>> {
  const configs = [];
  for (const o of blobBenchOptions(quick, log)) configs.push(await benchBlobFetch(o));
  return { configs };
}

/** One provider process: holds the blob (the same deterministic bytes), serves it rate-limited, prints its
 *  address and then one line per served chunk; runs until its parent kills it (the parent removes `dir`). */
async function provider(dir: string, sizeBytes: number, chunkBytes: number, rateMBps: number): Promise<void> {
  const node = await createSwarmNode({ dataDir: dir });
  const store = new BlobStore(dir, { chunkBytes });
  await store.put(blobBytes(sizeBytes));
  const bucket = rateMBps > 0 ? new TokenBucket(rateMBps * 1e6 / 1000) : null;
  await serve(node, 'weights', async (req) => {
    const res = await store.serveChunk(req);
    await bucket?.take(res.bytes.length);
    process.stdout.write(`{"served":${res.bytes.length}}\n`);
    return res;
  });
  process.stdout.write(JSON.stringify({ addr: dialableAddrs(node)[0] }) + '\n');
}

const arg = (k: string) => process.argv.find((a) => a.startsWith(`--${k}=`))?.slice(k.length + 3);
if (import.meta.main && arg('provider') !== undefined) {
  await provider(arg('provider')!, Number(arg('size')), Number(arg('chunk')), Number(arg('rate')));
} else if (import.meta.main) {
  const r = await benchBlobSection(process.argv.includes('--quick'), (s) => process.stderr.write(`[bench] ${s}\n`));
  process.stdout.write(JSON.stringify(r, null, 2) + '\n');
}
