// Shared harness of the real-process swarm tests (swarm-resilience, swarm-misbehave): the embedded tiny
// model, --pipeline-stages 2, micro-batches of 2 × 64 tokens; `swarmtune` CLI processes started in
// their own process groups and SIGKILLed after the file's tests.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { spawnCli, type CliProc } from './swarm-procs.ts';


export type Proc = CliProc;
const procs: Proc[] = [];
export let tmp = '';
export let modelDir = '';

export function start(args: string[], env: Record<string, string> = {}): Proc {
  const p = spawnCli(args, env);
  procs.push(p);
  return p;
}

export async function run(args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  const p = start(args);
  const t = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  return { code, stdout: p.lines.join('\n'), stderr: p.stderr.join('') };
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
