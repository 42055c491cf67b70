// The swarm over emulated WAN links: the bench model through `swarmtune launch` + `swarmtune join`, every
// process in its own network namespace behind a netlab access line (tests/netlab/), per stage count, link
// and wire codec. Prints one JSON object ({ wan: { runs: [...] } }) on its last stdout line.
//
//   node bench/wan.ts [--quick] [--stages 2,4] [--links loopback,1000/10,100/50,20/100] [--codecs f32,bf16,...] [--steps N]
//
// Topology: a star (tests/netlab/bench.ts starSpec). The coordinator and each volunteer sit on their own
// line to a hub router; each line has the link's rate both ways and a quarter of its RTT one way, so any two
// hosts (coordinator to volunteer, volunteer to volunteer) see the link's RTT and each host's upload and
// download are limited to the rate. "loopback" is the same star with unshaped veth lines (RTT ≈ 0.05 ms);
// without root (netlab unavailable) only loopback runs, on 127.0.0.1, and bytes on the wire are not counted.
//
// Figures per run: tokens/s (median over the steps after the first, as the coordinator reports them), the
// final loss, bytes on the wire per token (every host's interface tx bytes between the first and the last
// step event, over the tokens of those steps: frames as the shaper counts them, Noise/Yamux/TCP included),
// and where a step's time goes, from the coordinator's request log (DEBUG=swarmtune:coordinator*): the
// micro-batch phase (first micro-batch request of the step to the first request of its tail) and the step
// tail (gradient collect, apply, adapter upload, optimizer state: to the end of the step's last request).
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureBenchModelDir, writeLongTextData } from './fixtures.ts';
import { CLI, NODE, ROOT } from './procs.ts';
import { labSupport } from '../tests/netlab/lab.ts';
import { createLab, starSpec, type Lab } from '../tests/netlab/bench.ts';
import { shSync } from '../tests/netlab/sh.ts';
import { FLOAT_CODECS } from '../protocol/tensor.ts';

export class WanUsageError extends Error {
  override name = 'WanUsageError';
}

export interface LinkSetting { name: string; rateMbit: number | null; rttMs: number }
export const LINKS: readonly LinkSetting[] = [
  { name: 'loopback', rateMbit: null, rttMs: 0 },
  { name: '1000/10', rateMbit: 1000, rttMs: 10 },
  { name: '100/50', rateMbit: 100, rttMs: 50 },
  { name: '20/100', rateMbit: 20, rttMs: 100 },
];
/** every wire codec (the delta codecs aq4 / aq2 send cold, int4 / int2 codes, until a sample comes round again: the bench data has 8 steps an epoch) */
export const WAN_CODECS = FLOAT_CODECS;

export interface WanOptions {
  stages: number[];
  links: LinkSetting[];
  codecs: string[];
  steps: number;
  microBatch: number;
  accumulation: number;
  seqLen: number;
  /** per run, startup included */
  runTimeoutMs: number;
  log?: (s: string) => void;
  /** each run as it finishes (the command line prints it as a JSON line, so a stopped bench keeps what it measured) */
  onRun?: (r: Omit<WanRun, 'vs_loopback'>) => void;
}

export interface WanRun {
  stages: number; link: string; rate_mbit: number | null; rtt_ms: number; codec: string;
  tokens_per_s: number; tokens_per_s_all: number[]; vs_loopback: number | null;
  bytes_per_token_on_wire: number | null; final_loss: number;
  /** medians over the measured steps, seconds: the whole step, its micro-batch phase and its tail */
  step_s: number | null; micro_batch_phase_s: number | null; step_tail_s: number | null; tail_share: number | null;
  startup_s: number; where: 'netlab' | '127.0.0.1';
}

const median = (xs: number[]): number => { const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length === 0 ? NaN : v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };
const r3 = (x: number): number => Number(x.toFixed(3));

