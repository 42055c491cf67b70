// Protocol fuzzing against a LIVE coordinator and LIVE volunteers (issue 6.6): real processes on
// 127.0.0.1, a stranger libp2p node sending ≥ 10,000 random and mutated frames over every protocol
// each side serves (coordinator: join, weights, status, adapter; volunteer: weights, heartbeat,
// forward, backward, commit, aggregate, adapter, optimizer, finish) — while the coordinator waits for
// peers, while the volunteers wait for their stage, during training and after the run finished.
// Every answer must be a typed error frame (or a closed stream for a frame over the cap, or a plain
// answer to a request that was valid); every process stays up; nothing changes: no peer is admitted,
// dropped or banned, no micro-batch is retried, and the adapter equals `swarmtune train` (≤ 1e-5).
//
// The deep paths of the stage host (stale step/attempt, tensors of the wrong shape, NaN, pages out of
// order) answer only the coordinator; tests/protocol-fuzz.test.ts fuzzes them in process. Here the
// fuzzer is a stranger (as an attacker would be) and the volunteer must refuse it (AuthError) after
// framing and schema checks; joins fail on the private run's token. FUZZ_SEED=<n> reruns a seed.
//
// Sizes: the tiny model, 4 steps of 4 micro-batches, 3 volunteers in 2 stages; about a minute.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { multiaddr } from '@multiformats/multiaddr';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { createSwarmNode } from '../protocol/net.ts';
import type { DialTarget, ProtoName, SwarmNode } from '../protocol/net.ts';
import { Rng, Tally, mutate, sendRaw, validRequest, TYPED_ERRORS } from './fuzz-frames.ts';
import type { TemplateContext } from './fuzz-frames.ts';
import { Procs, adapterMap, alive, assertNoCrash, relUpdateDiff, trainFlags, waitEvent } from './swarm-procs.ts';
import type { Proc } from './swarm-procs.ts';

const SEED = process.env.FUZZ_SEED !== undefined ? Number(process.env.FUZZ_SEED) : (Date.now() % 1_000_000);
const procs = new Procs();
let tmp = '';
let fuzzer: SwarmNode | null = null;

before(async () => { tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-fuzz-')); });
after(async () => {
  procs.killAll();
  try { await fuzzer?.stop(); } catch { /* stopped */ }
  if (tmp !== '') await rm(tmp, { recursive: true, force: true });
});

async function freePort(): Promise<number> {
  return new Promise<number>((resolve) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => { const p = (srv.address() as net.AddressInfo).port; srv.close(() => resolve(p)); });
  });
}

const COORD_PROTOS: ProtoName[] = ['join', 'weights', 'status', 'adapter'];
const VOL_PROTOS: ProtoName[] = ['weights', 'heartbeat', 'microbatch', 'commit', 'recall', 'aggregate', 'adapter', 'optimizer', 'finish'];

interface Target { name: string; addr: DialTarget; protos: ProtoName[]; ctx: () => TemplateContext; proc: Proc }

/** `n` frames (or until `until` resolves) from `workers` concurrent senders, round-robin over targets and protocols. */
async function fuzz(node: SwarmNode, targets: Target[], tally: Tally, rng: Rng, opts: { n?: number; until?: Promise<unknown>; workers?: number }): Promise<void> {
  let stop = false;
  void opts.until?.then(() => { stop = true; }, () => { stop = true; });
  let sent = 0;
  const worker = async (w: number) => {
    const r = new Rng(rng.int(2 ** 31) + w);
    while (!stop && (opts.n === undefined || sent < opts.n)) {
      // a failed dial can settle without ever yielding to the event loop: let process exits and output in
      await new Promise((res) => setImmediate(res));
      const dead = targets.find((t) => !alive(t.proc));
      // volunteers exit when the run finishes; anything else that dies is a crash
      if (dead !== undefined && (dead.name === 'coordinator' || opts.until === undefined)) throw new Error(`${dead.name} died during fuzzing; stderr:\n${dead.proc.stderr.join('').slice(-3000)}`);
      const live = targets.filter((t) => alive(t.proc));
      if (live.length === 0) break;
      sent++;
      const t = live[r.int(live.length)]!;
      const proto = t.protos[r.int(t.protos.length)]!;
      const m = mutate(r, validRequest(r, proto, t.ctx()));
      const o = await sendRaw(node, t.addr, proto, m.bytes);
      if (o.kind === 'closed' && m.kind !== 'oversize-prefix' && t.name !== 'coordinator') {
        // a volunteer told to finish closes its streams as it exits: that is not a refusal
        await new Promise((res) => setTimeout(res, 2000));
        if (!alive(t.proc) || t.proc.events.some((e) => e.event === 'finished')) { tally.unreachable++; continue; }
      }
      tally.add(`${t.name}/${proto}`, m, o);
      if (process.env.FUZZ_TRACE !== undefined && tally.total % 500 === 0) process.stderr.write(`fuzz: ${tally.total} frames, ${tally.unreachable} unreachable; alive ${targets.map((x) => `${x.name}=${alive(x.proc)}`).join(' ')}\n`);
      if (o.kind === 'ok') {
        // a plain answer only where a stranger may get one: this run is private, so only its status
        // (blobs and pulls need the join token)
        assert.ok(proto === 'status' && t.name === 'coordinator',
          `${t.name} answered a stranger's ${proto} (${m.kind}) instead of refusing it: ${JSON.stringify(o.value).slice(0, 300)}`);
      }
      if (o.kind === 'closed' && m.kind !== 'oversize-prefix') {
        // only a frame over the cap ends without an answer
        assert.fail(`${t.name}/${proto} ${m.kind}: stream ended without an answer: ${o.why}`);
      }
    }
  };
  await Promise.all(Array.from({ length: opts.workers ?? 6 }, (_, w) => worker(w)));
}

