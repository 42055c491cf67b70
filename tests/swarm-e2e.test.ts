// Swarm end to end with real processes on 127.0.0.1: equivalence with `swarmtune train`, status and
// pull on a running and a finished run, blob caching and corruption, heterogeneous memory planning.
//
// Sizes: the embedded tiny model (4 layers, hidden 128), 3 optimizer steps of 4 micro-batches of 2
// sequences, max_seq_length 64: enough for LoRA updates that differ clearly from zero while keeping
// the whole file to about a minute on 2 cores (5 node processes start in parallel).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { mkdtemp, readdir, rm, writeFile, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { readAdapter } from '../engine/formats/peft.ts';
import { adapterMap, relUpdateDiff, spawnCli, type CliProc } from './swarm-procs.ts';
import { readConfig } from '../engine/formats/config.ts';
import { resolveTrainConfig, loraConfigOf } from '../engine/train/config.ts';
import { stageMemoryFn } from '../coordinator/spec.ts';
import { evenRanges } from '../coordinator/planner.ts';


type Proc = CliProc;
const procs: Proc[] = [];
let tmp = '';

function start(args: string[]): Proc {
  const p = spawnCli(args);
  procs.push(p);
  return p;
}

async function run(args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  const p = start(args);
  const t = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  return { code, stdout: p.lines.join('\n'), stderr: p.stderr.join('') };
}

