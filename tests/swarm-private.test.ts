// Private runs (issue 6.5): a join token and/or a peer-id allowlist guard joining, blob downloads and
// pulls at the coordinator; pulls can be made public. Real libp2p nodes on 127.0.0.1, in-process.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseLlamaConfig } from '../engine/formats/config.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { createSwarmNode, request, parseMultiaddr } from '../protocol/net.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { Coordinator } from '../coordinator/run.ts';
import { RunStore } from '../coordinator/store.ts';
import { pullAdapter } from '../coordinator/client.ts';
import { parsePeerList } from '../bin/commands/launch.ts';
import type { BanRecord } from '../coordinator/bans.ts';

const HF = {
  model_type: 'llama', vocab_size: 97, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
  num_attention_heads: 2, num_key_value_heads: 1, rms_norm_eps: 1e-5, rope_theta: 10000,
  max_position_embeddings: 64, tie_word_embeddings: false,
};
const llama = parseLlamaConfig(HF);
const train = resolveTrainConfig({ flags: { max_steps: 1, device: 'ref' } });
const dirs: string[] = [];
after(async () => { for (const d of dirs) await rm(d, { recursive: true, force: true }); });

const caps = {
  backend: 'cpu' as const, deviceName: 'test', memoryBytes: 2 ** 30, memoryTotalBytes: 2 ** 30, memoryFreeBytes: 2 ** 30,
  hostMemoryBytes: 2 ** 30, cores: 1, gemmGflops: 1, computeCapability: null, memoryBandwidthGBs: null, softwareVersion: 'test',
};

type Access = { token: string | null; allowPeers?: Set<string> | null; publicPull?: boolean; savedBans?: (clientId: string) => Record<string, BanRecord> };
async function coordinator(accessFor: Access | ((clientId: string) => Access)) {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-private-'));
  dirs.push(tmp);
  const client = await createSwarmNode({ dataDir: path.join(tmp, 'client') });
  const access = typeof accessFor === 'function' ? accessFor(client.peerId.toString()) : accessFor;
  const node = await createSwarmNode({ dataDir: path.join(tmp, 'coord') });
  const store = await RunStore.open(path.join(tmp, 'coord', 'db'));
  if (access.savedBans !== undefined) await store.putBans(access.savedBans(client.peerId.toString()));
  const blobs = new BlobStore(path.join(tmp, 'coord'));
  const coord = new Coordinator({
    node, store, blobs, runId: 'priv', modelName: 'random', llama, modelConfigJson: JSON.stringify(HF),
    weights: randomWeightSource(llama, 1), train, lora: loraConfigOf(train),
    data: { totalSteps: 1, microBatchesForStep: async () => [], cursorAfter: (s) => s },
    memory: () => 1, minPeers: 5, wireCodec: 'f32', initAdapter: null, resume: null, emit: () => {}, log: () => {},
    token: access.token, allowPeers: access.allowPeers, publicPull: access.publicPull,
  });
  await coord.start();
  const sha = await blobs.put(new Uint8Array([1, 2, 3, 4]));
  const addr = parseMultiaddr(node.getMultiaddrs()[0]!.toString());
  return {
    addr, sha, clientId: client.peerId.toString(),
    weights: (token?: string) => request(client, addr, 'weights', { sha256: sha, offset: 0, length: 4, ...(token !== undefined ? { token } : {}) }),
    join: (token: string | null) => request(client, addr, 'join', { token, capabilities: caps, listenAddrs: [], previousRunId: null }, { timeoutMs: 3000 }),
    coord, store,
    stop: async () => { await client.stop(); await coord.stop(); await node.stop(); await store.close(); },
  };
}

const auth = (re: RegExp) => (e: Error) => e.name === 'AuthError' && re.test(e.message);

