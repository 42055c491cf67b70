// `npm run bench`: every benchmark, one JSON object on stdout (progress on stderr), also written to
// bench/results/latest.json. Render docs/benchmarks.md from it with `node bench/report.ts --write`.
//
//   node bench/run.ts [--only kernels,memory,model,swarm,net,store,convergence,blobs,packing,verify,scale,wan] [--quick] [--out FILE]
//
// Sections: machine (always), kernels, memory (a loaded stage's NF4 bytes per parameter and RSS against plan),
// model (+ the PyTorch baseline), swarm (+ the store's disk per step), net, store (the cost of a synced step
// commit), convergence (eval loss per wire codec, bench/convergence.ts), blobs (a joiner's time to a verified
// blob from 1, 4 and 8 rate-limited providers, bench/blob-fetch.ts), packing (tokens/s and padding with
// and without TRL packing on mixed lengths, bench/packing.ts), verify (the cost and detection of spot
// checks, bench/verify.ts), wan (only with --only: the swarm over emulated links in network namespaces,
// bench/wan.ts, the round trips of a 2 MiB request, bench/wan-rpc.ts, and what an opened-ahead hop saves, bench/wan-hop.ts; root, ~20 minutes), scale (the simulator's scenarios, bench/scale.ts). Heavy parts run in
// child processes (the model bench for its own peak RSS, the swarm trace per wire codec, the CLI runs).
// Other processes on the machine lower every figure: the load average is recorded before and after
// each section.
import { mkdir, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { defaultThreadCount } from '../engine/backends/native.ts';
import { benchKernels } from './kernels.ts';
import { benchMemory } from './memory.ts';
import { benchMachine } from './machine.ts';
import { benchNet } from './net.ts';
import { benchBlobSection } from './blob-fetch.ts';
import { benchCommitCost } from './commit-cost.ts';
import { benchSwarmCli } from './swarm-cli.ts';
import { benchVerify } from './verify.ts';
import { ensureBenchModelDir, writeLongTextData } from './fixtures.ts';
import { NODE, ROOT, runJsonScript } from './procs.ts';
import { benchScale } from './scale.ts';

const SECTIONS = ['kernels', 'memory', 'model', 'swarm', 'net', 'store', 'convergence', 'blobs', 'packing', 'verify', 'scale', 'wan'] as const;
/** Sections a plain `npm run bench` runs (wan needs root for its namespaces and ~20 minutes: ask for it with --only wan) */
const DEFAULT_SECTIONS: readonly Section[] = SECTIONS.filter((s) => s !== 'wan');
type Section = typeof SECTIONS[number];

export class BenchUsageError extends Error {
  override name = 'BenchUsageError';
}

export interface BenchArgs { only: Section[]; quick: boolean; out: string }

export function parseArgs(argv: string[]): BenchArgs {
  let only: Section[] = [...DEFAULT_SECTIONS];
  let quick = false;
  let out = path.join(ROOT, 'bench', 'results', 'latest.json');
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const value = (): string => {
      const eq = a.indexOf('=');
      if (eq >= 0) return a.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) throw new BenchUsageError(`${a} needs a value`);
      return v;
    };
    if (a === '--quick') quick = true;
    else if (a === '--only' || a.startsWith('--only=')) {
      const names = value().split(',').map((x) => x.trim()).filter((x) => x !== '');
      for (const n of names) if (!(SECTIONS as readonly string[]).includes(n)) throw new BenchUsageError(`--only: unknown section "${n}" (known: ${SECTIONS.join(', ')})`);
      if (names.length === 0) throw new BenchUsageError('--only needs at least one section');
      only = names as Section[];
    } else if (a === '--out' || a.startsWith('--out=')) out = path.resolve(value());
    else throw new BenchUsageError(`unknown argument "${a}" (usage: node bench/run.ts [--only ${SECTIONS.join(',')}] [--quick] [--out FILE])`);
  }
  return { only, quick, out };
}

const load = () => os.loadavg().map((x) => Number(x.toFixed(2)));
const log = (s: string) => process.stderr.write(`[bench] ${s}\n`);
const TORCH_PYTHON = '/usr/bin/python3';

async function section<T extends Record<string, unknown>>(name: string, fn: () => Promise<T>): Promise<T & { loadavg_before: number[]; loadavg_after: number[]; seconds: number }> {
  const before = load();
  const t0 = performance.now();
  log(`${name}: start (load average ${before.join(' ')})`);
  const r = await fn();
  const seconds = Number(((performance.now() - t0) / 1000).toFixed(1));
  log(`${name}: done in ${seconds} s`);
  return { ...r, loadavg_before: before, loadavg_after: load(), seconds };
}

