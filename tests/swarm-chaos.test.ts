// Volunteers die (issue 6.1) and churn (the chaos test), with real processes on 127.0.0.1:
// 1. kill -9 of a volunteer at moments inside a step (early: forward of the first micro-batches; late:
//    last backwards and the aggregation), while every stage keeps a replica: the steps commit and the
//    final adapter equals `swarmtune train` within the equivalence tolerance (1e-5).
// 2. chaos: 4 volunteers in 2 stages; on a seeded schedule, every few seconds one volunteer is SIGKILLed
//    (never the last ready replica of its stage) and restarted on its data dir (blobs cached); the run
//    finishes all its steps and equals `swarmtune train`. The schedule is printed; CHAOS_SEED=<n> reruns it.
//
// Every forward and backward job of the volunteers is slowed by SWARMTUNE_TEST_DELAY_MS (node/test-aids.ts)
// so a step lasts long enough for a kill to land inside it on a loaded machine. The tiny model, 4 and 6
// 4 and 8 steps of 4 micro-batches; about 20 s and 40 s on 2 cores.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { Rng } from './fuzz-frames.ts';
import { Procs, adapterMap, alive, assertNoCrash, relUpdateDiff, trainFlags, waitEvent } from './swarm-procs.ts';
import type { Proc } from './swarm-procs.ts';

const procs = new Procs();
let tmp = '';
let modelDir = '';
let initDir = '';
const locals = new Map<number, Promise<string>>();

