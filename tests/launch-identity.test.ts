// A launch's run identity and disk, with real processes on 127.0.0.1 (issue 14): checkpoint-N dirs and
// pruning of the coordinator's store under save_total_limit while pulls run; a relaunch with another
// r or other data refused in one line with nothing lost; a finished run relaunched serves pulls and
// status at once; --resume continues a stopped run with its stored config and says which flags it ignored.
//
// Sizes: the embedded tiny model, one volunteer, one stage, 6 (then 4) steps of 2 micro-batches of 2
// sequences of ≤ 64 tokens. About a minute on 2 cores, most of it the --resume part (the volunteer
// notices the killed coordinator after its 8 s heartbeat silence).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { readAdapter } from '../engine/formats/peft.ts';
import { pullAdapter } from '../coordinator/client.ts';
import type { PulledAdapter } from '../coordinator/client.ts';
import { RunStore } from '../coordinator/store.ts';
import { Retention } from '../coordinator/retention.ts';
import { loadResume } from '../coordinator/launch.ts';
import { encodeShard } from '../engine/formats/shard.ts';
import { fingerprintDiff, mismatchMessage, RESULT_KEYS } from '../coordinator/identity.ts';
import type { RunFingerprint } from '../coordinator/identity.ts';
import { serveRun } from '../coordinator/serving.ts';
import { BlobStore } from '../protocol/blobs.ts';
import { createSwarmNode, request } from '../protocol/net.ts';
import { silentLogger } from '../protocol/log.ts';
import { Procs, waitEvent } from './swarm-procs.ts';
import type { Proc } from './swarm-procs.ts';

let tmp = '';
let modelDir = '';
const procs = new Procs();
before(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-identity-'));
  modelDir = await ensureTinyModel(path.join(tmp, 'model'));
});
after(async () => {
  procs.killAll();
  await rm(tmp, { recursive: true, force: true });
});

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => { const p = (s.address() as net.AddressInfo).port; s.close(() => resolve(p)); });
  });
}

const FLAGS = ['--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '2', '--learning-rate', '1e-3', '--no-shuffle',
  '--lora-dropout', '0', '--max-seq-length', '64', '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj', '--seed', '7'];

const stderrOf = (p: Proc) => p.stderr.join('');
const sameTensors = (a: PulledAdapter['tensors'], b: PulledAdapter['tensors']) => a.length === b.length &&
  a.every((t) => { const u = b.find((x) => x.name === t.name); return u !== undefined && Buffer.compare(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength), Buffer.from(u.data.buffer, u.data.byteOffset, u.data.byteLength)) === 0; });