async function waitEvent(p: Proc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.find(pred);
    if (e !== undefined) return e;
    if (p.child.exitCode !== null) throw new Error(`process exited (${p.child.exitCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

after(async () => {
  for (const p of procs) {
    if (p.child.exitCode === null && p.child.signalCode === null) {
      try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ }
    }
  }
  if (tmp !== '') await rm(tmp, { recursive: true, force: true });
});

let modelDir = '';
let initDir = '';
/** stage each volunteer data dir held in the first run (its blob cache holds that stage's shards) */
const stageOfDir = new Map<string, number>();
const TRAIN_FLAGS = [
  '--max-steps', '3', '--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '4',
  '--learning-rate', '1e-3', '--no-shuffle', '--lora-dropout', '0', '--max-seq-length', '64',
  '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj,down_proj', '--seed', '7',
];

before(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-e2e-'));
  modelDir = await ensureTinyModel(path.join(tmp, 'model'));
});

test('coordinator + 4 volunteers (2 stages, f32 wire) equal `swarmtune train`; status and pull on running and finished runs', async () => {
  // an init adapter with non-zero B: one trainer step from the seeded init
  initDir = path.join(tmp, 'init');
  const init = await run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...TRAIN_FLAGS, '--max-steps', '1', '--learning-rate', '1e-2', '--output-dir', initDir, '--device', 'cpu']);
  assert.equal(init.code, 0, init.stderr);

  const localDir = path.join(tmp, 'local');
  const localRun = run(['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...TRAIN_FLAGS, '--init-adapter', initDir, '--output-dir', localDir, '--device', 'cpu']);

  const swarmDir = path.join(tmp, 'swarm');
  const coord = start(['launch', '--model', modelDir, '--data', TINY_DATASET_PATH, ...TRAIN_FLAGS, '--init-adapter', initDir,
    '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', '4', '--pipeline-stages', '2', '--wire-dtype', 'f32', '--json',
    '--output-dir', swarmDir]);
  const listening = await waitEvent(coord, (e) => e.event === 'listening', 'listening');
  const addr = String(listening.multiaddr);
  assert.match(addr, /^\/ip4\/127\.0\.0\.1\/tcp\/\d+\/p2p\/12D3/);
  const joinArgs = (i: number) => ['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, `v${i}`)];
  const vols = [0, 1, 2].map((i) => start(joinArgs(i)));
  // status of a run still waiting for --min-peers: three peers admitted, no stage yet
  await waitEvent(coord, (e) => e.event === 'peer_joined' && e.peers === 3, 'three peers joined');
  const waiting = await run(['status', addr, '--json']);
  assert.equal(waiting.code, 0, waiting.stderr);
  const ws = JSON.parse(waiting.stdout);
  assert.equal(ws.state, 'waiting');
  assert.equal(ws.peers.length, 3);
  for (const p of ws.peers) { assert.equal(p.stageIndex, null); assert.equal(p.health, 'spare'); }
  const human = await run(['status', addr]);
  assert.match(human.stdout, /run [0-9a-f]+: waiting, step 0\/3/);
  vols.push(start(joinArgs(3)));

  // status once training has started (it may already have finished: the tiny run is quick)
  await waitEvent(coord, (e) => e.event === 'step', 'first step');
  const running = await run(['status', addr, '--json']);
  assert.equal(running.code, 0, running.stderr);
  const rs = JSON.parse(running.stdout);
  assert.ok(rs.state === 'training' || rs.state === 'finished');
  assert.equal(rs.numStages, 2);
  assert.equal(rs.peers.length, 4);
  for (const p of rs.peers) {
    assert.ok(p.stageIndex === 0 || p.stageIndex === 1);
    assert.match(p.device, /cpu/);
    assert.equal(p.health, 'ok', `peer ${p.peerId} health; coordinator log:\n${coord.stderr.join('').slice(-2000)}`);
  }

  await waitEvent(coord, (e) => e.event === 'finished', 'finished');
  const codes = await Promise.all(vols.map((v) => v.exit));
  assert.deepEqual(codes, [0, 0, 0, 0], 'volunteers exit 0 when the run ends');
  for (const [i, v] of vols.entries()) {
    assert.ok(v.events.some((e) => e.event === 'blob' && e.kind === 'fetched'));
    stageOfDir.set(`v${i}`, Number(v.events.find((e) => e.event === 'assigned')!.stage));
  }
  const steps = coord.events.filter((e) => e.event === 'step');
  assert.deepEqual(steps.map((e) => e.step), [1, 2, 3]);
  for (const e of steps) for (const k of ['loss', 'lr', 'tokens_per_s']) assert.equal(typeof e[k], 'number');

  const local = await localRun;
  assert.equal(local.code, 0, local.stderr);
  const a0 = await adapterMap(initDir);
  const { rel, norm } = relUpdateDiff(a0, await adapterMap(swarmDir), await adapterMap(localDir));
  console.log(`# swarm vs train: relative update difference ${rel.toExponential(2)}, update norm ${norm.toExponential(2)}`);
  assert.ok(norm > 1e-4, `the update must be non-trivial (norm ${norm})`);
  assert.ok(rel <= 1e-5, `swarm vs local update relative difference ${rel} > 1e-5`);

  // the finished run still serves status and pulls (no --exit-on-finish)
  const fin = JSON.parse((await run(['status', addr, '--json'])).stdout);
  assert.equal(fin.state, 'finished');
  assert.equal(fin.step, 3);
  const pulled = path.join(tmp, 'pulled');
  const pr = await run(['pull', addr, '--out', pulled]);
  assert.equal(pr.code, 0, pr.stderr);
  const { rel: pullRel } = relUpdateDiff(a0, await adapterMap(pulled), await adapterMap(swarmDir));
  assert.equal(pullRel, 0, 'pulled adapter equals the written one');
  const pulled1 = path.join(tmp, 'pulled1');
  assert.equal((await run(['pull', addr, '--out', pulled1, '--step', '1'])).code, 0);
  const { rel: r1 } = relUpdateDiff(a0, await adapterMap(pulled1), await adapterMap(swarmDir));
  assert.ok(r1 > 1e-3, 'step 1 differs from step 3');
  const bad = await run(['pull', addr, '--out', path.join(tmp, 'nope'), '--step', '99']);
  assert.equal(bad.code, 4, 'not found, in the exit-code table of docs/operations.md');
  assert.match(bad.stderr, /^swarmtune pull: --step 99: the run has committed steps: 0–\d+ \(\d+ steps\)\n$/);

  coord.child.kill('SIGINT');
  assert.equal(await coord.exit, 0);
});