async function torchBaseline(): Promise<Record<string, unknown>> {
  if (!existsSync(TORCH_PYTHON)) return { available: false, reason: `${TORCH_PYTHON} not found` };
  try {
    const r = await runJsonScript(TORCH_PYTHON, [path.join(ROOT, 'bench', 'torch_baseline.py'), '2'], 'bench/torch_baseline.py', 180_000);
    return { available: true, python: TORCH_PYTHON, ...r };
  } catch (e) {
    const msg = (e as Error).message;
    return { available: false, reason: /No module named 'torch'/.test(msg) ? `${TORCH_PYTHON} has no torch module` : msg.slice(0, 500) };
  }
}

export async function runBench(args: BenchArgs): Promise<Record<string, unknown>> {
  const t0 = performance.now();
  const threads = defaultThreadCount();
  const result: Record<string, unknown> = {
    schema: 'swarmtune-bench/1', date: new Date().toISOString(), quick: args.quick, sections: args.only,
    loadavg_start: load(),
    note: 'other processes on the machine lower every figure; compare figures with the FMA peak and memcpy bandwidth measured in the same run, and see the load averages',
  };
  const machine = await benchMachine(threads);
  result.machine = machine;
  if (args.only.includes('kernels')) {
    const k = await section('kernels', async () => await benchKernels({ threads }) as Record<string, unknown>);
    Object.assign(machine, {
      fma_peak_gflops_1thread: k.fma_peak_gflops_1thread, fma_peak_gflops_all_threads: k.fma_peak_gflops_all_threads,
      fma_peak_gflops_ceiling: k.fma_peak_gflops_ceiling,
    });
    const peak = Number(k.fma_peak_gflops_ceiling);
    const gemm = (k.gemm as Array<Record<string, unknown>>).map((g) => {
      const ratios: Record<string, number> = {};
      for (const [key, v] of Object.entries(g)) if (key.startsWith('gflops')) ratios[key.replace('gflops', 'of_peak')] = Number((Number(v) / peak).toFixed(3));
      return { ...g, ...ratios };
    });
    const dq = k.nf4_dequant as Record<string, number>;
    // the bandwidth ceiling: the better of the 1-thread and all-thread memcpy (a loaded machine lowers either)
    const bw = Math.max(Number(machine.memcpy_GBps_1thread), Number(machine.memcpy_GBps_all_threads));
    result.kernels = {
      ...k, gemm,
      nf4_dequant: { ...dq, bytes_moved_GBps: Number((dq.gbps_f32_out! + dq.gbps_packed_in!).toFixed(2)), of_memcpy_bandwidth: Number(((dq.gbps_f32_out! + dq.gbps_packed_in!) / bw).toFixed(3)) },
    };
  }
  if (args.only.includes('memory')) {
    result.memory = await section('memory', () => benchMemory({ quick: args.quick, log: (s) => log(s) }));
  }
  if (args.only.includes('model')) {
    result.model = await section('model', async () => {
      const ours = await runJsonScript(NODE, [path.join(ROOT, 'bench', 'model.ts'), `--steps=${args.quick ? 2 : 5}`, '--warmup=1'], 'bench/model.ts');
      log('model: PyTorch baseline (bench/torch_baseline.py, 2 threads)');
      const torch = await torchBaseline();
      // medians on both sides (ours: of the measured steps; PyTorch: of its 3 timed steps)
      const ratio = torch.available === true ? Number((Number(ours.tokens_per_s) / Number(torch.tokens_per_s_median ?? torch.tokens_per_s)).toFixed(3)) : null;
      return { ours, torch, ratio_ours_over_torch: ratio };
    });
  }
  if (args.only.includes('swarm')) {
    result.swarm = await section('swarm', async () => {
      const dir = path.join(os.tmpdir(), 'swarmtune-bench-fixtures');
      log('swarm: bench model dir and data (cached in ' + dir + ')');
      const modelDir = await ensureBenchModelDir(path.join(dir, 'model'));
      const dataFile = await writeLongTextData(path.join(dir, 'long.jsonl'));
      const cli = await benchSwarmCli({
        modelDir, dataFile, steps: args.quick ? 2 : 3, microBatch: 4, accumulation: 2, seqLen: 256, stages: 2, replicas: 1,
        codecs: args.quick ? ['f32'] : ['f32', 'bf16', 'int8'], log: (s) => log(s),
      });
      const trace: Record<string, unknown>[] = [];
      for (const codec of args.quick ? ['f32', 'int8'] : ['f32', 'bf16', 'int8']) {
        log(`swarm/trace: in-process instrumented run, --wire-dtype ${codec}`);
        const run = () => runJsonScript(NODE, [path.join(ROOT, 'bench', 'swarm-trace.ts'), `--codec=${codec}`, ...(args.quick ? ['--quick'] : [])], `bench/swarm-trace.ts --codec=${codec}`);
        // one retry on failure, recorded: a failed run on a loaded machine should not void the whole bench
        try {
          trace.push(await run());
        } catch (e) {
          const first = (e as Error).message.slice(-600);
          log(`swarm/trace ${codec} failed, retrying once: ${first}`);
          try { trace.push({ ...(await run()), retried_after: first }); } catch (e2) { trace.push({ wire_dtype: codec, error: (e2 as Error).message.slice(-1500) }); }
        }
      }
      log('swarm/store: the coordinator store\'s bytes on disk per committed step, without and with save_total_limit (bench/store-cost.ts)');
      const store = await runJsonScript(NODE, [path.join(ROOT, 'bench', 'store-cost.ts'), `--steps=${args.quick ? 20 : 40}`, ...(args.quick ? ['--adapter-mib=1'] : [])], 'bench/store-cost.ts');
      // bytes per peer (coordinator vs volunteers), each in its own process, counted on its sockets
      const bytes: Record<string, unknown>[] = [];
      for (const codec of args.quick ? ['f32'] : ['f32', 'int8']) {
        log(`swarm/bytes: coordinator and volunteer bytes per step, --wire-dtype ${codec}`);
        try {
          bytes.push(await runJsonScript(NODE, [path.join(ROOT, 'bench', 'swarm-bytes.ts'), `--codec=${codec}`, ...(args.quick ? ['--quick'] : [])], `bench/swarm-bytes.ts --codec=${codec}`));
        } catch (e) {
          bytes.push({ wire_dtype: codec, error: (e as Error).message.slice(-1500) });
        }
      }
      return { cli, trace, store: store.store_cost, bytes };
    });
  }
  if (args.only.includes('net')) {
    result.net = await section('net', () => benchNet({ bytes: (args.quick ? 32 : 128) * 1024 * 1024, reps: args.quick ? 2 : 3, log: (s) => log(s) }));
  }
  if (args.only.includes('blobs')) {
    result.blobs = await section('blobs', () => benchBlobSection(args.quick, (s) => log(s)));
  }
  if (args.only.includes('store')) {
    result.store = await section('store', () => benchCommitCost({ reps: args.quick ? 5 : 20 }));
  }
  if (args.only.includes('convergence')) {
    result.convergence = await section('convergence', () => runJsonScript(NODE, [path.join(ROOT, 'bench', 'convergence.ts'), ...(args.quick ? ['--quick'] : [])], 'bench/convergence.ts', 3_600_000));
  }
  if (args.only.includes('packing')) {
    result.packing = await section('packing', () => runJsonScript(NODE, [path.join(ROOT, 'bench', 'packing.ts'), ...(args.quick ? ['--quick'] : [])], 'bench/packing.ts', 1_800_000));
  }
  if (args.only.includes('verify')) {
    // spot checks: tokens/s at --verify-fraction 0, 0.05, 1 and detection of a scale:1.02 cheater (docs/security.md)
    result.verify = await section('verify', () => benchVerify({ quick: args.quick, log: (s) => log(s) }));
  }
  if (args.only.includes('wan')) {
    result.wan = await section('wan', async () => {
      const wan = await runJsonScript(NODE, [path.join(ROOT, 'bench', 'wan.ts'), ...(args.quick ? ['--quick'] : [])], 'bench/wan.ts', 3_600_000);
      log('wan/rpc: round trips of a 2 MiB response at 100 Mbit/s, 50 ms RTT, yamux windows of protocol/net.ts (256 KiB) and 4 MiB');
      const rpc = await runJsonScript(NODE, [path.join(ROOT, 'bench', 'wan-rpc.ts'), `--reps=${args.quick ? 2 : 5}`], 'bench/wan-rpc.ts', 600_000);
      log('wan/hop: one activation hop at 100 Mbit/s, 50 ms RTT, sent as its tensor is ready and opened ahead (protocol/hop.ts openHop)');
      const hop = await runJsonScript(NODE, [path.join(ROOT, 'bench', 'wan-hop.ts'), `--reps=${args.quick ? 2 : 5}`], 'bench/wan-hop.ts', 600_000);
      return { ...(wan.wan as Record<string, unknown>), rpc, hop };
    });
  }
  if (args.only.includes('scale')) {
    result.scale = await section('scale', () => benchScale({ quick: args.quick, log: (s) => log(s) }));
  }
  result.loadavg_end = load();
  result.total_seconds = Number(((performance.now() - t0) / 1000).toFixed(1));
  return result;
}

if (import.meta.main) {
  let args: BenchArgs;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n`);
    process.exit(2);
  }
  const r = await runBench(args);
  const text = JSON.stringify(r, null, 2) + '\n';
  await mkdir(path.dirname(args.out), { recursive: true });
  await writeFile(args.out, text);
  log(`wrote ${path.relative(process.cwd(), args.out)}`);
  process.stdout.write(text);
}