before(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-chaos-'));
  modelDir = await ensureTinyModel(path.join(tmp, 'model'));
  initDir = path.join(tmp, 'init');
  // an init adapter with non-zero B (one trainer step from the seeded init), as the e2e test does
  const init = await procs.run('init', ['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...trainFlags(1), '--learning-rate', '1e-2', '--output-dir', initDir, '--device', 'cpu']);
  assert.equal(init.code, 0, init.stderr);
});
after(async () => {
  procs.killAll();
  if (tmp !== '') await rm(tmp, { recursive: true, force: true });
});

const flags = (steps: number) => ['--model', modelDir, '--data', TINY_DATASET_PATH, ...trainFlags(steps), '--init-adapter', initDir];

/** `swarmtune train` with the same flags: the fault-free reference (started once per step count). */
function localRun(steps: number): Promise<string> {
  let p = locals.get(steps);
  if (p === undefined) {
    const dir = path.join(tmp, `local-${steps}`);
    p = procs.run(`train-${steps}`, ['train', ...flags(steps), '--output-dir', dir, '--device', 'cpu']).then((r) => {
      assert.equal(r.code, 0, r.stderr);
      return dir;
    });
    locals.set(steps, p);
  }
  return p;
}

async function assertEqualsTrain(outDir: string, steps: number, what: string): Promise<void> {
  const localDir = await localRun(steps);
  const { rel, norm } = relUpdateDiff(await adapterMap(initDir), await adapterMap(outDir), await adapterMap(localDir));
  console.log(`# ${what} vs train: relative update difference ${rel.toExponential(2)} (update norm ${norm.toExponential(2)})`);
  assert.ok(norm > 1e-4, 'the update is non-trivial');
  assert.ok(rel <= 1e-5, `${what} vs train: relative update difference ${rel} > 1e-5`);
}

interface Swarm { coord: Proc; addr: string; outDir: string; vols: Proc[][]; start(i: number): Proc; stageOf(i: number): number | null; ready(i: number): boolean }

/** A coordinator and 4 volunteers in 2 stages; vols[i] lists every process volunteer i ran (restarts). */
async function startSwarm(name: string, steps: number, delayMs: number): Promise<Swarm> {
  const outDir = path.join(tmp, name);
  const coord = procs.start(`${name}-coordinator`, ['launch', ...flags(steps), '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', '4',
    '--pipeline-stages', '2', '--wire-dtype', 'f32', '--json', '--output-dir', outDir]);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  const vols: Proc[][] = [[], [], [], []];
  const start = (i: number): Proc => {
    const p = procs.start(`${name}-v${i}.${vols[i]!.length}`, ['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0',
      '--data-dir', path.join(tmp, `${name}-v${i}`)], { SWARMTUNE_TEST_DELAY_MS: String(delayMs) });
    vols[i]!.push(p);
    return p;
  };
  for (let i = 0; i < 4; i++) start(i);
  const current = (i: number) => vols[i]!.at(-1)!;
  // the stage a volunteer's current process serves: assigned, loaded (ready) and still alive
  const stageOf = (i: number): number | null => {
    const p = current(i);
    if (!alive(p)) return null;
    const a = p.events.findLast((e) => e.event === 'assigned');
    return a === undefined ? null : Number(a.stage);
  };
  const ready = (i: number) => alive(current(i)) && current(i).events.some((e) => e.event === 'ready');
  return { coord, addr, outDir, vols, start, stageOf, ready };
}

const stepsOf = (coord: Proc) => coord.events.filter((e) => e.event === 'step').map((e) => Number(e.step));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('a volunteer killed with SIGKILL early and late inside steps: the steps commit, the adapter equals `swarmtune train`', async () => {
  const STEPS = 4;
  void localRun(STEPS);
  const s = await startSwarm('kill', STEPS, 250);
  const { coord } = s;
  // aim by the duration of the step before: 15% in (forwards of the first micro-batches), then 85%
  // in (the last backwards, the commit and the aggregation)
  const kills: Array<{ step: number; stage: number; fraction: number }> = [{ step: 2, stage: 1, fraction: 0.15 }, { step: 3, stage: 0, fraction: 0.85 }];
  const t0 = Date.now();
  let prevAt = t0;
  await waitEvent(coord, (e) => e.event === 'training', 'training', 180_000);
  prevAt = Date.now();
  const landed: string[] = [];
  for (const k of kills) {
    await waitEvent(coord, (e) => e.event === 'step' && e.step === k.step - 1, `step ${k.step - 1}`, 180_000);
    const now = Date.now();
    const stepMs = Math.max(500, now - prevAt);
    prevAt = now;
    await sleep(k.fraction * stepMs);
    const victim = [0, 1, 2, 3].find((i) => s.stageOf(i) === k.stage && s.ready(i))!;
    assert.ok(victim !== undefined, `a ready replica of stage ${k.stage}`);
    const p = s.vols[victim]![0]!;
    const peerId = String(p.events.find((e) => e.event === 'joining')!.peer_id);
    const committedBefore = stepsOf(coord).length;
    procs.kill(p);
    console.log(`# killed v${victim} (stage ${k.stage}, ${peerId.slice(-8)}) ${Math.round(k.fraction * stepMs)} ms into step ${k.step} (the step before took ${stepMs} ms); steps committed then: ${committedBefore}`);
    const drop = await waitEvent(coord, (e) => e.event === 'peer_dropped' && e.peer_id === peerId, `v${victim} dropped`, 120_000);
    landed.push(`step ${k.step}: ${String(drop.reason)}`);
  }
  await waitEvent(coord, (e) => e.event === 'finished', 'finished', 240_000);
  console.log(`# drops:\n#   ${landed.join('\n#   ')}`);
  assert.deepEqual(stepsOf(coord), [1, 2, 3, 4], 'every step committed once');
  const status = JSON.parse((await procs.run('status', ['status', s.addr, '--json'])).stdout) as { retries: number; peers: Array<{ health: string }> };
  console.log(`# micro-batch retries: ${status.retries}; health: ${status.peers.map((x) => x.health).join(' ')}`);
  assert.equal(status.peers.filter((x) => x.health === 'dead').length, 2);
  const codes = await Promise.all(s.vols.flat().map((v) => v.exit));
  assert.equal(codes.filter((c) => c === 0).length, 2, 'the two survivors finish normally');
  for (const p of [coord, ...s.vols.flat()]) assertNoCrash(p);
  await assertEqualsTrain(s.outDir, STEPS, 'swarm with two volunteers killed mid-step');
  coord.child.kill('SIGINT');
  assert.equal(await coord.exit, 0);
  console.log(`# kill test took ${Date.now() - t0} ms`);
});

test('chaos: volunteers of a 2-stage, 4-volunteer run are SIGKILLed and restarted every few seconds (never a whole stage); the run finishes and equals `swarmtune train`', async () => {
  const SEED = process.env.CHAOS_SEED !== undefined ? Number(process.env.CHAOS_SEED) : (Date.now() % 1_000_000);
  const rng = new Rng(SEED);
  const STEPS = 8;
  void localRun(STEPS);
  const t0 = Date.now();
  const s = await startSwarm('chaos', STEPS, 200);
  const { coord } = s;
  await waitEvent(coord, (e) => e.event === 'training', 'training', 180_000);
  const schedule: string[] = [];
  const finished = waitEvent(coord, (e) => e.event === 'finished' || e.event === 'error', 'finished', 300_000);
  let done = false;
  void finished.then(() => { done = true; }, () => { done = true; });
  const since = () => `${((Date.now() - t0) / 1000).toFixed(1)} s`;
  while (!done) {
    await Promise.race([sleep(1500 + rng.int(1500)), finished.catch(() => {})]);
    if (done) break;
    // a victim: alive and serving, with another ready replica of its stage (so no stage loses all)
    const candidates = [0, 1, 2, 3].filter((i) => {
      const st = s.stageOf(i);
      return st !== null && s.ready(i) && [0, 1, 2, 3].some((j) => j !== i && s.stageOf(j) === st && s.ready(j));
    });
    if (candidates.length === 0) { schedule.push(`${since()}: no stage has two ready replicas; nobody killed`); continue; }
    const victim = candidates[rng.int(candidates.length)]!;
    const stage = s.stageOf(victim);
    procs.kill(s.vols[victim]!.at(-1)!);
    const downMs = 500 + rng.int(1500);
    schedule.push(`${since()}: kill v${victim} (stage ${stage}) after ${stepsOf(coord).length} committed steps; restart in ${downMs} ms`);
    void sleep(downMs).then(() => { if (!done) s.start(victim); });
  }
  const end = await finished;
  console.log(`# chaos seed ${SEED} (rerun with CHAOS_SEED=${SEED}); schedule:\n#   ${schedule.join('\n#   ')}`);
  assert.equal(end.event, 'finished', `the run failed: ${JSON.stringify(end)}\n${coord.stderr.join('').slice(-3000)}`);
  const kills = schedule.filter((x) => x.includes(': kill')).length;
  assert.ok(kills >= 2, `at least two volunteers were killed (${kills})`);
  assert.deepEqual(stepsOf(coord), [1, 2, 3, 4, 5, 6, 7, 8], 'every step committed once');
  const status = JSON.parse((await procs.run('status', ['status', s.addr, '--json'])).stdout) as { retries: number; reassignments: number };
  console.log(`# ${kills} kills; micro-batch retries ${status.retries}, reassignments ${status.reassignments}`);
  for (const v of s.vols.flat()) {
    // a killed process exits 137 (SIGKILL); the others finish (0) or, when the run ended while they
    // waited to be placed again, are refused (3, the exit-code table's "refused", docs/operations.md)
    const code = await v.exit;
    assert.ok([0, 3, 137].includes(code), `${v.name} exit code ${code}:\n${v.stderr.join('').slice(-2000)}`);
    assertNoCrash(v);
  }
  assertNoCrash(coord);
  // restarted volunteers found their shard blobs in the cache
  const restarted = s.vols.flatMap((vs) => vs.slice(1)).filter((v) => v.events.some((e) => e.event === 'assigned'));
  for (const v of restarted) {
    // (the stage's current adapter and optimizer state are new blobs each step; the frozen shards are not)
    const fetched = v.events.filter((e) => e.event === 'blob' && e.kind === 'fetched' && /^(embed|head|layer\.)/.test(String(e.name)));
    const stageNow = Number(v.events.findLast((e) => e.event === 'assigned')!.stage);
    const stageBefore = s.vols.flat().find((x) => x !== v && x.name.split('.')[0] === v.name.split('.')[0])!.events.find((e) => e.event === 'assigned');
    if (stageBefore !== undefined && Number(stageBefore.stage) === stageNow) assert.deepEqual(fetched.map((e) => e.name), [], `${v.name} reuses its cached shards`);
  }
  await assertEqualsTrain(s.outDir, STEPS, 'chaos swarm');
  coord.child.kill('SIGINT');
  assert.equal(await coord.exit, 0);
  console.log(`# chaos test took ${Date.now() - t0} ms`);
});
