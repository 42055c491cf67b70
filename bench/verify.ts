// Spot-check verification, measured with real processes on 127.0.0.1 (docs/security.md): the cost of
// --verify-fraction in swarm tokens/s (honest swarm, 2 stages x 2 replicas, the embedded tiny model),
// and with one volunteer of four scaling its outputs by 1.02, the steps and micro-batches until it is
// banned over seeded runs at a low fraction, against the prediction P(undetected after n) = (1-f)^n.
// The checked micro-batches follow the coordinator's secret (random per launch), not the seed: the
// seed fixes the data order, so the runs differ in where their checks fall.
//   node bench/verify.ts [--quick]    → one JSON object on stdout
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { CLI, NODE, kill, startProc, waitEvent } from './procs.ts';
import type { Proc } from './procs.ts';

const median = (xs: number[]) => { if (xs.length === 0) return NaN; const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };
const r3 = (x: number) => Number(x.toFixed(3));

function flags(steps: number, seed: number): string[] {
  return [
    '--max-steps', String(steps), '--per-device-train-batch-size', '2', '--gradient-accumulation-steps', '4',
    '--learning-rate', '1e-3', '--no-shuffle', '--lora-dropout', '0', '--max-seq-length', '64',
    '--lora-r', '4', '--lora-alpha', '8', '--target-modules', 'q_proj,v_proj,down_proj', '--seed', String(seed),
  ];
}

interface SwarmRun { steps: Array<Record<string, unknown>>; bans: Array<Record<string, unknown>>; events: Array<Record<string, unknown>>; cheaterId: string | null }

async function swarm(tmp: string, modelDir: string, name: string, o: { steps: number; seed: number; fraction: number; cheat: string | null }): Promise<SwarmRun> {
  const dir = path.join(tmp, name);
  const coord = startProc(NODE, [CLI, 'launch', '--model', modelDir, '--data', TINY_DATASET_PATH, ...flags(o.steps, o.seed), '--verify-fraction', String(o.fraction),
    '--listen', '/ip4/127.0.0.1/tcp/0', '--min-peers', '4', '--pipeline-stages', '2', '--wire-dtype', 'f32', '--json', '--exit-on-finish', '--output-dir', dir]);
  const vols: Proc[] = [];
  try {
    const addr = String((await waitEvent(coord, (e) => e.event === 'listening', 'listening')).multiaddr);
    for (let i = 0; i < 4; i++) {
      const env = i === 3 && o.cheat !== null ? { ...process.env, SWARMTUNE_TEST_BAD_OUTPUT: o.cheat } : process.env;
      vols.push(startProc(NODE, [CLI, 'join', addr, '--device', 'cpu', '--json', '--listen', '/ip4/127.0.0.1/tcp/0', '--data-dir', path.join(dir, `v${i}`)], { env }));
    }
    const cheaterId = o.cheat !== null ? String((await waitEvent(vols[3]!, (e) => e.event === 'joining', 'joining')).peer_id) : null;
    await waitEvent(coord, (e) => e.event === 'finished', 'finished', 900_000);
    return { steps: coord.events.filter((e) => e.event === 'step'), bans: coord.events.filter((e) => e.event === 'peer_banned'), events: coord.events, cheaterId };
  } finally {
    for (const v of vols) kill(v);
    kill(coord);
  }
}

export async function benchVerify(o: { quick: boolean; log?: (s: string) => void }): Promise<Record<string, unknown>> {
  const log = o.log ?? (() => {});
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-bench-verify-'));
  try {
    const modelDir = await ensureTinyModel(path.join(tmp, 'model'));
    // cost: the same honest swarm at three fractions
    const costSteps = o.quick ? 4 : 8;
    const skipCost = process.argv.includes('--detection-only');
    const cost: Array<Record<string, unknown>> = [];
    for (const fraction of skipCost ? [] : [0, 0.05, 1]) {
      log(`verify: honest swarm, --verify-fraction ${fraction}, ${costSteps} steps`);
      const r = await swarm(tmp, modelDir, `cost-${fraction}`, { steps: costSteps, seed: 7, fraction, cheat: null });
      const tps = r.steps.slice(1).map((e) => Number(e.tokens_per_s));
      cost.push({ verify_fraction: fraction, tokens_per_s_median: Number(median(tps).toFixed(1)), bans: r.bans.length });
    }
    const base = Number(cost[0]?.tokens_per_s_median);
    for (const c of cost) c.ratio_to_unverified = r3(Number(c.tokens_per_s_median) / base);
    // detection: one cheater at scale:1.02, a low fraction, several runs (seed = the run's seed: the
    // data order follows it; which micro-batches are checked is the coordinator's secret)
    const fraction = 0.05, steps = o.quick ? 20 : 40, mbPerStep = 4;
    const only = process.argv.find((x) => x.startsWith('--seeds='));
    const seeds = only !== undefined ? only.slice(8).split(',').map(Number) : o.quick ? [1, 2] : [1, 2, 3, 4];
    const runs: Array<Record<string, unknown>> = [];
    for (const seed of seeds) {
      log(`verify: cheater scale:1.02 at --verify-fraction ${fraction}, seed ${seed}, up to ${steps} steps`);
      const r = await swarm(tmp, modelDir, `detect-${seed}`, { steps, seed, fraction, cheat: 'scale:1.02' });
      const ban = r.bans.find((b) => b.peer_id === r.cheaterId);
      const i = ban === undefined ? -1 : r.events.indexOf(ban);
      const stepsBefore = i < 0 ? null : r.events.slice(0, i).filter((e) => e.event === 'step').length;
      runs.push({
        seed, detected: ban !== undefined, steps_until_ban: stepsBefore, evidence: ban?.evidence ?? null, reason: ban !== undefined ? String(ban.reason).slice(0, 200) : null,
        honest_banned: r.bans.filter((b) => b.peer_id !== r.cheaterId).length,
      });
    }
    const detected = runs.filter((x) => x.detected);
    // a check of a micro-batch involves the cheater when it is the primary (1/R of its stage's
    // micro-batches) or the checker of an honest primary (1/R too): with R = 2 replicas, every check
    const replicas = 2, involved = Math.min(1, 2 / replicas);
    const perStep = 1 - (1 - fraction * involved) ** mbPerStep;
    return {
      how: 'real processes on 127.0.0.1: launch + 4 join (--device cpu), 2 stages x 2 replicas, the embedded tiny model, 4 micro-batches of 2 x 64 tokens per step, fp32 wire; tokens/s: median of the steps after the first as launch reports them',
      cost,
      detection: {
        cheat: 'SWARMTUNE_TEST_BAD_OUTPUT=scale:1.02 on one volunteer of four', verify_fraction: fraction, max_steps: steps, runs,
        detection_rate: r3(detected.length / runs.length),
        steps_until_ban_median: detected.length > 0 ? median(detected.map((x) => Number(x.steps_until_ban))) : null,
        predicted_p_detected_per_step: r3(perStep),
        predicted_median_steps_until_ban: Math.ceil(Math.log(0.5) / Math.log(1 - perStep)) - 1,
        predicted_p_undetected_over_run: Number(((1 - fraction * involved) ** (steps * mbPerStep)).toExponential(2)),
      },
    };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const r = await benchVerify({ quick: process.argv.includes('--quick'), log: (s) => process.stderr.write(s + '\n') });
  console.log(JSON.stringify(r));
}
