// Misbehaving peers with real processes on 127.0.0.1 (docs/swarm.md "Failure handling"): a peer
// sending non-finite tensors is banned with doubling backoff and refused while banned; repeated
// compute timeouts mark a peer slow and routes avoid it. (Split from swarm-resilience.test.ts so
// each file stays near a minute.)
//
// Sizes: the embedded tiny model (4 layers, hidden 128), --pipeline-stages 2, micro-batches of 2 × 64
// tokens. SWARMTUNE_TEST_DELAY_MS (node/test-aids.ts) slows chosen volunteers so that steps last long
// enough for the faults to land mid-run; it does not change the math.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { readAdapter } from '../engine/formats/peft.ts';

const ROOT = path.resolve(import.meta.dirname, '..');
const NODE = path.join(ROOT, 'node_modules/.bin/node');
const CLI = path.join(ROOT, 'bin/swarmtune.ts');

interface Proc { child: ChildProcess; events: Array<Record<string, unknown>>; stderr: string[]; stdout: string[]; exit: Promise<number> }
const procs: Proc[] = [];
let tmp = '';
let modelDir = '';

function start(args: string[], env: Record<string, string> = {}): Proc {
  const child = spawn(NODE, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: { ...process.env, ...env } });
  const p: Proc = { child, events: [], stderr: [], stdout: [], exit: new Promise((r) => child.on('exit', (code, sig) => r(code ?? (sig !== null ? 128 : 1)))) };
  let buf = '';
  child.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 1);
      p.stdout.push(line);
      try { p.events.push(JSON.parse(line)); } catch { /* human line */ }
    }
  });
  child.stderr!.on('data', (d: Buffer) => { p.stderr.push(d.toString()); });
  procs.push(p);
  return p;
}

async function run(args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  const p = start(args);
  const t = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  return { code, stdout: p.stdout.join('\n'), stderr: p.stderr.join('') };
}

async function waitEvent(p: Proc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 120_000, from = 0): Promise<Record<string, unknown>> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.slice(from).find(pred);
    if (e !== undefined) return e;
    if (p.child.exitCode !== null) throw new Error(`process exited (${p.child.exitCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function kill9(p: Proc): void {
  try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ }
}

async function statusJson(addr: string): Promise<Record<string, any>> {
  const r = await run(['status', addr, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

after(async () => {
  for (const p of procs) if (p.child.exitCode === null && p.child.signalCode === null) kill9(p);
  if (tmp !== '') await rm(tmp, { recursive: true, force: true });
});

before(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-misbehave-'));
  modelDir = await ensureTinyModel(path.join(tmp, 'model'));
});

const FLAGS = [
  '--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '4',
  '--learning-rate', '1e-3', '--no-shuffle', '--lora-dropout', '0', '--max-seq-length', '64',
  '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj,down_proj', '--seed', '7',
];

function launch(name: string, steps: number, minPeers: number, extra: string[] = [], env: Record<string, string> = {}, exitOnFinish = true): Proc {
  return start(['launch', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', String(steps), ...extra,
    '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', String(minPeers), '--pipeline-stages', '2', '--wire-dtype', 'f32', '--json',
    ...(exitOnFinish ? ['--exit-on-finish'] : []), '--output-dir', path.join(tmp, name)], env);
}

function join(addr: string, dir: string, env: Record<string, string> = {}, extra: string[] = []): Proc {
  return start(['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, dir), ...extra], env);
}

async function peerIdOf(v: Proc): Promise<string> {
  return String((await waitEvent(v, (e) => e.event === 'joining', 'joining')).peer_id);
}

async function adapterMap(dir: string): Promise<Map<string, Float32Array>> {
  const a = await readAdapter(dir);
  return new Map(a.tensors.map((t) => [t.name, t.data]));
}

function relUpdateDiff(init: Map<string, Float32Array>, a: Map<string, Float32Array>, b: Map<string, Float32Array>): number {
  let num = 0, den = 0;
  for (const [name, x0] of init) {
    const xa = a.get(name)!, xb = b.get(name)!;
    for (let i = 0; i < x0.length; i++) { num += (xa[i]! - xb[i]!) ** 2; den += (xb[i]! - x0[i]!) ** 2; }
  }
  return Math.sqrt(num / den);
}

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
  assert.equal(await again.exit, 2);
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