export function parseWanArgs(argv: string[]): WanOptions & { quick: boolean } {
  let quick = argv.includes('--quick');
  const get = (name: string): string | undefined => {
    const i = argv.findIndex((a) => a === name || a.startsWith(name + '='));
    if (i < 0) return undefined;
    const a = argv[i]!;
    const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[i + 1];
    if (v === undefined) throw new WanUsageError(`${name} needs a value`);
    return v;
  };
  const known = new Set(['--quick', '--stages', '--links', '--codecs', '--steps']);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const name = a.includes('=') ? a.slice(0, a.indexOf('=')) : a;
    if (!known.has(name)) throw new WanUsageError(`bench/wan.ts: unknown argument "${a}" (usage: [--quick] [--stages 2,4] [--links ${LINKS.map((l) => l.name).join(',')}] [--codecs ${WAN_CODECS.join(',')}] [--steps N])`);
    if (name !== '--quick' && !a.includes('=')) i++;
  }
  const list = (s: string | undefined): string[] | undefined => s?.split(',').map((x) => x.trim()).filter((x) => x !== '');
  const stages = (list(get('--stages')) ?? (quick ? ['2'] : ['2', '4'])).map((s) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1 || n > 8) throw new WanUsageError(`--stages: "${s}" is not a stage count in [1, 8]`);
    return n;
  });
  const links = (list(get('--links')) ?? (quick ? ['loopback', '100/50'] : LINKS.map((l) => l.name))).map((s) => {
    const l = LINKS.find((x) => x.name === s);
    if (l !== undefined) return l;
    const m = /^(\d+(?:\.\d+)?)\/(\d+(?:\.\d+)?)$/.exec(s);
    if (m === null) throw new WanUsageError(`--links: "${s}" is neither loopback nor RATE_MBIT/RTT_MS`);
    return { name: s, rateMbit: Number(m[1]), rttMs: Number(m[2]) };
  });
  const codecs = list(get('--codecs')) ?? (quick ? ['f32', 'int8'] : ['f32', 'bf16', 'int8', 'int4', 'lowrank8']);
  for (const c of codecs) if (!(WAN_CODECS as readonly string[]).includes(c)) throw new WanUsageError(`--codecs: unknown wire codec "${c}" (known: ${WAN_CODECS.join(', ')})`);
  const stepsArg = get('--steps');
  const steps = stepsArg === undefined ? (quick ? 2 : 3) : Number(stepsArg);
  if (!Number.isInteger(steps) || steps < 2) throw new WanUsageError(`--steps: "${stepsArg}" must be an integer ≥ 2 (the first step is not measured)`);
  if (!links.some((l) => l.rateMbit === null)) links.unshift(LINKS[0]!);   // every ratio needs its loopback run
  quick &&= true;
  return {
    quick, stages, links, codecs, steps,
    // the setting: 2 micro-batches of 4 × 256 tokens per step (quick: 2 × 1 × 128)
    microBatch: quick ? 1 : 4, accumulation: 2, seqLen: quick ? 128 : 256,
    runTimeoutMs: quick ? 120_000 : 600_000,
  };
}

/** A child process's JSON stdout events and its stderr lines (the coordinator's request log). */
interface Watched { child: ChildProcess; events: Array<Record<string, unknown> & { tMs: number }>; stderr: string[]; exit: Promise<number> }

function watch(child: ChildProcess): Watched {
  const w: Watched = { child, events: [], stderr: [], exit: new Promise((r) => child.on('exit', (code, sig) => r(code ?? (sig !== null ? 128 : 1)))) };
  const lines = (stream: NodeJS.ReadableStream, each: (line: string) => void): void => {
    let buf = '';
    stream.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) { each(buf.slice(0, i)); buf = buf.slice(i + 1); }
    });
  };
  lines(child.stdout!, (line) => {
    try { const e = JSON.parse(line); if (e !== null && typeof e === 'object') w.events.push({ ...e, tMs: performance.now() }); } catch { /* not JSON */ }
  });
  lines(child.stderr!, (line) => { w.stderr.push(line); });
  return w;
}

