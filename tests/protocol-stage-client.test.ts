// The stage-peer client against a fake stage peer on 127.0.0.1: whole lists through the pager, the
// configured timeout on every compute-class request, cancellation by signal, one log line per request.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createSwarmNode, serve, dialableAddrs, parseMultiaddr } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { StagePeerClient } from '../protocol/stage-client.ts';
import type { StageClientTimeouts } from '../protocol/stage-client.ts';
import { createLogger } from '../protocol/log.ts';
import { decodeFloat, encodeTensor } from '../protocol/tensor.ts';
import { PAGE_TENSORS, CHUNK_BYTES } from '../protocol/constants.ts';
import { servePage, serveChunk } from '../protocol/pager.ts';
import { SwarmError } from '../protocol/errors.ts';

const nodes: SwarmNode[] = [];
const dirs: string[] = [];
after(async () => {
  for (const n of nodes) await n.stop();
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function node(): Promise<SwarmNode> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-stage-client-'));
  dirs.push(d);
  const n = await createSwarmNode({ dataDir: d });
  nodes.push(n);
  return n;
}

const TIMEOUTS: StageClientTimeouts = { computeTimeoutMs: 400, controlTimeoutMs: 30_000, heartbeatTimeoutMs: 5000, probeTimeoutMs: 1500, noticeTimeoutMs: 5000 };

test('collect, apply, adapter and optimizer state move whole lists and byte ranges through the pager', async () => {
  const peer = await node();
  const coord = await node();
  const N = PAGE_TENSORS * 2 + 5;
  const tensors = Array.from({ length: N }, (_, i) => Float32Array.from([i, i + 0.5]));
  const state = new Uint8Array(CHUNK_BYTES + 1000).map((_, i) => i % 251);
  const applied: Array<{ from: number; count: number; last: boolean | undefined; lr: number | undefined }> = [];
  await serve(peer, 'aggregate', async (req) => {
    if (req.phase === 'collect') {
      const p = servePage(N, req.from, req.count, 'collect');
      return { total: N, microBatches: 3, grads: tensors.slice(p.from, p.from + p.count).map((t) => encodeTensor(t, [2], 'f32')) };
    }
    applied.push({ from: req.from, count: req.count, last: req.last, lr: req.lr });
    return { total: N };
  });
  await serve(peer, 'adapter', async (req) => {
    const p = servePage(N, req.from, req.count, 'adapter');
    return { step: 0, total: N, adapterSpecJson: null, tensors: tensors.slice(p.from, p.from + p.count).map((t, k) => ({ name: `t${p.from + k}`, tensor: encodeTensor(t, [2], 'f32') })) };
  });
  await serve(peer, 'optimizer', async (req) => serveChunk(state, req.offset, req.length, 'state'));
  const lines: string[] = [];
  const client = new StagePeerClient({ node: coord, runId: 'r', timeouts: TIMEOUTS, log: createLogger({ debug: 'swarmtune:*', sink: (l) => lines.push(l) }).child('step') });
  const addr = parseMultiaddr(dialableAddrs(peer)[0]!);

  const got = await client.collect(addr, 4);
  assert.equal(got.microBatches, 3);
  assert.deepEqual(got.grads.map((g) => [...decodeFloat(g, 'g')]), tensors.map((t) => [...t]));
  const up = await client.adapter(addr);
  assert.deepEqual(up.map((x) => x.name), tensors.map((_, i) => `t${i}`));
  assert.deepEqual(await client.optimizerState(addr, 4), state);
  await client.apply(addr, 4, tensors.map((t) => encodeTensor(t, [2], 'f32')), 0.01);
  assert.deepEqual(applied, [
    { from: 0, count: PAGE_TENSORS, last: false, lr: 0.01 },
    { from: PAGE_TENSORS, count: PAGE_TENSORS, last: false, lr: 0.01 },
    { from: 2 * PAGE_TENSORS, count: 5, last: true, lr: 0.01 },
  ]);
  assert.ok(lines.some((l) => / swarmtune:step aggregate -> \S+ step=4 phase=collect from=0: ok /.test(l)), lines.join('\n'));
  assert.ok(lines.every((l) => l.includes(' swarmtune:step ')));
});

test('compute-class requests take the configured compute timeout; a call cancelled by its signal rejects with the signal\'s reason', async () => {
  const peer = await node();
  const coord = await node();
  let release!: () => void;
  const hang = new Promise<void>((r) => { release = r; });
  await serve(peer, 'aggregate', async () => { await hang; return { total: 0 }; });
  await serve(peer, 'optimizer', async () => { await hang; return { sizeBytes: 0, bytes: new Uint8Array(0) }; });
  await serve(peer, 'heartbeat', async () => { await hang; return { runId: 'r', ready: true, step: 0, tokensPerSecond: 0, inflight: 0, busy: false, memoryRssBytes: 0 }; });
  const client = new StagePeerClient({ node: coord, runId: 'r', timeouts: TIMEOUTS });
  const addr = parseMultiaddr(dialableAddrs(peer)[0]!);
  const t0 = Date.now();
  await assert.rejects(client.collect(addr, 0), { name: 'TimeoutError', message: /timed out after 400 ms/ });
  await assert.rejects(client.optimizerState(addr, 0), { name: 'TimeoutError', message: /timed out after 400 ms/ });
  assert.ok(Date.now() - t0 < 5000, 'collect and state fetches honour the compute timeout');

  const ac = new AbortController();
  const reason = new SwarmError('stopping');
  const pending = client.heartbeat(addr, 0, { signal: ac.signal });
  setTimeout(() => ac.abort(reason), 50);
  await assert.rejects(pending, (e) => e === reason);
  release();
});
