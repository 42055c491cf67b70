// Swarm against one machine, as users run them: `swarmtune train` and `swarmtune launch` + `swarmtune join`
// volunteers, each a real process on 127.0.0.1, on the same model dir, data and training flags.
// tokens/s of a step = input tokens of the step / wall time of the step, as both commands report it
// (the coordinator measures from the start of its step to the commit of the adapter in LevelDB).
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { startCli, waitEvent, kill } from './procs.ts';
import type { Proc } from './procs.ts';
import { ensureBenchModelDir, writeLongTextData } from './fixtures.ts';

export interface CliSwarmOptions {
  modelDir: string;
  dataFile: string;
  steps: number;
  microBatch: number;
  accumulation: number;
  seqLen: number;
  stages: number;
  replicas: number;
  codecs: Array<'f32' | 'bf16' | 'int8'>;
  log?: (s: string) => void;
}

const median = (xs: number[]) => { if (xs.length === 0) return NaN; const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };
const r1 = (x: number) => Number(x.toFixed(1));

function trainFlags(o: CliSwarmOptions): string[] {
  return [
    '--model', o.modelDir, '--data', o.dataFile, '--max-steps', String(o.steps),
    '--per-device-train-batch-size', String(o.microBatch), '--gradient-accumulation-steps', String(o.accumulation),
    '--max-seq-length', String(o.seqLen), '--lora-r', '16', '--lora-alpha', '16', '--target-modules', 'all-linear',
    '--lora-dropout', '0', '--no-shuffle', '--learning-rate', '1e-4', '--seed', '3', '--json',
  ];
}

/** tokens/s of the steps after the first (the first includes thread-pool and allocator warm-up) */
function stepFigures(events: Array<Record<string, unknown> & { tMs: number }>): { steps: number; tokens_per_s_median: number; tokens_per_s_all: number[]; loss_last: number } {
  const steps = events.filter((e) => e.event === 'step');
  const tps = steps.map((e) => Number(e.tokens_per_s));
  const measured = tps.length > 1 ? tps.slice(1) : tps;
  return { steps: steps.length, tokens_per_s_median: r1(median(measured)), tokens_per_s_all: tps.map(r1), loss_last: Number(Number(steps.at(-1)?.loss).toFixed(4)) };
}

async function finish(p: Proc, what: string, timeoutMs = 300_000): Promise<void> {
  const t = setTimeout(() => kill(p), timeoutMs);
  const code = await p.exit;
  clearTimeout(t);
  if (code !== 0) throw new Error(`${what} exited ${code}: ${p.stderr.join('').slice(-2000)}`);
}

export async function benchSwarmCli(o: CliSwarmOptions): Promise<Record<string, unknown>> {
  const log = o.log ?? (() => {});
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-cli-'));
  try {
    log(`swarm/cli: swarmtune train (${o.steps} steps of ${o.accumulation} x ${o.microBatch} x ${o.seqLen} tokens)`);
    const t0 = performance.now();
    const train = startCli(['train', ...trainFlags(o), '--output-dir', path.join(tmp, 'train'), '--device', 'cpu']);
    await finish(train, 'swarmtune train');
    const trainWall = performance.now() - t0;
    const local = { ...stepFigures(train.events), wall_s: r1(trainWall / 1000) };

    const swarms: Record<string, unknown>[] = [];
    for (const codec of o.codecs) {
      log(`swarm/cli: launch + ${o.stages * o.replicas} join processes, ${o.stages} stages x ${o.replicas} replicas, --wire-dtype ${codec}`);
      const t1 = performance.now();
      const dir = path.join(tmp, `swarm-${codec}`);
      const coord = startCli(['launch', ...trainFlags(o), '--output-dir', dir, '--listen', '/ip4/127.0.0.1/tcp/0',
        '--min-peers', String(o.stages * o.replicas), '--pipeline-stages', String(o.stages), '--wire-dtype', codec, '--exit-on-finish']);
      const listening = await waitEvent(coord, (e) => e.event === 'listening', 'listening');
      const vols = Array.from({ length: o.stages * o.replicas }, (_, i) => startCli(['join', String(listening.multiaddr), '--device', 'cpu', '--json',
        '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(tmp, `v-${codec}-${i}`)]));
      const training = await waitEvent(coord, (e) => e.event === 'training', 'training');
      await waitEvent(coord, (e) => e.event === 'finished', 'finished', 600_000);
      await finish(coord, 'swarmtune launch');
      for (const [i, v] of vols.entries()) await finish(v, `volunteer ${i}`, 30_000);
      swarms.push({
        wire_dtype: codec, ...stepFigures(coord.events),
        startup_s: r1((training.tMs - t1) / 1000), wall_s: r1((performance.now() - t1) / 1000),
        ratio_to_train: 0,
      });
    }
    for (const s of swarms) s.ratio_to_train = Number((Number(s.tokens_per_s_median) / local.tokens_per_s_median).toFixed(3));
    return {
      how: 'real processes on 127.0.0.1: `swarmtune train` alone, then `swarmtune launch` + one `swarmtune join` per peer (all --device cpu, each with the default native thread count), same model dir, data and flags; tokens/s = step input tokens / step wall time as each command reports it, median of the steps after the first',
      settings: { steps: o.steps, micro_batch: o.microBatch, accumulation: o.accumulation, seq_len: o.seqLen, stages: o.stages, replicas: o.replicas, tokens_per_step: o.microBatch * o.accumulation * o.seqLen },
      train: local,
      swarm: swarms,
    };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const dir = path.join(os.tmpdir(), 'swarmtune-bench-fixtures');
  const modelDir = await ensureBenchModelDir(path.join(dir, 'model'));
  const dataFile = await writeLongTextData(path.join(dir, 'long.jsonl'));
  const quick = process.argv.includes('--quick');
  const r = await benchSwarmCli({
    modelDir, dataFile, steps: quick ? 2 : 3, microBatch: 4, accumulation: 2, seqLen: 256, stages: 2, replicas: 1,
    codecs: quick ? ['f32'] : ['f32'], log: (s) => process.stderr.write(s + '\n'),
  });
  console.log(JSON.stringify(r));
}
