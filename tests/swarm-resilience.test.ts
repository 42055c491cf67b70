// Coordinator resilience with real processes on 127.0.0.1 (docs/swarm.md "Failure handling"):
// a stage that loses every replica is re-planned (rebalance, then a wait for a volunteer), late
// joiners land on the slowest stage and slower routes get fewer micro-batches (bans and timeouts:
// swarm-misbehave.test.ts).
//
// Sizes: the embedded tiny model (4 layers, hidden 128), --pipeline-stages 2, micro-batches of 2 × 64
// tokens. SWARMTUNE_TEST_DELAY_MS (node/test-aids.ts) slows chosen volunteers so that steps last long
// enough for the faults to land mid-run; it does not change the math.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import type { Proc } from './swarm-cluster.ts';
import { tmp, modelDir, run, waitEvent, kill9, statusJson, FLAGS, launch, join, peerIdOf, adapterMap, relUpdateDiff, useCluster } from './swarm-cluster.ts';

useCluster('resilience');


test('a stage that loses every replica is re-planned (rebalance, then a wait for a volunteer); the run finishes and equals `swarmtune train`', async () => {
  const STEPS = 8;
  const initDir = path.join(tmp, 'init');
  const init = await run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', '1', '--learning-rate', '1e-2', '--output-dir', initDir, '--device', 'cpu']);
  assert.equal(init.code, 0, init.stderr);
  const localDir = path.join(tmp, 'local');
  const local = run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', String(STEPS), '--init-adapter', initDir, '--output-dir', localDir, '--device', 'cpu']);

  const coord = launch('lost', STEPS, 3, ['--init-adapter', initDir]);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  // slowed a little so that the faults land mid-run, not after it
  const slow = { SWARMTUNE_TEST_DELAY_MS: '150' };
  const vols = [0, 1, 2].map((i) => join(addr, `lost-v${i}`, slow));
  const byId = new Map<string, Proc>();
  for (const v of vols) byId.set(await peerIdOf(v), v);
  const plan = await waitEvent(coord, (e) => e.event === 'plan', 'plan');
  const stages = plan.stages as Array<{ replicas: string[] }>;
  const single = stages.findIndex((s) => s.replicas.length === 1);
  assert.ok(single >= 0, `one stage has one replica: ${JSON.stringify(stages)}`);
  const other = 1 - single;

  // 1. kill -9 the only replica of a stage mid-run: a replica of the other stage moves over
  await waitEvent(coord, (e) => e.event === 'step' && (e.step as number) >= 2, 'step 2');
  kill9(byId.get(stages[single]!.replicas[0]!)!);
  const moved = await waitEvent(coord, (e) => e.event === 'stage_reassigned' && e.how === 'rebalance', 'rebalance', 60_000);
  assert.equal(moved.stage, single);
  assert.ok(stages[other]!.replicas.includes(String(moved.peer_id)), 'the moved peer came from the other stage');
  assert.match(String(moved.optimizer_state), /checkpoint of step \d+ \(exact\)/);

  // 2. kill -9 that one too: no stage has a spare replica now, so the run waits for a volunteer
  const nEvents = coord.events.length;
  kill9(byId.get(String(moved.peer_id))!);
  const waiting = await waitEvent(coord, (e) => e.event === 'waiting', 'waiting', 60_000, nEvents);
  assert.match(String(waiting.message), new RegExp(`^stage ${single} \\(layers \\[\\d+, \\d+\\)\\) has no peer; waiting for a volunteer with ≥ \\d+\\.\\d\\d GiB$`));
  const st = await statusJson(addr);
  assert.equal(st.state, 'training');
  assert.equal(st.waitingFor, waiting.message);
  assert.ok(st.step < STEPS);
  const human = await run(['status', addr]);
  assert.match(human.stdout, /waiting: stage \d .* has no peer; waiting for a volunteer with ≥/);
  assert.match(human.stdout, /\d+ retries, \d+ reassignments, 0 bans/);

  // 3. a new volunteer takes the stage and the step goes on
  const v3 = join(addr, 'lost-v3');
  const v3id = await peerIdOf(v3);
  const took = await waitEvent(coord, (e) => e.event === 'stage_reassigned' && e.peer_id === v3id, 'the new volunteer takes the stage', 60_000);
  assert.equal(took.stage, single);
  assert.equal(took.how, 'lost');
  const fin = await waitEvent(coord, (e) => e.event === 'finished', 'finished', 180_000);
  assert.equal(fin.step, STEPS);
  assert.deepEqual(coord.events.filter((e) => e.event === 'step').map((e) => e.step), Array.from({ length: STEPS }, (_, i) => i + 1));
  assert.equal(await coord.exit, 0);

  const swarm = await adapterMap(path.join(tmp, 'lost'));
  for (const [name, x] of swarm) for (const v of x) assert.ok(Number.isFinite(v), `${name} is finite`);
  // every-step optimizer checkpoints make the re-planned stage exact: the run equals the local trainer
  assert.equal((await local).code, 0);
  const { rel } = relUpdateDiff(await adapterMap(initDir), swarm, await adapterMap(localDir));
  process.stderr.write(`lost-stage run vs train: relative update difference ${rel.toExponential(2)}\n`);
  assert.ok(rel <= 1e-5, `relative update difference ${rel}`);
});

test('a late joiner lands on the stage with the lowest throughput; the slower route gets fewer micro-batches', async () => {
  const coord = launch('late', 10, 2, [], {}, false);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  const vSlow = join(addr, 'late-slow', { SWARMTUNE_TEST_DELAY_MS: '400' });
  const vFast = join(addr, 'late-fast');
  const slowId = await peerIdOf(vSlow);
  await peerIdOf(vFast);
  const plan = await waitEvent(coord, (e) => e.event === 'plan', 'plan');
  const slowStage = (plan.stages as Array<{ replicas: string[] }>).findIndex((s) => s.replicas.includes(slowId));
  await waitEvent(coord, (e) => e.event === 'step' && (e.step as number) >= 2, 'step 2');
  const before = await statusJson(addr);
  const tps = (id: string) => before.peers.find((p: any) => p.peerId === id).tokensPerSecond as number;
  const fastId = before.peers.find((p: any) => p.peerId !== slowId).peerId as string;
  assert.ok(tps(slowId) < tps(fastId), `the slowed peer measures fewer tokens/s (${tps(slowId)} vs ${tps(fastId)})`);

  const vLate = join(addr, 'late-new');
  const lateId = await peerIdOf(vLate);
  const added = await waitEvent(coord, (e) => e.event === 'peer_added' && e.peer_id === lateId, 'late peer added', 120_000);
  assert.equal(added.stage, slowStage, 'placed on the stage with the lowest throughput');
  const addedAt = added.step as number;
  const atJoin = await statusJson(addr);
  const mbs = (s: any, id: string) => s.peers.find((p: any) => p.peerId === id).microBatches as number;
  await waitEvent(coord, (e) => e.event === 'finished', 'finished', 240_000);
  const end = await statusJson(addr); // the finished run still serves status
  assert.equal(end.state, 'finished');
  const lateMbs = mbs(end, lateId);
  const slowSince = mbs(end, slowId) - mbs(atJoin, slowId);
  process.stderr.write(`late joiner added at step ${addedAt}: late peer ${lateMbs} micro-batches, slowed peer ${slowSince} since\n`);
  assert.ok(lateMbs > 0, 'the late joiner contributes micro-batches');
  assert.ok(lateMbs > slowSince, `the faster replica pulls more micro-batches (${lateMbs} vs ${slowSince})`);
});