test('a private run: blobs and pulls need the join token; with it they are served', async () => {
  const c = await coordinator({ token: 'sesame' });
  try {
    await assert.rejects(c.weights(), auth(/weights: this run is private: a valid --token is required/));
    await assert.rejects(c.weights('wrong'), auth(/valid --token/));
    assert.deepEqual([...(await c.weights('sesame')).bytes], [1, 2, 3, 4]);
    await assert.rejects(pullAdapter(c.addr.toString()), auth(/pull: this run is private/));
    // with the token the pull gets past the check (nothing is committed yet)
    await assert.rejects(pullAdapter(c.addr.toString(), { token: 'sesame' }), { name: 'StaleError', message: /no committed adapter/ });
    await assert.rejects(c.join('wrong'), auth(/a valid --token is required to join/));
  } finally { await c.stop(); }
});

test('a peer-id allowlist refuses every other peer, token or not; pulls can be made public', async () => {
  const c = await coordinator({ token: null, allowPeers: new Set(['12D3KooWJizkUWmbDmNDXG7Cx88UJUK9Q1UNmp8a3KrgBvfuXCLD']), publicPull: true });
  try {
    await assert.rejects(c.join(null), auth(new RegExp(`join: this run is private: peer ${c.clientId} is not on its allowlist`)));
    await assert.rejects(c.weights(), auth(/weights: .*not on its allowlist/));
    await assert.rejects(pullAdapter(c.addr.toString()), { name: 'StaleError' }, 'public pulls pass the allowlist');
  } finally { await c.stop(); }
  const d = await coordinator((id) => ({ token: null, allowPeers: new Set([id]) }));
  try {
    assert.deepEqual([...(await d.weights()).bytes], [1, 2, 3, 4], 'an allowlisted peer gets blobs');
    await assert.rejects(pullAdapter(d.addr.toString()), auth(/pull: .*not on its allowlist/), 'a pull from another peer id is refused');
  } finally { await d.stop(); }
  const e = await coordinator({ token: 'sesame', allowPeers: null });
  try {
    await assert.rejects(pullAdapter(e.addr.toString()), auth(/pull/), 'pulls are private by default');
  } finally { await e.stop(); }
});

test('--allow-peers parses a comma list of peer ids and names what is wrong', () => {
  assert.equal(parsePeerList(undefined), null);
  assert.deepEqual(parsePeerList(' 12D3KooWJizkUWmbDmNDXG7Cx88UJUK9Q1UNmp8a3KrgBvfuXCLD , 12D3KooWEinu7wt7Cqq3SUrpCZNUnSezR3oGEHqiXFTGWY5QyvV6'),
    ['12D3KooWJizkUWmbDmNDXG7Cx88UJUK9Q1UNmp8a3KrgBvfuXCLD', '12D3KooWEinu7wt7Cqq3SUrpCZNUnSezR3oGEHqiXFTGWY5QyvV6']);
  assert.throws(() => parsePeerList(','), /at least one peer id/);
  assert.throws(() => parsePeerList('hello world'), /"hello world" is not a peer id/);
});

test('bans outlive a coordinator restart: saved in the run store, a restarted coordinator refuses the peer in words', async () => {
  const c = await coordinator({ token: null, savedBans: (id) => ({ [id]: { count: 2, untilMs: Date.now() + 60_000, durationMs: 60_000, reason: 'it sent a bad tensor' } }) });
  try {
    const r = await c.join(null);
    assert.equal(r.status, 'rejected');
    assert.match(String(r.reason), /banned from the run for another (\d+ s|1 min) \(ban 2, 1 min: it sent a bad tensor\)/);
    // a new ban is written to the store at once (here through the coordinator's own ban path)
    const peer = { peerId: 'x', health: 'ok', failures: 0, ready: true, stageIndex: null, addrs: [] };
    (c.coord as unknown as { ban(p: unknown, why: string): void }).ban(peer, 'its gradient is absurd');
    await c.coord.stop();
    const saved = (await c.store.getBans())!;
    assert.equal(saved.x?.count, 1);
    assert.equal(saved.x?.reason, 'its gradient is absurd');
    assert.equal(saved[c.clientId]?.count, 2, 'older bans are kept');
  } finally { await c.stop(); }
});
