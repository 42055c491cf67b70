// Misbehaving peers with real processes on 127.0.0.1 (docs/swarm.md "Failure handling"): a peer
// sending non-finite tensors is banned with doubling backoff and refused while banned; repeated
// compute timeouts mark a peer slow and routes avoid it. (Split from swarm-resilience.test.ts so
// each file stays near a minute.)
//
// Sizes: the embedded tiny model (4 layers, hidden 128), --pipeline-stages 2, micro-batches of 2 × 64
// tokens. SWARMTUNE_TEST_DELAY_MS (node/test-aids.ts) slows chosen volunteers so that steps last long
// enough for the faults to land mid-run; it does not change the math.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { tmp, start, run, waitEvent, kill9, statusJson, launch, join, peerIdOf, adapterMap, useCluster } from './swarm-cluster.ts';

useCluster('misbehave');


test('a peer sending non-finite activations is banned with doubling backoff, refused while banned (remaining time in words), re-admitted after', async () => {
  // bans start at 8 s here (SWARMTUNE_BAN_BASE_MS); the default is 30 s
  const coord = launch('ban', 18, 3, [], { SWARMTUNE_BAN_BASE_MS: '8000' }, false);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  const slow = { SWARMTUNE_TEST_DELAY_MS: '150' };
  join(addr, 'ban-a', slow);
  join(addr, 'ban-b', slow);
  const bad = join(addr, 'ban-bad', { SWARMTUNE_TEST_BAD_OUTPUT: 'nan' });
  const badId = await peerIdOf(bad);
  const ban1 = await waitEvent(coord, (e) => e.event === 'peer_banned' && e.peer_id === badId, 'first ban', 120_000);
  assert.equal(ban1.ban, 1);
  assert.equal(ban1.duration_ms, 8000);
  assert.match(String(ban1.reason), /non-finite/);
  await waitEvent(bad, (e) => e.event === 'released', 'released', 30_000);
  const bannedAt = Date.now();
  // a join during the ban (the same peer id, restarted) is refused with the time left in words
  kill9(bad);
  await bad.exit;
  const again = join(addr, 'ban-bad', { SWARMTUNE_TEST_BAD_OUTPUT: 'nan' });
  const rejected = await waitEvent(again, (e) => e.event === 'rejected', 'refused join', 30_000);
  assert.match(String(rejected.reason), /banned from the run for another \d+ s \(ban 1, 8 s: it sent a bad tensor/);
  assert.equal(await again.exit, 3); // refused (docs/operations.md exit codes)
  const st = await statusJson(addr);
  const row = st.peers.find((p: any) => p.peerId === badId);
  assert.equal(row.health, 'banned');
  assert.equal(row.bans, 1);
  assert.ok(row.banRemainingMs > 0 && row.banRemainingMs <= 8000);
  assert.ok(st.bans >= 1);
  const human = await run(['status', addr]);
  assert.match(human.stdout, /banned \(ban 1, \d s left: it sent a bad tensor/);
  // after the ban it may join again (as a late joiner); still bad, it is banned for twice as long
  await new Promise((r) => setTimeout(r, Math.max(0, 8200 - (Date.now() - bannedAt))));
  const third = join(addr, 'ban-bad', { SWARMTUNE_TEST_BAD_OUTPUT: 'nan' });
  await waitEvent(third, (e) => e.event === 'assigned', 'assigned after the ban', 60_000);
  const ban2 = await waitEvent(coord, (e) => e.event === 'peer_banned' && e.peer_id === badId && e.ban === 2, 'second ban', 120_000);
  assert.equal(ban2.duration_ms, 16000);
  const fin = await waitEvent(coord, (e) => e.event === 'finished', 'finished', 240_000);
  assert.equal(fin.step, 18);
  const a = await adapterMap(path.join(tmp, 'ban'));
  for (const [name, x] of a) for (const v of x) assert.ok(Number.isFinite(v), `${name} is finite`);
});

test('a peer whose compute requests time out repeatedly is marked slow and routes avoid it', async () => {
  // compute requests time out after 1.5 s here (SWARMTUNE_COMPUTE_TIMEOUT_MS); the slowed peer needs 2.5 s per job.
  // The planner puts the largest peer next to the smallest one on the stage needing most memory, so
  // the slowed peer (largest) shares a stage with another replica.
  const coord = launch('slow', 6, 3, [], { SWARMTUNE_COMPUTE_TIMEOUT_MS: '1500' }, false);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  join(addr, 'slow-a', {}, ['--max-memory', '2GiB']);
  join(addr, 'slow-b', {}, ['--max-memory', '3GiB']);
  const vSlow = join(addr, 'slow-c', { SWARMTUNE_TEST_DELAY_MS: '2500' }, ['--max-memory', '4GiB']);
  const slowId = await peerIdOf(vSlow);
  const plan = await waitEvent(coord, (e) => e.event === 'plan', 'plan');
  const stage = (plan.stages as Array<{ replicas: string[] }>).find((s) => s.replicas.includes(slowId))!;
  assert.equal(stage.replicas.length, 2, `the slowed peer shares its stage: ${JSON.stringify(plan.stages)}`);
  const marked = await waitEvent(coord, (e) => e.event === 'peer_slow' && e.peer_id === slowId, 'marked slow', 120_000);
  assert.ok((marked.timeouts as number) >= 2);
  await waitEvent(coord, (e) => e.event === 'finished', 'finished', 240_000);
  const st = await statusJson(addr);
  const row = st.peers.find((p: any) => p.peerId === slowId);
  assert.equal(row.health, 'slow');
  assert.ok(row.timeouts >= 2 && row.retries >= 2, JSON.stringify(row));
  // once marked, it gets no micro-batch while its stage has another replica
  const other = st.peers.find((p: any) => p.stageIndex === row.stageIndex && p.peerId !== slowId);
  assert.ok(row.microBatches < other.microBatches, `slow ${row.microBatches} vs ${other.microBatches}`);
  assert.ok(st.retries >= 2);
});
