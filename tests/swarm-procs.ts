// Real swarmtune processes on 127.0.0.1 for the fuzz and chaos tests: start, follow their JSON events,
// kill, clean up; and the adapter comparison the equivalence tests use.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { readAdapter } from '../engine/formats/peft.ts';

const ROOT = path.resolve(import.meta.dirname, '..');
const NODE = path.join(ROOT, 'node_modules/.bin/node');
const CLI = path.join(ROOT, 'bin/swarmtune.ts');

/** A swarmtune CLI process: its stdout lines, the JSON events among them, stderr, and its exit code
 *  (128 + signal number when a signal ended it). */
export interface CliProc { child: ChildProcess; lines: string[]; events: Array<Record<string, unknown>>; stderr: string[]; exit: Promise<number> }
export interface Proc extends CliProc { name: string }

/** `swarmtune ARGS` in its own process group (so a test can SIGKILL it and its children), stdout split into
 *  lines and parsed JSON events as they arrive. Shared by every real-process test. */
export function spawnCli(args: string[], env: Record<string, string> = {}): CliProc {
  return followCli(spawn(NODE, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: { ...process.env, ...env } }));
}

/** Follow a started swarmtune process (e.g. one inside a netlab namespace): stdout lines, JSON events, stderr, exit code. */
export function followCli(child: ChildProcess): CliProc {
  // a signal-killed process exits 128 + the signal's number, as shells report it (SIGKILL: 137)
  const p: CliProc = { child, lines: [], events: [], stderr: [], exit: new Promise((r) => child.on('exit', (code, sig) => r(code ?? (sig !== null ? 128 + (os.constants.signals[sig] ?? 0) : 1)))) };
  let buf = '';
  child.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 1);
      p.lines.push(line);
      try { p.events.push(JSON.parse(line)); } catch { /* human line */ }
    }
  });
  child.stderr!.on('data', (d: Buffer) => { p.stderr.push(d.toString()); });
  return p;
}

export class Procs {
  readonly all: Proc[] = [];

  start(name: string, args: string[], env: Record<string, string> = {}): Proc {
    const p: Proc = Object.assign(spawnCli(args, env), { name });
    this.all.push(p);
    return p;
  }

  async run(name: string, args: string[], timeoutMs = 180_000): Promise<{ code: number; stdout: string; stderr: string }> {
    const p = this.start(name, args);
    const t = setTimeout(() => { try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ } }, timeoutMs);
    const code = await p.exit;
    clearTimeout(t);
    return { code, stdout: p.lines.join('\n'), stderr: p.stderr.join('') };
  }

  /** SIGKILL a process group: a crash, no goodbye. */
  kill(p: Proc): void {
    if (p.child.exitCode === null && p.child.signalCode === null) { try { process.kill(-p.child.pid!, 'SIGKILL'); } catch { /* gone */ } }
  }

  killAll(): void { for (const p of this.all) this.kill(p); }
}

export function alive(p: Proc): boolean { return p.child.exitCode === null && p.child.signalCode === null; }

export async function waitEvent(p: Proc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 120_000): Promise<Record<string, unknown>> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.find(pred);
    if (e !== undefined) return e;
    if (!alive(p)) throw new Error(`${p.name} exited (${p.child.exitCode ?? p.child.signalCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what} from ${p.name}; stderr:\n${p.stderr.join('').slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The tiny-model training flags both the swarm and `swarmtune train` get (as in tests/swarm-e2e.test.ts). */
export function trainFlags(steps: number): string[] {
  return [
    '--max-steps', String(steps), '--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '4',
    '--learning-rate', '1e-3', '--no-shuffle', '--lora-dropout', '0', '--max-seq-length', '64',
    '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj,down_proj', '--seed', '7',
  ];
}

export async function adapterMap(dir: string): Promise<Map<string, Float32Array>> {
  const a = await readAdapter(dir);
  return new Map(a.tensors.map((t) => [t.name, t.data]));
}

/** ‖Δa − Δb‖ / ‖Δb‖ with Δ the change from `init`: the swarm equivalence measure (docs/swarm.md). */
export function relUpdateDiff(init: Map<string, Float32Array>, a: Map<string, Float32Array>, b: Map<string, Float32Array>): { rel: number; norm: number } {
  let num = 0, den = 0;
  for (const [name, x0] of init) {
    const xa = a.get(name), xb = b.get(name);
    assert.ok(xa !== undefined && xb !== undefined, `tensor ${name} missing from an adapter`);
    for (let i = 0; i < x0.length; i++) {
      const ua = xa[i]! - x0[i]!, ub = xb[i]! - x0[i]!;
      num += (ua - ub) ** 2;
      den += ub ** 2;
    }
  }
  return { rel: Math.sqrt(num / den), norm: Math.sqrt(den) };
}

/** A process's stderr must show no crash: no uncaught exception or unhandled rejection. */
export function assertNoCrash(p: Proc): void {
  const err = p.stderr.join('');
  assert.doesNotMatch(err, /Unhandled|uncaught|UnhandledPromiseRejection|FATAL ERROR|Segmentation/i, `${p.name} stderr shows a crash:\n${err.slice(-3000)}`);
}
