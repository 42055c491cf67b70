// netlab's hooks for benches (bench/ may import these): run commands between hosts over emulated links.
//
//   const r = await runOverLink({ rateMbit: 20, delayMs: 25 }, {
//     server: { cmd: process.execPath, args: ['bench/net.ts', '--sink', '--host', '{server}'], ready: /listening/ },
//     client: { cmd: process.execPath, args: ['bench/net.ts', '--to', '{server}'] },
//   });
//
// `{server}` and `{client}` in args and env values become the two hosts' addresses (also in the environment
// as NETLAB_SERVER_ADDR / NETLAB_CLIENT_ADDR). withLab() is the general form: any topology, torn down after fn.
import type { ChildProcess, SpawnOptions } from 'node:child_process';
import { createLab, type DeviceStats, type Lab, type LabOptions } from './lab.ts';
import type { LabSpec, LinkSpec } from './topology.ts';

export { createLab, type Lab } from './lab.ts';
export type { LabSpec, LinkSpec, NatKind } from './topology.ts';

/** A link's shape without its ends. */
export type LinkShape = Omit<LinkSpec, 'a' | 'b' | 'natKind'>;

/** Builds the lab, runs fn, and tears the lab down whatever fn does. */
export async function withLab<T>(spec: LabSpec, fn: (lab: Lab) => Promise<T>, opts: LabOptions = {}): Promise<T> {
  const lab = await createLab(spec, opts);
  try { return await fn(lab); } finally { await lab.teardown(); }
}

/** A star: every host on its own link (its access line) to the router "hub". Two hosts' round trip is the
 *  sum of both lines' round trips; each line's rate limits the host's upload (a→b is host→hub) and download. */
export function starSpec(lines: Record<string, LinkShape>): LabSpec {
  const hosts = Object.keys(lines);
  return { hosts, routers: ['hub'], links: hosts.map(h => ({ a: h, b: 'hub', ...lines[h] })) };
}

export interface Job {
  cmd: string;
  args?: string[];
  env?: Record<string, string>;
  cwd?: string;
}

export interface ProcResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

const MAX_OUTPUT = 16 << 20;   // bytes of stdout/stderr kept per process

/** Runs a job in host and collects its output: resolves when it exits; on timeout it is killed and the
 *  promise rejects naming the host, the command and the tail of its stderr. */
export function runIn(lab: Lab, host: string, job: Job, timeoutMs: number, vars: Record<string, string> = {}): { child: ChildProcess; done: Promise<ProcResult> } {
  const sub = (s: string): string => s.replace(/\{(\w+)\}/g, (m, k: string) => vars[k] ?? m);
  const opts: SpawnOptions = { cwd: job.cwd, env: { ...process.env, ...Object.fromEntries(Object.entries(job.env ?? {}).map(([k, v]) => [k, sub(v)])) } };
  const t0 = performance.now();
  const child = lab.spawn(host, job.cmd, (job.args ?? []).map(sub), opts);
  let stdout = '', stderr = '';
  child.stdout!.on('data', d => { if (stdout.length < MAX_OUTPUT) stdout += d; });
  child.stderr!.on('data', d => { if (stderr.length < MAX_OUTPUT) stderr += d; });
  const done = new Promise<ProcResult>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`netlab: ${job.cmd} in ${host} did not finish within ${timeoutMs} ms: ${stderr.trim().split('\n').slice(-3).join(' | ')}`));
    }, timeoutMs);
    child.once('error', e => { clearTimeout(timer); reject(new Error(`netlab: cannot start ${job.cmd} in ${host}: ${e.message}`)); });
    child.once('exit', (code, signal) => { clearTimeout(timer); resolve({ code, signal, stdout, stderr, ms: performance.now() - t0 }); });
  });
  done.catch(() => { /* the caller awaits it; this only keeps an unawaited rejection from crashing the process */ });
  return { child, done };
}

export interface OverLinkJob {
  /** started first, in host "server"; `ready` (matched on its stdout or stderr) says it is listening */
  server: Job & { ready?: RegExp };
  /** started once the server is ready, in host "client"; its exit ends the run */
  client: Job;
  /** for the whole run (default 10 min) */
  timeoutMs?: number;
}

export interface OverLinkResult {
  client: ProcResult;
  server: ProcResult;
  addr: { client: string; server: string };
  /** the link's delay device statistics at the end (null for a link without delay) */
  device: DeviceStats | null;
}

/** Runs a server and a client on two hosts joined by one link of the given shape (client = a, server = b:
 *  rateMbit/delayMs is client→server, rateMbitBA/delayMsBA server→client). The server is stopped (SIGTERM)
 *  when the client exits; the lab is torn down in every case. */
export async function runOverLink(link: LinkShape, job: OverLinkJob, opts: LabOptions = {}): Promise<OverLinkResult> {
  const timeoutMs = job.timeoutMs ?? 600_000;
  return withLab({ hosts: ['client', 'server'], links: [{ a: 'client', b: 'server', ...link }] }, async lab => {
    const addr = { client: lab.addr('client'), server: lab.addr('server') };
    const vars = { ...addr };
    const env = { NETLAB_CLIENT_ADDR: addr.client, NETLAB_SERVER_ADDR: addr.server };
    const server = runIn(lab, 'server', { ...job.server, env: { ...env, ...job.server.env } }, timeoutMs, vars);
    if (job.server.ready) {
      const re = job.server.ready;
      await new Promise<void>((resolve, reject) => {
        let seen = '';
        const onData = (d: Buffer): void => { seen = (seen + d).slice(-65536); if (re.test(seen)) finish(null); };
        const timer = setTimeout(() => finish(new Error(`netlab: the server (${job.server.cmd}) printed nothing matching ${re} within ${timeoutMs} ms`)), timeoutMs);
        const onExit = (code: number | null): void => finish(new Error(`netlab: the server (${job.server.cmd}) exited (${code}) before it was ready: ${seen.trim().split('\n').slice(-3).join(' | ')}`));
        function finish(err: Error | null): void {
          clearTimeout(timer);
          server.child.stdout!.off('data', onData); server.child.stderr!.off('data', onData); server.child.off('exit', onExit);
          if (err) reject(err); else resolve();
        }
        server.child.stdout!.on('data', onData); server.child.stderr!.on('data', onData); server.child.once('exit', onExit);
      });
    }
    const client = await runIn(lab, 'client', { ...job.client, env: { ...env, ...job.client.env } }, timeoutMs, vars).done;
    const device = await lab.deviceStats(0).catch(() => null);
    server.child.kill('SIGTERM');
    const hard = setTimeout(() => server.child.kill('SIGKILL'), 5000);
    try { return { client, server: await server.done, addr, device }; } finally { clearTimeout(hard); }
  }, opts);
}
