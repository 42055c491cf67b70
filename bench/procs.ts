// Child processes for the bench: `swarmtune` CLI runs with JSON-line events, and bench sub-scripts that
// print one JSON object as their last stdout line. Every child is started in its own process group and
// killed (by its own pid) if the bench stops early.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';

export const ROOT = path.resolve(import.meta.dirname, '..');
export const NODE = process.execPath;
export const CLI = path.join(ROOT, 'bin/swarmtune.ts');

export interface Proc {
  child: ChildProcess;
  events: Array<Record<string, unknown> & { tMs: number }>;
  stdout: string[];
  stderr: string[];
  exit: Promise<number>;
}

const live = new Set<ChildProcess>();
function killAll(): void {
  for (const c of live) { try { process.kill(-c.pid!, 'SIGKILL'); } catch { /* gone */ } }
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { killAll(); process.exit(130); });

/** Start `cmd args`; JSON stdout lines become events stamped with the parent's performance.now(). */
export function startProc(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): Proc {
  const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], detached: true, env: opts.env ?? process.env });
  live.add(child);
  const p: Proc = {
    child, events: [], stdout: [], stderr: [],
    exit: new Promise((r) => child.on('exit', (code, sig) => { live.delete(child); r(code ?? (sig !== null ? 128 : 1)); })),
  };
  let buf = '';
  child.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 1);
      p.stdout.push(line);
      try { const e = JSON.parse(line); if (e !== null && typeof e === 'object') p.events.push({ ...e, tMs: performance.now() }); } catch { /* not JSON */ }
    }
  });
  child.stderr!.on('data', (d: Buffer) => { p.stderr.push(d.toString()); if (p.stderr.length > 400) p.stderr.splice(0, 200); });
  return p;
}

export const startCli = (args: string[]): Proc => startProc(NODE, [CLI, ...args]);

export function kill(p: Proc, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (p.child.exitCode === null && p.child.signalCode === null) { try { process.kill(-p.child.pid!, sig); } catch { /* gone */ } }
}

export async function waitEvent(p: Proc, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs = 300_000): Promise<Record<string, unknown> & { tMs: number }> {
  const t0 = Date.now();
  for (;;) {
    const e = p.events.find(pred);
    if (e !== undefined) return e;
    if (p.child.exitCode !== null) throw new Error(`process exited (${p.child.exitCode}) before ${what}; stderr:\n${p.stderr.join('').slice(-2000)}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; stderr:\n${p.stderr.join('').slice(-2000)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Run a bench sub-script (node FILE args) and parse the JSON object on its last stdout line. */
export async function runJsonScript(cmd: string, args: string[], what: string, timeoutMs = 300_000): Promise<Record<string, unknown>> {
  const p = startProc(cmd, args);
  p.child.stderr!.on('data', (d: Buffer) => process.stderr.write(d));
  const t = setTimeout(() => kill(p), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  const last = p.stdout.filter((l) => l.trim().startsWith('{')).at(-1);
  if (code !== 0 || last === undefined) throw new Error(`${what} failed (exit ${code}): ${p.stderr.join('').slice(-2000)}`);
  return JSON.parse(last) as Record<string, unknown>;
}
