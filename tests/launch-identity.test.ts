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

function join(addr: string, name: string): Proc {
  return procs.start(name, ['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, name)]);
}

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
  join(addr, 'v0');

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
        if ((e as Error).name === 'StaleError') stale++;
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