test('≥ 10,000 random and mutated frames to a live coordinator and live volunteers: typed refusals, no crash, no state change; the run equals `swarmtune train`', async () => {
  console.log(`# swarm fuzz seed ${SEED} (rerun with FUZZ_SEED=${SEED})`);
  const rng = new Rng(SEED);
  const modelDir = await ensureTinyModel(path.join(tmp, 'model'));
  const STEPS = 4;
  const initDir = path.join(tmp, 'init');
  const init = await procs.run('init', ['train', '--model', modelDir, '--data', TINY_DATASET_PATH, ...trainFlags(1), '--learning-rate', '1e-2', '--output-dir', initDir, '--device', 'cpu']);
  assert.equal(init.code, 0, init.stderr);
  const flags = ['--model', modelDir, '--data', TINY_DATASET_PATH, ...trainFlags(STEPS), '--init-adapter', initDir];
  const localDir = path.join(tmp, 'local');
  const localRun = procs.run('train', ['train', ...flags, '--output-dir', localDir, '--device', 'cpu']);

  const outDir = path.join(tmp, 'swarm');
  const coord = procs.start('coordinator', ['launch', ...flags, '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', '3', '--pipeline-stages', '2',
    '--wire-dtype', 'f32', '--private', '--json', '--output-dir', outDir]);
  const listening = await waitEvent(coord, (e) => e.event === 'listening', 'listening');
  const addr = String(listening.multiaddr), runId = String(listening.run_id), token = String(listening.token);
  assert.ok(token.length > 8, 'a private run has a join token');
  const blobs = (await readdir(path.join(outDir, 'coordinator', 'blobs'))).filter((f) => /^[0-9a-f]{64}$/.test(f));
  assert.ok(blobs.length > 0);

  fuzzer = await createSwarmNode({ dataDir: path.join(tmp, 'fuzzer') });
  const tally = new Tally();
  let step = 0;
  const ctxFor = (stageIndex: number): TemplateContext => ({
    runId, step, stageIndex, hidden: 128, batch: 2, seqLen: 64, vocab: 960, sha256: rng.pick(blobs), route: [fuzzer!.peerId.toString()],
  });
  const coordTarget: Target = { name: 'coordinator', addr: multiaddr(addr), protos: COORD_PROTOS, ctx: () => ctxFor(0), proc: coord };

  // 1. the coordinator waits for peers
  await fuzz(fuzzer, [coordTarget], tally, rng, { n: 2500 });
  console.log(`# waiting coordinator: ${tally.total} frames`);

  // 2. two volunteers joined and wait for the third (no stage yet)
  const ports = [await freePort(), await freePort(), await freePort()];
  // every forward and backward job takes 100 ms longer, so the training lasts long enough to be fuzzed too
  const join = (i: number) => procs.start(`v${i}`, ['join', addr, '--token', token, '--device', 'cpu', '--json',
    '--listen', `/ip4/127.0.0.1/tcp/${ports[i]}`, '--data-dir', path.join(tmp, `v${i}`)], { SWARMTUNE_TEST_DELAY_MS: '100' });
  const vols = [join(0), join(1)];
  const volTarget = async (i: number, p: Proc): Promise<Target> => {
    const peerId = String((await waitEvent(p, (e) => e.event === 'joining', `v${i} joining`)).peer_id);
    return { name: `v${i}`, addr: multiaddr(`/ip4/127.0.0.1/tcp/${ports[i]}/p2p/${peerId}`), protos: VOL_PROTOS, ctx: () => ctxFor(i % 2), proc: p };
  };
  const targets = [coordTarget, await volTarget(0, vols[0]!), await volTarget(1, vols[1]!)];
  await waitEvent(coord, (e) => e.event === 'peer_joined' && e.peers === 2, 'two peers joined');
  await fuzz(fuzzer, targets, tally, rng, { n: 3500 });
  console.log(`# + waiting volunteers: ${tally.total} frames`);

  // 3. the third volunteer: the run plans and trains while the fuzzing goes on
  vols.push(join(2));
  targets.push(await volTarget(2, vols[2]!));
  const finished = waitEvent(coord, (e) => e.event === 'finished', 'finished', 300_000);
  const stepWatch = setInterval(() => { step = coord.events.filter((e) => e.event === 'step').length; }, 100);
  stepWatch.unref();
  const before = tally.total;
  try {
    await fuzz(fuzzer, targets, tally, rng, { until: finished });
  } finally {
    clearInterval(stepWatch);
  }
  await finished;
  console.log(`# + during training: ${tally.total - before} frames`);

  // 4. the finished run still serves status and pulls: fuzz it up to the total
  await fuzz(fuzzer, [coordTarget], tally, rng, { n: Math.max(1500, 10_000 - tally.total) });
  console.log(`# swarm fuzz: ${tally.report()}`);

  assert.ok(tally.total >= 10_000, `${tally.total} frames sent`);
  assert.deepEqual(tally.untyped, [], 'every refusal is a typed error');
  for (const p of [...COORD_PROTOS.map((x) => `coordinator/${x}`), ...VOL_PROTOS.map((x) => `v0/${x}`)]) {
    assert.ok((tally.perProto.get(p) ?? 0) >= 50, `${p} got ${tally.perProto.get(p) ?? 0} frames`);
  }
  // (a stranger to this private run is refused before any stale-id check: those run in protocol-fuzz.test.ts)
  for (const k of ['DecodeError', 'SchemaError', 'AuthError']) assert.ok((tally.outcomes.get(k) ?? 0) > 0, `some frames end as ${k}`);
  // a frame announced over the cap is cut off (FrameTooLargeError on the reader, stream aborted): exactly those end without an answer
  assert.equal(tally.outcomes.get('closed') ?? 0, tally.kinds.get('oversize-prefix') ?? 0, 'only oversize frames end without an answer');
  for (const o of tally.outcomes.keys()) assert.ok(TYPED_ERRORS.has(o) || o === 'ok' || o === 'closed', `outcome ${o}`);

  // nothing changed: the three volunteers are the only peers, none was dropped, banned or retried
  const codes = await Promise.all(vols.map((v) => v.exit));
  assert.deepEqual(codes, [0, 0, 0], 'volunteers finish normally');
  for (const p of [coord, ...vols]) assertNoCrash(p);
  assert.ok(alive(coord), 'the coordinator is still up');
  assert.deepEqual(coord.events.filter((e) => e.event === 'peer_dropped' || e.event === 'peer_banned'), []);
  assert.deepEqual(coord.events.filter((e) => e.event === 'step').map((e) => e.step), [1, 2, 3, 4]);
  const st = await procs.run('status', ['status', addr, '--json']);
  assert.equal(st.code, 0, st.stderr);
  const status = JSON.parse(st.stdout) as { state: string; peers: unknown[]; retries: number };
  assert.equal(status.state, 'finished');
  assert.equal(status.peers.length, 3, 'no fuzzer was admitted');
  assert.equal(status.retries, 0, 'no micro-batch was retried');

  const local = await localRun;
  assert.equal(local.code, 0, local.stderr);
  const { rel, norm } = relUpdateDiff(await adapterMap(initDir), await adapterMap(outDir), await adapterMap(localDir));
  console.log(`# fuzzed swarm vs train: relative update difference ${rel.toExponential(2)}`);
  assert.ok(norm > 1e-4);
  assert.ok(rel <= 1e-5, `fuzzed swarm vs train: relative update difference ${rel}`);
  coord.child.kill('SIGINT');
  assert.equal(await coord.exit, 0);
});
