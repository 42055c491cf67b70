// Shared harness of the real-process swarm tests (swarm-resilience, swarm-misbehave): the embedded tiny
// model, --pipeline-stages 2, micro-batches of 2 × 64 tokens; `swarmtune` CLI processes started in
// their own process groups and SIGKILLed after the file's tests.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';

const ROOT = path.resolve(import.meta.dirname, '..');
const NODE = path.join(ROOT, 'node_modules/.bin/node');
const CLI = path.join(ROOT, 'bin/swarmtune.ts');

export interface Proc { child: ChildProcess; events: Array<Record<string, unknown>>; stderr: string[]; stdout: string[]; exit: Promise<number> }
const procs: Proc[] = [];
export let tmp = '';
export let modelDir = '';

export function start(args: string[], env: Record<string, string> = {}): Proc {
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

export async function run(args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  const p = start(args);
  const t = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  return { code, stdout: p.stdout.join('\n'), stderr: p.stderr.join('') };
}

export async function waitEvent(p: Proc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 120_000, from = 0): Promise<Record<string, unknown>> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.slice(from).find(pred);
    if (e !== undefined) return e;
    if (p.child.exitCode !== null) throw new Error(`process exited (${p.child.exitCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function kill9(p: Proc): void {
  try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ }
}

export async function statusJson(addr: string): Promise<Record<string, any>> {
  const r = await run(['status', addr, '--json']);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

/** Registers the file's hooks: a temp dir with the tiny model before its tests, every process
 *  SIGKILLed and the dir removed after them. */
export function useCluster(name: string): void {
  before(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), `swarmtune-${name}-`));
    modelDir = await ensureTinyModel(path.join(tmp, 'model'));
  });
  after(async () => {
    for (const p of procs) if (p.child.exitCode === null && p.child.signalCode === null) kill9(p);
    if (tmp !== '') await rm(tmp, { recursive: true, force: true });
  });
}

export const FLAGS = [
  '--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '4',
  '--learning-rate', '1e-3', '--no-shuffle', '--lora-dropout', '0', '--max-seq-length', '64',
  '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj,down_proj', '--seed', '7',
];

export function launch(name: string, steps: number, minPeers: number, extra: string[] = [], env: Record<string, string> = {}, exitOnFinish = true): Proc {
  return start(['launch', '--model', modelDir, '--data', TINY_DATASET_PATH, ...FLAGS, '--max-steps', String(steps), ...extra,
    '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', String(minPeers), '--pipeline-stages', '2', '--wire-dtype', 'f32', '--json',
    ...(exitOnFinish ? ['--exit-on-finish'] : []), '--output-dir', path.join(tmp, name)], env);
}

export function join(addr: string, dir: string, env: Record<string, string> = {}, extra: string[] = []): Proc {
  return start(['join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, dir), ...extra], env);
}

export async function peerIdOf(v: Proc): Promise<string> {
  return String((await waitEvent(v, (e) => e.event === 'joining', 'joining')).peer_id);
}

export { adapterMap, relUpdateDiff } from './swarm-procs.ts';
