// A delta wire codec (aq2) over real hop streams between two libp2p nodes on 127.0.0.1: the second
// visit of a sample travels against the reference both ends committed, in fewer bytes, and arrives
// as exactly what the sender reconstructs; a receiver that lost its references (a restart) answers
// cold and gets every row cold; a discarded attempt leaves the references alone; a sender that
// codes against references the receiver refused is refused, not decoded.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createSwarmNode, dialableAddrs, parseMultiaddr } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { HopInbox, sendHop } from '../protocol/hop.ts';
import type { HopDelta, HopKey } from '../protocol/hop.ts';
import { DeltaCache } from '../protocol/codecs/delta-cache.ts';
import { decodeDelta, DELTA_SPECS, encodeDelta } from '../protocol/codecs/delta.ts';
import { decodeFloat, encodeTensor } from '../protocol/tensor.ts';
import type { WireTensor } from '../protocol/tensor.ts';

const nodes: SwarmNode[] = [];
const dirs: string[] = [];
after(async () => {
  for (const n of nodes) await n.stop();
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function node(): Promise<SwarmNode> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-hopdelta-'));
  dirs.push(d);
  const n = await createSwarmNode({ dataDir: d });
  nodes.push(n);
  return n;
}

const B = 2, S = 16, C = 64, T = B * S;
const keys = ['3', '11'];
const P = DELTA_SPECS.aq2.act;

function data(seed: number, base?: Float32Array, scale = 1): Float32Array {
  let s = seed >>> 0;
  return Float32Array.from({ length: T * C }, (_, i) => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return (base?.[i] ?? 0) + ((s / 2 ** 32) - 0.5) * scale;
  });
}

test('aq2 over a hop: warm against committed references, cold for a receiver that lost them, refused when forced', { timeout: 60_000 }, async () => {
  const a = await node(), b = await node();
  const inbox = new HopInbox();
  await inbox.register(b);
  const signal = new AbortController().signal;
  const from = a.peerId.toString(), to = b.peerId.toString();
  const addrs = dialableAddrs(b).map(parseMultiaddr);
  let recvCache = new DeltaCache(1 << 24);
  const sendCache = new DeltaCache(1 << 24);
  const hop = async (attempt: number, x: Float32Array, mutate?: (t: WireTensor) => WireTensor) => {
    const key: HopKey = { runId: 'd', step: attempt, mb: 0, attempt: 0, kind: 'act' };
    const st = (cache: DeltaCache): HopDelta => ({ cache, keys, seqLen: S, attempt: `a${attempt}` });
    const got = inbox.receive(key, { from, shape: [T, C], delta: st(recvCache) }, { signal, timeoutMs: 20_000 });
    const sent = sendHop(a, addrs, key, [T, C], x, { signal, timeoutMs: 20_000, codec: 'aq2', expectPeer: to, delta: st(sendCache), mutate });
    const [r, s] = await Promise.allSettled([got, sent]);
    return { r, s };
  };
  const commit = (attempt: number) => { sendCache.commit(`a${attempt}`); recvCache.commit(`a${attempt}`); };

  // first visit: nothing cached, every row cold = the stateless aq2 codec
  const x0 = data(1);
  const first = await hop(0, x0);
  assert.equal(first.s.status, 'fulfilled');
  assert.equal(first.r.status, 'fulfilled');
  const cold0 = decodeFloat(encodeTensor(x0, [T, C], 'aq2'), 'ref', [T, C]);
  assert.deepEqual((first.r as PromiseFulfilledResult<{ data: Float32Array }>).value.data, cold0);
  commit(0);

  // second visit, the activation moved a little: coded against the references, fewer bytes,
  // received as exactly ref + the quantized difference the sender computed
  const x1 = data(2, cold0, 0.02);
  const ref = sendCache.lookup(keys, S, C);
  const want = decodeDelta(P, encodeDelta(P, x1, T, C, ref.refs, ref.digest), T, C, ref.refs, ref.digest, 'ref');
  const second = await hop(1, x1);
  const got1 = (second.r as PromiseFulfilledResult<{ data: Float32Array }>).value.data;
  assert.deepEqual(got1, want);
  const bytes0 = (first.s as PromiseFulfilledResult<{ bytes: number }>).value.bytes, bytes1 = (second.s as PromiseFulfilledResult<{ bytes: number }>).value.bytes;
  assert.ok(bytes1 < bytes0 / 2, `warm ${bytes1} bytes vs cold ${bytes0}`);

  // attempt 1 is discarded (a retry): the references stay those of attempt 0 on both ends
  sendCache.discard('a1'); recvCache.discard('a1');
  assert.deepEqual(recvCache.lookup(keys, S, C).digest, ref.digest);
  assert.deepEqual(sendCache.lookup(keys, S, C).digest, ref.digest);

  // the receiver restarts (empty cache): it answers cold, the sender sends every row cold, and the
  // tensor is right
  recvCache = new DeltaCache(1 << 24);
  const third = await hop(2, x1);
  assert.equal(third.s.status, 'fulfilled');
  assert.deepEqual((third.r as PromiseFulfilledResult<{ data: Float32Array }>).value.data, decodeFloat(encodeTensor(x1, [T, C], 'aq2'), 'ref', [T, C]));
  assert.equal((third.s as PromiseFulfilledResult<{ bytes: number }>).value.bytes, bytes0);
  recvCache.discard('a2'); sendCache.discard('a2');

  // a sender that ignores the cold answer and codes against its references anyway is refused
  const forced = encodeDelta(P, x1, T, C, ref.refs, ref.digest);
  const fourth = await hop(3, x1, (t) => ({ ...t, bytes: forced.subarray(0, forced.length) }));
  assert.equal(fourth.r.status, 'rejected');
  assert.match(String((fourth.r as PromiseRejectedResult).reason), /BadOutputError.*reference mismatch/);
  assert.equal(fourth.s.status, 'rejected');
});