test('cached blobs are reused, a corrupted one is refused and refetched; heterogeneous memory; too-small peer rejected in words', async () => {
  const model = await readConfig(modelDir);
  const train = resolveTrainConfig({ flags: { max_steps: 1, per_device_train_batch_size: 2, max_seq_length: 64, lora_r: 4, target_modules: 'q_proj,v_proj,down_proj' } });
  const mem = stageMemoryFn(model, train, loraConfigOf(train));
  const [s0, s1] = evenRanges(model.numHiddenLayers, 2);
  const need0 = mem(s0!.layerStart, s0!.layerEnd), need1 = mem(s1!.layerStart, s1!.layerEnd);
  const bigNeed = Math.max(need0, need1), smallNeed = Math.min(need0, need1);
  assert.ok(bigNeed > smallNeed, 'the stages need different memory (the first holds embeddings, the last the head)');

  // reuse data dirs that already cache the stage each peer will get: the big peer gets the stage
  // needing more memory (only it fits there), the small one the other
  const bigStageIdx = need0 >= need1 ? 0 : 1;
  const dirOf = (stage: number) => [...stageOfDir].find(([, s]) => s === stage)![0];
  const bigDir = dirOf(bigStageIdx), smallDir = dirOf(1 - bigStageIdx);
  // corrupt one cached blob of the big peer
  const blobDir = path.join(tmp, bigDir, 'blobs');
  const victim = (await readdir(blobDir)).find((f) => /^[0-9a-f]{64}$/.test(f))!;
  const orig = await readFile(path.join(blobDir, victim));
  orig[orig.length - 1] ^= 0xff;
  await writeFile(path.join(blobDir, victim), orig);

  const coord = start(['launch', '--model', modelDir, '--data', TINY_DATASET_PATH, '--max-steps', '1', '--per-device-train-batch-size', '2',
    '--max-seq-length', '64', '--lora-r', '4', '--target-modules', 'q_proj,v_proj,down_proj',
    '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', '3', '--pipeline-stages', '2', '--json', '--exit-on-finish', '--dashboard', '0', '--wire-dtype', 'int8',
    '--output-dir', path.join(tmp, 'het')]);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  const url = String((await waitEvent(coord, (e) => e.event === 'dashboard', 'dashboard')).url);
  const state = await (await fetch(new URL('/api/state', url))).json() as { state: string; minPeers: number; totalSteps: number };
  assert.equal(state.state, 'waiting');
  assert.equal(state.minPeers, 3);
  assert.equal(state.totalSteps, 1);
  const join = (dir: string, bytes: number) => start(['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0',
    '--data-dir', path.join(tmp, dir), '--max-memory', String(Math.floor(bytes))]);
  const big = join(bigDir, bigNeed * 1.01);
  const small = join(smallDir, (bigNeed + smallNeed) / 2);
  const tiny = join('v9', smallNeed / 2);
  assert.equal(await tiny.exit, 3, `a peer too small for any stage exits 3 (refused); its output:\n${tiny.lines.join('\n')}\n${tiny.stderr.join('')}`);
  const rej = tiny.events.find((e) => e.event === 'rejected');
  assert.ok(rej !== undefined);
  assert.match(String(rej.reason), /offers .* GiB but the smallest stage of this run needs .* GiB/);

  await waitEvent(coord, (e) => e.event === 'finished', 'finished');
  assert.equal(await coord.exit, 0);
  assert.deepEqual([await big.exit, await small.exit], [0, 0]);
  // activations and their gradients crossed the stage boundary as blockwise int8
  const step = coord.events.find((e) => e.event === 'step')!;
  assert.ok(Number.isFinite(step.loss) && Number.isFinite(step.grad_norm) && Number(step.grad_norm) > 0);
  const assigned = (p: Proc) => p.events.find((e) => e.event === 'assigned')!;
  const bigStage = Number(assigned(big).stage), smallStage = Number(assigned(small).stage);
  assert.equal(bigStage, bigStageIdx, 'the big peer holds the stage only it fits');
  assert.equal(smallStage, 1 - bigStageIdx, 'the small peer holds the stage that fits it');

  const blobs = big.events.filter((e) => e.event === 'blob');
  assert.ok(blobs.some((e) => e.kind === 'corrupt-cache' && e.sha256 === victim), 'the corrupted blob is refused');
  assert.ok(blobs.some((e) => e.kind === 'fetched' && e.sha256 === victim), 'and fetched again');
  // every other blob was fetched once in the first run and now comes from the verified cache
  for (const p of [big, small]) {
    const ev = p.events.filter((e) => e.event === 'blob');
    assert.ok(ev.filter((e) => e.kind === 'cache-hit').length >= 2, 'cached blobs are reused');
    assert.deepEqual(ev.filter((e) => e.kind === 'fetched' && e.sha256 !== victim), [], 'nothing else is fetched again');
  }
});