async function waitFor(w: Watched, pred: (e: Record<string, unknown>) => boolean, what: string, timeoutMs: number): Promise<Record<string, unknown> & { tMs: number }> {
  const t0 = Date.now();
  for (;;) {
    const e = w.events.find(pred);
    if (e !== undefined) return e;
    if (w.child.exitCode !== null || w.child.signalCode !== null) throw new Error(`exited (${w.child.exitCode ?? w.child.signalCode}) before ${what}: ${w.stderr.filter((l) => !/ swarmtune:coordinator/.test(l)).slice(-12).join(' | ')}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`no ${what} within ${timeoutMs} ms: ${w.stderr.slice(-6).join(' | ')}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** One request line of the coordinator's log: `<ISO> <namespace> <proto> -> <peer> <keys>: <outcome> (<ms> ms)`. */
export interface RequestLine { proto: string; step: number | null; phase: string | null; startMs: number; endMs: number }

export function parseRequestLines(lines: readonly string[]): RequestLine[] {
  const out: RequestLine[] = [];
  const re = /^(\S+) swarmtune:coordinator\S* (\w+) -> \S+ ([^:]*): .* \((\d+) ms\)$/;
  for (const line of lines) {
    const m = re.exec(line);
    if (m === null) continue;
    const end = Date.parse(m[1]!);
    if (!Number.isFinite(end)) continue;
    const keys = m[3]!;
    const step = /(?:^| )step=(\d+)/.exec(keys);
    const phase = /(?:^| )phase=(\S+)/.exec(keys);
    out.push({ proto: m[2]!, step: step ? Number(step[1]) : null, phase: phase ? phase[1]! : null, startMs: end - Number(m[4]), endMs: end });
  }
  return out;
}

/** The tail of a step: everything after its micro-batches (aggregate = collect and apply, adapter upload, optimizer state). */
const TAIL_PROTOS = new Set(['aggregate', 'adapter', 'optimizer']);

/** Per step (0-based as the micro-batch requests name it): micro-batch phase and tail in seconds, from the
 *  request log. The phase runs from the step's first micro-batch request to its first gradient collect; the
 *  tail from there to the end of the last tail request (aggregate, adapter upload, optimizer state: these
 *  do not all name the step) that starts before the next step's first micro-batch. */
export function stepBreakdown(reqs: readonly RequestLine[]): Map<number, { mbS: number; tailS: number }> {
  const mbStart = new Map<number, number>(), tailStart = new Map<number, number>();
  for (const r of reqs) {
    if (r.step === null) continue;
    if (r.proto === 'microbatch') mbStart.set(r.step, Math.min(mbStart.get(r.step) ?? Infinity, r.startMs));
    if (r.proto === 'aggregate') tailStart.set(r.step, Math.min(tailStart.get(r.step) ?? Infinity, r.startMs));
  }
  const out = new Map<number, { mbS: number; tailS: number }>();
  for (const [step, t0] of mbStart) {
    const t1 = tailStart.get(step);
    if (t1 === undefined) continue;
    const next = mbStart.get(step + 1) ?? Infinity;
    const tail = reqs.filter((r) => TAIL_PROTOS.has(r.proto) && r.startMs >= t1 && r.startMs < next);
    const t2 = Math.max(...tail.map((r) => r.endMs));
    out.set(step, { mbS: (t1 - t0) / 1000, tailS: (t2 - t1) / 1000 });
  }
  return out;
}

/** Bytes every host has sent on its access line (its interface's tx counter, L2 frames). */
function txBytes(lab: Lab, hosts: string[]): number {
  let sum = 0;
  for (const h of hosts) {
    const out = shSync(['ip', '-n', lab.ns(h), '-s', '-j', 'link', 'show'], { timeoutMs: 5000 });
    if (out === null) throw new Error(`bench/wan: cannot read the interface counters of ${h}`);
    for (const l of JSON.parse(out) as Array<{ ifname: string; stats64?: { tx: { bytes: number } } }>) if (l.ifname !== 'lo') sum += l.stats64?.tx.bytes ?? 0;
  }
  return sum;
}

function trainFlags(o: WanOptions, modelDir: string, dataFile: string): string[] {
  return [
    '--model', modelDir, '--data', dataFile, '--max-steps', String(o.steps),
    '--per-device-train-batch-size', String(o.microBatch), '--gradient-accumulation-steps', String(o.accumulation),
    '--max-seq-length', String(o.seqLen), '--lora-r', '16', '--lora-alpha', '16', '--target-modules', 'all-linear',
    '--lora-dropout', '0', '--no-shuffle', '--learning-rate', '1e-4', '--seed', '3', '--json',
  ];
}

function killTree(w: Watched): void {
  if (w.child.exitCode === null && w.child.signalCode === null) { try { w.child.kill('SIGKILL'); } catch { /* gone */ } }
}

async function oneRun(o: WanOptions, stages: number, link: LinkSetting, codec: string, files: { modelDir: string; dataFile: string }, useLab: boolean): Promise<Omit<WanRun, 'vs_loopback'>> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-wan-'));
  const hosts = ['coord', ...Array.from({ length: stages }, (_, i) => `v${i}`)];
  const shape = link.rateMbit === null ? {} : { rateMbit: link.rateMbit, delayMs: link.rttMs / 4 };
  const lab = useLab ? await createLab(starSpec(Object.fromEntries(hosts.map((h) => [h, shape])))) : null;
  const procs: Watched[] = [];
  const env = { ...process.env, DEBUG: 'swarmtune:coordinator*' };
  const start = (host: string, args: string[]): Watched => {
    const child = lab !== null ? lab.spawn(host, NODE, [CLI, ...args], { cwd: ROOT, env }) : spawn(NODE, [CLI, ...args], { cwd: ROOT, env, stdio: 'pipe' });
    const w = watch(child);
    procs.push(w);
    return w;
  };
  try {
    const ip = (h: string): string => (lab !== null ? lab.addr(h) : '127.0.0.1');
    const t0 = performance.now();
    const coord = start('coord', ['launch', ...trainFlags(o, files.modelDir, files.dataFile), '--output-dir', path.join(tmp, 'out'),
      '--listen', `/ip4/${ip('coord')}/tcp/0`, '--min-peers', String(stages), '--pipeline-stages', String(stages), '--wire-dtype', codec, '--exit-on-finish']);
    const listening = await waitFor(coord, (e) => e.event === 'listening', 'listening', 60_000);
    const vols = hosts.slice(1).map((h, i) => start(h, ['join', String(listening.multiaddr), '--device', 'cpu', '--json', '--listen', `/ip4/${ip(h)}/tcp/0`, '--data-dir', path.join(tmp, `v${i}`)]));
    const training = await waitFor(coord, (e) => e.event === 'training', 'training', o.runTimeoutMs);
    // tx counters at each step event, as the parent sees it (the poll adds ≤ 20 ms)
    const tx: number[] = [];
    for (let s = 1; s <= o.steps; s++) {
      await waitFor(coord, (e) => e.event === 'step' && Number(e.step) === s, `step ${s}`, o.runTimeoutMs);
      if (lab !== null) tx.push(txBytes(lab, hosts));
    }
    await waitFor(coord, (e) => e.event === 'finished', 'finished', 120_000);
    const code = await coord.exit;
    if (code !== 0) throw new Error(`swarmtune launch exited ${code}: ${coord.stderr.slice(-6).join(' | ')}`);
    for (const [i, v] of vols.entries()) {
      const t = setTimeout(() => killTree(v), 30_000);
      const c = await v.exit;
      clearTimeout(t);
      if (c !== 0) throw new Error(`volunteer ${i} exited ${c}: ${v.stderr.slice(-6).join(' | ')}`);
    }
    const steps = coord.events.filter((e) => e.event === 'step');
    const tps = steps.map((e) => Number(e.tokens_per_s));
    const tokensPerStep = o.microBatch * o.accumulation * o.seqLen;
    const parts = stepBreakdown(parseRequestLines(coord.stderr));
    const measured = [...parts.entries()].filter(([s]) => s >= 1).map(([, p]) => p);   // steps after the first
    const mbS = measured.length ? median(measured.map((p) => p.mbS)) : NaN, tailS = measured.length ? median(measured.map((p) => p.tailS)) : NaN;
    return {
      stages, link: link.name, rate_mbit: link.rateMbit, rtt_ms: link.rttMs, codec,
      tokens_per_s: Number(median(tps.slice(1)).toFixed(1)), tokens_per_s_all: tps.map((x) => Number(x.toFixed(1))),
      bytes_per_token_on_wire: lab !== null && tx.length >= 2 ? Math.round((tx.at(-1)! - tx[0]!) / ((tx.length - 1) * tokensPerStep)) : null,
      final_loss: Number(Number(steps.at(-1)?.loss).toFixed(4)),
      step_s: Number.isFinite(mbS) ? r3(mbS + tailS) : null, micro_batch_phase_s: Number.isFinite(mbS) ? r3(mbS) : null,
      step_tail_s: Number.isFinite(tailS) ? r3(tailS) : null, tail_share: Number.isFinite(tailS) ? r3(tailS / (mbS + tailS)) : null,
      startup_s: Number(((training.tMs - t0) / 1000).toFixed(1)), where: lab !== null ? 'netlab' : '127.0.0.1',
    };
  } finally {
    for (const w of procs) killTree(w);
    if (lab !== null) await lab.teardown();
    await rm(tmp, { recursive: true, force: true });
  }
}

export async function benchWan(o: WanOptions): Promise<Record<string, unknown>> {
  const log = o.log ?? (() => {});
  const why = labSupport({ delay: true });
  const dir = path.join(os.tmpdir(), 'swarmtune-bench-fixtures');
  const files = { modelDir: await ensureBenchModelDir(path.join(dir, 'model')), dataFile: await writeLongTextData(path.join(dir, 'long.jsonl')) };
  const links = why === null ? o.links : o.links.filter((l) => l.rateMbit === null);
  const runs: WanRun[] = [];
  const failed: Record<string, unknown>[] = [];
  for (const stages of o.stages) {
    for (const link of links) {
      for (const codec of o.codecs) {
        log(`wan: ${stages} stages, ${link.name}, --wire-dtype ${codec}`);
        try {
          const r = await oneRun(o, stages, link, codec, files, why === null);
          log(`wan: ${stages} stages, ${link.name}, ${codec}: ${r.tokens_per_s} tok/s, ${r.bytes_per_token_on_wire ?? '-'} B/token, step ${r.step_s} s (tail ${r.step_tail_s} s), loss ${r.final_loss}`);
          runs.push({ ...r, vs_loopback: null });
          o.onRun?.(r);
        } catch (e) {
          log(`wan: ${stages} stages, ${link.name}, ${codec} failed: ${(e as Error).message.slice(0, 600)}`);
          failed.push({ stages, link: link.name, codec, error: (e as Error).message.slice(0, 1500) });
        }
      }
    }
  }
  for (const r of runs) {
    const base = runs.find((b) => b.stages === r.stages && b.codec === r.codec && b.rate_mbit === null);
    r.vs_loopback = base !== undefined ? r3(r.tokens_per_s / base.tokens_per_s) : null;
  }
  return {
    how: 'bench model through `swarmtune launch` + one `swarmtune join` per stage (1 replica), each a real process in its own netlab namespace on a star of access lines (each line: the rate both ways, RTT/4 one way, so host-to-host RTT = the link RTT); tokens/s: median of the steps after the first as the coordinator reports them; bytes on the wire: every host\'s interface tx bytes (L2 frames) between the first and last step event per token of those steps; micro-batch phase vs step tail: from the coordinator\'s request log',
    netlab: why ?? 'ok', matrix: { stages: o.stages, links: links.map((l) => l.name), codecs: o.codecs }, settings: { steps: o.steps, micro_batch: o.microBatch, accumulation: o.accumulation, seq_len: o.seqLen, tokens_per_step: o.microBatch * o.accumulation * o.seqLen },
    runs, failed,
  };
}

if (import.meta.main) {
  let opts: ReturnType<typeof parseWanArgs>;
  try {
    opts = parseWanArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n`);
    process.exit(2);
  }
  const r = await benchWan({ ...opts, log: (s) => process.stderr.write(`[bench] ${s}\n`), onRun: (x) => process.stdout.write(JSON.stringify({ wan_run: x }) + '\n') });
  console.log(JSON.stringify({ wan: r }));
}
