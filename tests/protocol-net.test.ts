// Two real libp2p nodes on 127.0.0.1 exchange framed, validated requests; identity persists in the data dir.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createSwarmNode, request, serve, dialableAddrs, parseMultiaddr, lockDataDir } from '../protocol/net.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { PROTOCOLS } from '../protocol/constants.ts';
import { encodeFrame, FrameReader } from '../protocol/frame.ts';
import { StaleError } from '../protocol/errors.ts';

const nodes: SwarmNode[] = [];
const dirs: string[] = [];
after(async () => {
  for (const n of nodes) await n.stop();
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function tmp(): Promise<string> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-net-'));
  dirs.push(d);
  return d;
}

test('two nodes talk: request/response, typed remote errors, schema violations, persisted identity', async () => {
  const dirA = await tmp();
  const a = await createSwarmNode({ dataDir: dirA });
  const b = await createSwarmNode({ dataDir: await tmp() });
  nodes.push(a, b);
  const seen: string[] = [];
  await serve(a, 'heartbeat', async (req, ctx) => {
    assert.equal(ctx.peerId, b.peerId.toString());
    if (req.step < 0 || req.step === 99) throw new StaleError(`step ${req.step} is stale`);
    return { runId: req.runId, ready: true, step: req.step, tokensPerSecond: 0, inflight: req.step * 2, busy: false, memoryRssBytes: 1 };
  }, (peer, proto, err) => seen.push(`${proto}:${err.name}`));
  const addr = parseMultiaddr(dialableAddrs(a)[0]!);
  const res = await request(b, addr, 'heartbeat', { runId: 'run1', step: 21, sentAtMs: Date.now() });
  assert.deepEqual(res, { runId: 'run1', ready: true, step: 21, tokensPerSecond: 0, inflight: 42, busy: false, memoryRssBytes: 1 });
  await assert.rejects(request(b, addr, 'heartbeat', { runId: 'run1', step: 99, sentAtMs: 0 }), { name: 'StaleError', message: /step 99 is stale/ });

  // a hand-made request with an unknown field is refused with a SchemaError frame
  const s = await b.dialProtocol(addr, PROTOCOLS.heartbeat);
  s.send(encodeFrame({ runId: 'run1', step: 1, sentAtMs: 0, evil: true }));
  await s.close();
  const reply = await new FrameReader(s).read() as { error: { name: string; message: string } };
  assert.equal(reply.error.name, 'SchemaError');
  assert.match(reply.error.message, /unknown field "evil"/);
  assert.deepEqual(seen, ['heartbeat:StaleError', 'heartbeat:SchemaError']);

  // the same data dir gives the same peer id after a restart
  const id = a.peerId.toString();
  await a.stop();
  const a2 = await createSwarmNode({ dataDir: dirA });
  nodes.push(a2);
  assert.equal(a2.peerId.toString(), id);
});

test('a data dir is locked by one live process at a time; a dead holder\'s lock is taken over', async () => {
  const dir = await tmp();
  await writeFile(path.join(dir, 'lock'), String(process.ppid)); // a live process that is not us
  await assert.rejects(lockDataDir(dir), { name: 'SwarmError', message: new RegExp(`in use by process ${process.ppid}`) });
  await writeFile(path.join(dir, 'lock'), '999999999'); // no such pid
  const release = await lockDataDir(dir);
  assert.equal(await readFile(path.join(dir, 'lock'), 'utf8'), String(process.pid));
  await release();
  await assert.rejects(readFile(path.join(dir, 'lock')), { code: 'ENOENT' });
});