test('the coordinator killed mid-run restarts from LevelDB; volunteers rejoin; the result equals an uninterrupted run', async () => {
  const port = await new Promise<number>((resolve) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => { const p = (srv.address() as net.AddressInfo).port; srv.close(() => resolve(p)); });
  });
  assert.ok(initDir !== '', 'runs after the equivalence test (uses its init adapter)');
  const flags = ['--model', modelDir, '--data', TINY_DATASET_PATH, ...TRAIN_FLAGS, '--save-steps', '1', '--init-adapter', initDir];
  const localDir = path.join(tmp, 'restart-local');
  const localRun = run(['train', ...flags, '--output-dir', localDir, '--device', 'cpu']);
  const launchArgs = ['launch', ...flags, '--listen', `/ip4/127.0.0.1/tcp/${port}`, '--min-peers', '2', '--pipeline-stages', '2',
    '--json', '--exit-on-finish', '--output-dir', path.join(tmp, 'restart'), '--data-dir', path.join(tmp, 'restart-coord')];
  const first = start(launchArgs);
  const addr = String((await waitEvent(first, (e) => e.event === 'listening', 'listening')).multiaddr);
  const vols = [0, 1].map((i) => start(['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, `r${i}`)]));
  await waitEvent(first, (e) => e.event === 'step' && e.step === 2, 'step 2');
  process.kill(-first.child.pid!, 'SIGKILL'); // a crash: no goodbye to the peers
  await first.exit;

  const second = start(launchArgs);
  const addr2 = String((await waitEvent(second, (e) => e.event === 'listening', 'listening after restart')).multiaddr);
  assert.equal(addr2, addr, 'same identity and address after a restart');
  assert.match(second.stderr.join(''), /reusing \d+ verified shard blobs/, 'the restart does not quantize the model again');
  await waitEvent(second, (e) => e.event === 'finished', 'finished after restart', 180_000);
  assert.equal(await second.exit, 0);
  assert.deepEqual(second.events.filter((e) => e.event === 'step').map((e) => e.step), [3], 'only the step after the checkpoint is redone');
  assert.deepEqual(await Promise.all(vols.map((v) => v.exit)), [0, 0]);
  for (const v of vols) {
    assert.ok(v.events.some((e) => e.event === 'coordinator_lost'));
    assert.equal(v.events.filter((e) => e.event === 'assigned').at(-1)!.step, 2, 'rejoined at the checkpointed step');
  }
  const local = await localRun;
  assert.equal(local.code, 0, local.stderr);
  const { rel, norm } = relUpdateDiff(await adapterMap(initDir), await adapterMap(path.join(tmp, 'restart')), await adapterMap(localDir));
  console.log(`# restarted swarm vs train: relative update difference ${rel.toExponential(2)}`);
  assert.ok(norm > 1e-4);
  assert.ok(rel <= 1e-5, `restarted swarm vs uninterrupted local run: relative update difference ${rel}`);
});