function join(addr: string, name: string, env: Record<string, string> = {}): Proc {
  return procs.start(name, ['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, name)], env);
}

test('Retention: checkpoint steps as train saves them; the store keeps the latest step and the last K checkpoints with their optimizer state, and a restart still resumes', async () => {
  const store = await RunStore.open(path.join(tmp, 'retention-db'));
  try {
    const init: ConstructorParameters<typeof Retention>[0] = {
      store, train: { save_strategy: 'steps', save_steps: 3, save_total_limit: 2 }, totalSteps: 10, stepsPerEpoch: 4,
      outputDir: path.join(tmp, 'retention-out'), lora: { r: 2, loraAlpha: 2, loraDropout: 0, targetModules: ['q_proj'], useRslora: false, initLoraWeights: true },
      baseModel: 'm', trainingArgs: {}, adapter: () => [], pruneBlobsBefore: async () => 0, log: () => {},
    };
    const r = new Retention(init);
    assert.deepEqual([...Array(11).keys()].filter((s) => r.isCheckpoint(s)), [3, 6, 9, 10]);
    const epochs = new Retention({ ...init, train: { save_strategy: 'epoch', save_steps: 3, save_total_limit: null } });
    assert.deepEqual([...Array(11).keys()].filter((s) => epochs.isCheckpoint(s)), [4, 8, 10]);
    assert.equal(epochs.keptSteps(7), null, 'no limit: every step stays');
    const adapter = (step: number) => encodeShard({ nf4: new Map(), float: new Map([['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', { shape: [1], data: Float32Array.of(step) }]]) });
    await store.putInitialAdapter(adapter(0));
    for (let step = 1; step <= 8; step++) {
      // an optimizer checkpoint at the save steps and (as the every-step policy leaves it) at step 8
      const ckpt = step % 3 === 0 || step === 8 ? [Uint8Array.of(step, 1), Uint8Array.of(step, 2)] : null;
      await store.commitStep({ step, loss: 0, lr: 0, gradNorm: 0, tokens: 0, tokensPerSecond: 0, timeMs: 0, cursor: step }, adapter(step), ckpt);
      const drop = (await store.committedSteps()).filter((s) => !r.keptSteps(step)!.has(s));
      await store.pruneSteps(drop);
    }
    assert.deepEqual(await store.committedSteps(), [3, 6, 8]);
    assert.equal(await store.optimizerState(3, 1) !== null, true, 'a kept checkpoint keeps its optimizer state');
    assert.equal(await store.optimizerState(6, 0) !== null, true);
    assert.equal((await store.history()).length, 8, 'the step records stay (the loss curve)');
    const res = await loadResume(store);
    assert.equal(res?.step, 8);
    assert.equal(res?.checkpointStep, 8);
    assert.deepEqual([...res!.adapter.values()][0]!.data, Float32Array.of(8));
    // the latest step and the latest checkpoint are never pruned, even when asked
    assert.deepEqual(await store.pruneSteps([8, 6]), [6]);
    assert.deepEqual(await store.committedSteps(), [3, 8]);
    assert.equal(await store.optimizerState(8, 1) !== null, true);
    assert.equal(await store.optimizerState(6, 0), null);
  } finally { await store.close(); }
});

test('a pull whose step is pruned between two of its pages gets a StaleError for the next page, never tensors of another step', async () => {
  const store = await RunStore.open(path.join(tmp, 'pull-db'));
  const coord = await createSwarmNode({ dataDir: path.join(tmp, 'pull-coord'), listen: ['/ip4/127.0.0.1/tcp/0'] });
  const client = await createSwarmNode({ dataDir: path.join(tmp, 'pull-client'), listen: [] });
  const ac = new AbortController();
  try {
    // 100 tensors: more than one page (PAGE_TENSORS = 64)
    const adapter = (step: number) => encodeShard({ nf4: new Map(), float: new Map(Array.from({ length: 100 }, (_, i) => [`base_model.model.model.layers.${i}.self_attn.q_proj.lora_A.weight`, { shape: [2], data: Float32Array.of(step, i) }])) });
    for (const step of [1, 2]) await store.commitStep({ step, loss: 0, lr: 0, gradNorm: 0, tokens: 0, tokensPerSecond: 0, timeMs: 0, cursor: step }, adapter(step));
    await serveRun({
      node: coord, blobs: new BlobStore(path.join(tmp, 'pull-coord')), store, access: { token: null, allowPeers: null }, publicPull: true,
      lora: { r: 1, loraAlpha: 1, loraDropout: 0, targetModules: ['q_proj'], useRslora: false, initLoraWeights: true }, modelName: 'm',
      onJoin: async () => ({ status: 'rejected', reason: 'no', assignment: null }), status: () => { throw new Error('unused'); },
      committedStep: () => 2, onViolation: () => {}, log: silentLogger,
    }, { signal: ac.signal });
    const addr = coord.getMultiaddrs()[0]!;
    const first = await request(client, addr, 'adapter', { step: 1, from: 0, count: 64 });
    assert.equal(first.step, 1);
    assert.equal(first.tensors.length, 64);
    assert.deepEqual(await store.pruneSteps([1]), [1]);
    await assert.rejects(request(client, addr, 'adapter', { step: 1, from: 64, count: 64 }),
      (e: Error) => e.name === 'StaleError' && /the adapter of step 1 is no longer kept \(pruned under save_total_limit\); pullable steps: 2/.test(e.message));
    await assert.rejects(request(client, addr, 'adapter', { step: 7, from: 0, count: 64 }), (e: Error) => e.name === 'StaleError' && /no committed adapter for step 7; committed steps: 2/.test(e.message));
  } finally {
    ac.abort();
    await client.stop(); await coord.stop(); await store.close();
  }
});

test('fingerprintDiff names each differing key as key=value, content by file name and sha256', () => {
  const base: RunFingerprint = {
    version: 1, model: '/m/tiny', data: '/d/chats.jsonl', model_sha256: 'a'.repeat(64), weights_sha256: 'b'.repeat(64), data_sha256: '1a2b'.repeat(16),
    init_adapter_sha256: null, wire_dtype: 'f32', config: Object.fromEntries(RESULT_KEYS.map((k) => [k, k === 'lora_r' ? 16 : k === 'target_modules' ? ['q_proj', 'v_proj'] : 1])),
  };
  assert.deepEqual(fingerprintDiff(base, { ...base, model: '/elsewhere/tiny', weights_sha256: 'b'.repeat(64) }), [], 'the model counts by content, not by path');
  const asked = { ...base, data: '/d/qa.jsonl', data_sha256: '9c0d'.repeat(16), config: { ...base.config, lora_r: 8, target_modules: ['q_proj'] } };
  const diff = fingerprintDiff(base, asked);
  assert.deepEqual(diff.map((d) => d.key), ['data', 'lora_r', 'target_modules']);
  assert.equal(mismatchMessage({ runId: '3f2a9c0d11', step: 85, totalSteps: 300, diff }),
    'this data dir holds run 3f2a9c0d… (step 85 of 300) trained with data=chats.jsonl (sha256 1a2b1a2b…), lora_r=16, target_modules=q_proj,v_proj; ' +
    'you asked for data=qa.jsonl (sha256 9c0d9c0d…), lora_r=8, target_modules=q_proj: relaunch with the same settings, pass --resume to continue it with its stored config, or use a new --data-dir');
  assert.deepEqual(fingerprintDiff(base, { ...base, weights_sha256: 'c'.repeat(64) }).map((d) => d.stored), [`model=tiny (sha256 bbbbbbbb…)`]);
});

test('save_total_limit prunes the store and the checkpoint dirs while pulls run; relaunches with another r or other data are refused in one line, nothing lost; the finished run relaunched serves at once', async () => {
  const outDir = path.join(tmp, 'out'); // --data-dir defaults to <output-dir>/coordinator
  const dataA = path.join(tmp, 'chats.jsonl'), dataB = path.join(tmp, 'qa.jsonl');
  const lines = (await readFile(TINY_DATASET_PATH, 'utf8')).split('\n').filter((l) => l.trim() !== '');
  await writeFile(dataA, lines.join('\n') + '\n');
  await writeFile(dataB, lines.slice(0, 20).join('\n') + '\n');
  const port = await freePort();
  const base = ['--model', modelDir, '--data', dataA, ...FLAGS, '--max-steps', '6', '--save-steps', '2', '--save-total-limit', '2',
    '--listen', `/ip4/127.0.0.1/tcp/${port}`, '--min-peers', '1', '--output-dir', outDir];
  const coord = procs.start('launch', ['launch', ...base, '--json']);
  const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
  // each compute job is slowed (node/test-aids.ts) so the six steps outlast several pulls even on a
  // loaded machine, where one pull (a new libp2p client) can take seconds
  join(addr, 'v0', { SWARMTUNE_TEST_DELAY_MS: '250' });

  // pulls of the latest and of named steps keep running while steps commit and older ones are pruned:
  // each either succeeds with the whole adapter of the step it names or fails with a StaleError
  const got = new Map<number, PulledAdapter[]>();
  const failures: string[] = [];
  let stale = 0;
  let training = true;
  const puller = (async () => {
    for (let i = 0; training; i++) {
      const step = i % 3 === 0 ? undefined : Number(coord.events.filter((e) => e.event === 'step').at(-1)?.step ?? 0) - (i % 3 === 1 ? 0 : 1);
      try {
        const a = await pullAdapter(addr, step !== undefined && step >= 0 ? { step } : {});
        got.set(a.step, [...(got.get(a.step) ?? []), a]);
      } catch (e) {
        // a step pruned meanwhile is stale; one not committed yet (the client names it StepNotFoundError) is not there yet
        if ((e as Error).name === 'StaleError' || (e as Error).name === 'StepNotFoundError') stale++;
        else failures.push(`${(e as Error).name}: ${(e as Error).message}`);
      }
      // each pull is a new client; libp2p refuses more than 5 new inbound connections a second from one host
      await new Promise((r) => setTimeout(r, 250));
    }
  })();
  await waitEvent(coord, (e) => e.event === 'finished', 'finished', 180_000);
  training = false;
  await puller;
  assert.deepEqual(failures, [], 'a pull fails only with a StaleError');
  console.log(`# pulls during training: ${[...got.values()].reduce((n, a) => n + a.length, 0)} whole adapters of steps ${[...got.keys()].sort((a, b) => a - b).join(', ')}, ${stale} StaleErrors`);
  assert.ok(got.size >= 2, `pulls got adapters of several steps: ${[...got.keys()]}`);
  for (const [step, as] of got) for (const a of as) assert.ok(sameTensors(a.tensors, as[0]!.tensors), `every pull of step ${step} got the same adapter`);

  // the store keeps the latest step and the last save_total_limit checkpoints (4 and 6); the rest is refused as pruned
  for (const s of [4, 6]) {
    const a = await pullAdapter(addr, { step: s });
    assert.equal(a.lora.r, 4);
    const onDisk = await readAdapter(path.join(outDir, `checkpoint-${s}`));
    assert.ok(sameTensors(a.tensors, onDisk.tensors), `checkpoint-${s} on disk equals the store's step ${s}`);
    if (got.has(s)) assert.ok(sameTensors(a.tensors, got.get(s)![0]!.tensors), `the pulls during training of step ${s} got its committed adapter`);
  }
  await assert.rejects(pullAdapter(addr, { step: 2 }), (e: Error) => e.name === 'StaleError' && /step 2 is no longer kept \(pruned under save_total_limit\); pullable steps: 4, 6/.test(e.message));
  assert.deepEqual((await readdir(outDir)).filter((n) => n.startsWith('checkpoint-')).sort(), ['checkpoint-4', 'checkpoint-6']);
  for (const d of ['checkpoint-4', 'checkpoint-6', '.']) {
    const args = JSON.parse(await readFile(path.join(outDir, d, 'training_args.json'), 'utf8'));
    assert.equal(args.lora_r, 4);
    assert.equal(args.save_total_limit, 2);
    assert.equal(args.data, dataA);
  }
  const status = await procs.run('status', ['status', addr]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /^config: model=.*data=.*chats\.jsonl \(sha256 [0-9a-f]{8}….*lora_r=4, /m);
  coord.child.kill('SIGINT');
  assert.equal(await coord.exit, 0, stderrOf(coord));
  const before = await readAdapter(outDir);

  // another r, other data: each refused in one line naming what differs; the store is untouched
  const launchNoPeers = (extra: string[]) => procs.run('relaunch', ['launch', ...base, ...extra, '--exit-on-finish'], 60_000);
  const r8 = await launchNoPeers(['--lora-r', '8']);
  assert.notEqual(r8.code, 0);
  assert.match(r8.stderr, /this data dir holds run [0-9a-f]{8}… \(step 6 of 6\) trained with lora_r=4; you asked for lora_r=8: relaunch with the same settings, pass --resume to continue it with its stored config, or use a new --data-dir/);
  const qa = await launchNoPeers(['--data', dataB]);
  assert.notEqual(qa.code, 0);
  assert.match(qa.stderr, /trained with data=chats\.jsonl \(sha256 [0-9a-f]{8}…\)(, [a-z_]+=[^;]+)?; you asked for data=qa\.jsonl \(sha256 [0-9a-f]{8}…\)/);
  const store = await RunStore.open(path.join(outDir, 'coordinator', 'db'));
  try {
    assert.equal((await store.latest())?.step, 6);
    assert.deepEqual(await store.committedSteps(), [4, 6]);
  } finally { await store.close(); }

  // the same settings on the finished run: it says so, writes the adapter, exits without waiting for peers
  await rm(path.join(outDir, 'adapter_model.safetensors'));
  const again = await launchNoPeers(['--json']);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /run [0-9a-f]+ is finished \(step 6 of 6\); nothing to train/);
  assert.doesNotMatch(again.stderr, /volunteers: swarmtune join/);
  assert.ok(again.stdout.split('\n').some((l) => l.includes('"event":"finished"') && l.includes('"already":true')));
  assert.ok(sameTensors((await readAdapter(outDir)).tensors, before.tensors), 'the relaunch wrote the run\'s own adapter');

  // and without --exit-on-finish it serves pulls and status
  const serving = procs.start('serving', ['launch', ...base, '--json']);
  const addr2 = String((await waitEvent(serving, (e) => e.event === 'listening', 'listening')).multiaddr);
  await waitEvent(serving, (e) => e.event === 'finished', 'finished', 30_000);
  const latest = await pullAdapter(addr2);
  assert.equal(latest.step, 6);
  assert.ok(sameTensors(latest.tensors, before.tensors));
  const st = await procs.run('status', ['status', addr2, '--json']);
  const sj = JSON.parse(st.stdout);
  assert.equal(sj.state, 'finished');
  assert.deepEqual(sj.peers, []);
  assert.equal(sj.step, 6);
  serving.child.kill('SIGINT');
  assert.equal(await serving.exit, 0, stderrOf(serving));
});

test('--resume continues a stopped run with its stored config and names the flags it ignored; --resume on an empty data dir is refused', async () => {
  const outDir = path.join(tmp, 'out-resume');
  const dataDir = path.join(tmp, 'coord-resume');
  const port = await freePort();
  const base = ['--listen', `/ip4/127.0.0.1/tcp/${port}`, '--min-peers', '1', '--output-dir', outDir, '--data-dir', dataDir, '--json', '--exit-on-finish'];
  const first = procs.start('launch-1', ['launch', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', '4', ...base], { SWARMTUNE_TEST_CRASH: 'after-commit@2' });
  const addr = String((await waitEvent(first, (e) => e.event === 'listening', 'listening')).multiaddr);
  const vol = join(addr, 'v-resume');
  assert.equal(await first.exit, 137, stderrOf(first));

  const second = procs.start('launch-2', ['launch', ...base, '--resume', '--lora-r', '8', '--max-steps', '9', '--data', path.join(tmp, 'missing.jsonl')]);
  await waitEvent(second, (e) => e.event === 'resumed' && e.step === 2, 'resumed at step 2');
  assert.match(stderrOf(second), /--resume: continuing run [0-9a-f]+ with its stored config; ignoring --data --max-steps --lora-r\n/);
  const fin = await waitEvent(second, (e) => e.event === 'finished', 'finished', 120_000);
  assert.equal(fin.step, 4);
  assert.equal(await second.exit, 0, stderrOf(second));
  assert.equal(await vol.exit, 0);
  const a = await readAdapter(outDir);
  assert.equal(a.lora.r, 4, 'the stored r, not the flag');
  assert.equal(JSON.parse(await readFile(path.join(outDir, 'training_args.json'), 'utf8')).max_steps, 4);

  const none = await procs.run('resume-none', ['launch', '--resume', '--data-dir', path.join(tmp, 'nothing-here'), '--output-dir', outDir]);
  assert.notEqual(none.code, 0);
  assert.match(none.stderr, /--resume: .*nothing-here holds no run to resume \(launch without --resume starts one\)/);
  assert.equal(existsSync(path.join(tmp, 'nothing-here')), false, 'a refused --resume creates no data dir');
});
