// Trust no stage, with real processes on 127.0.0.1 (docs/security.md): a volunteer uploading a bad
// adapter (another stage's tensor names, a wrong shape, NaN) is refused and banned, and its stage is
// covered by another volunteer; a volunteer scaling every activation and activation gradient by 1.02
// is caught by spot checks at --verify-fraction 1, banned, and the adapter still equals `swarmtune
// train`, with no honest peer banned.
//
// Sizes: the embedded tiny model (4 layers, hidden 128), --pipeline-stages 2, micro-batches of 2 × 64
// tokens, 2–3 steps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { tmp, modelDir, run, waitEvent, launch, join, peerIdOf, adapterMap, relUpdateDiff, useCluster, FLAGS } from './swarm-cluster.ts';
import { assertNoCrash } from './swarm-procs.ts';

useCluster('trust');

test('each SWARMTUNE_TEST_BAD_ADAPTER mode (foreign, shape, nan) is refused and banned; the stage is covered by another volunteer and the run finishes', async () => {
  // two volunteers, two stages: each is its stage's only replica, so its upload is the one asked for
  const coord = launch('badadapter', 2, 2, ['--verify-fraction', '0'], {}, false);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  join(addr, 'ba-honest');
  const modes = ['foreign', 'shape', 'nan'] as const;
  const expected: Record<string, RegExp> = {
    foreign: /is not one of stage \d's \(layers/,
    shape: /expected shape \[\d+,\d+\], got \[\d+,\d+\]/,
    nan: /non-finite value NaN/,
  };
  for (const mode of modes) {
    const bad = join(addr, `ba-${mode}`, { SWARMTUNE_TEST_BAD_ADAPTER: mode });
    const id = await peerIdOf(bad);
    const ban = await waitEvent(coord, (e) => e.event === 'peer_banned' && e.peer_id === id, `the ${mode} uploader banned`, 120_000);
    assert.equal(ban.evidence, 'bad-upload', JSON.stringify(ban));
    assert.match(String(ban.reason), /its upload was refused: the stage \d adapter upload from /);
    assert.match(String(ban.reason), expected[mode]!, `${mode}: ${String(ban.reason)}`);
  }
  // an honest volunteer covers the stage the bad ones could not keep
  join(addr, 'ba-cover');
  const fin = await waitEvent(coord, (e) => e.event === 'finished', 'finished', 240_000);
  assert.equal(fin.step, 2);
  const banned = coord.events.filter((e) => e.event === 'peer_banned');
  assert.equal(banned.length, 3, JSON.stringify(banned));
  const a = await adapterMap(path.join(tmp, 'badadapter'));
  const names = [...a.keys()];
  assert.equal(new Set(names).size, names.length);
  for (const [name, x] of a) for (const v of x) assert.ok(Number.isFinite(v), `${name} is finite`);
  assertNoCrash({ ...coord, name: 'coordinator' });
});

test('one tampering volunteer of four (scale:1.02) at --verify-fraction 1: banned on the evidence of a recomputation; no honest peer banned; the adapter equals `swarmtune train`', async () => {
  const steps = 3;
  const initDir = path.join(tmp, 'init');
  const init = await run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', '1', '--learning-rate', '1e-2', '--output-dir', initDir, '--device', 'cpu']);
  assert.equal(init.code, 0, init.stderr);
  const localDir = path.join(tmp, 'local');
  const local = run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', String(steps), '--init-adapter', initDir, '--output-dir', localDir, '--device', 'cpu']);
  const coord = launch('scale', steps, 4, ['--verify-fraction', '1', '--init-adapter', initDir], {}, true);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  const honest = [join(addr, 'sc-a'), join(addr, 'sc-b'), join(addr, 'sc-c')];
  const cheat = join(addr, 'sc-cheat', { SWARMTUNE_TEST_BAD_OUTPUT: 'scale:1.02' });
  const cheatId = await peerIdOf(cheat);
  const honestIds = await Promise.all(honest.map(peerIdOf));
  const plan = await waitEvent(coord, (e) => e.event === 'plan', 'plan');
  assert.deepEqual((plan.stages as Array<{ replicas: string[] }>).map((s) => s.replicas.length), [2, 2]);
  const ban = await waitEvent(coord, (e) => e.event === 'peer_banned' && e.peer_id === cheatId, 'the cheater banned', 180_000);
  assert.equal(ban.evidence, 'disagreement', JSON.stringify(ban));
  assert.match(String(ban.reason), /its result differs from the coordinator's own recomputation/);
  const fin = await waitEvent(coord, (e) => e.event === 'finished', 'finished', 240_000);
  assert.equal(fin.step, steps);
  assert.equal((await local).code, 0);
  const banned = coord.events.filter((e) => e.event === 'peer_banned').map((e) => e.peer_id);
  assert.deepEqual(banned, [cheatId], 'only the cheater is banned');
  for (const id of honestIds) assert.ok(!banned.includes(id));
  const { rel, norm } = relUpdateDiff(await adapterMap(initDir), await adapterMap(path.join(tmp, 'scale')), await adapterMap(localDir));
  assert.ok(norm > 1e-4, `the update is not trivially small (${norm})`);
  // fp32 wire, same data, same order: only summation order differs (docs/swarm.md)
  assert.ok(rel <= 1e-5, `relative update difference ${rel} with a banned cheater`);
  assertNoCrash({ ...coord, name: 'coordinator' });
});
