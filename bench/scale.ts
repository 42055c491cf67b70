// `npm run bench -- --only scale`: the three committed scenarios through the simulator (sim/), each as built
// and with the designs of docs/scale.md, and the simulator against a real 4-volunteer run (bench/scale-real.ts).
import path from 'node:path';
import { readScenario } from '../sim/scenario.ts';
import type { Scenario } from '../sim/scenario.ts';
import { simulate } from '../sim/simulate.ts';
import type { SimResult } from '../sim/simulate.ts';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';
import { compareWithReal } from './scale-real.ts';
import { heartbeatCost } from './scale-heartbeat.ts';

/** steps per scenario and variant in the full section: the figures are per-step means; the 1000-peer runs
 *  cost about a second of CPU per step (docs/scale.md), so they run fewer */
export const FULL_STEPS: Record<string, number> = { '64-heterogeneous': 50, '64-churn': 50, '1000-70b': 20 };
export const SCENARIOS = ['64-heterogeneous', '64-churn', '1000-70b'] as const;
const DIR = path.join(import.meta.dirname, 'scenarios');

/** the designs of docs/scale.md, one knob each on top of the scenario as built (`only`: the scenarios where
 *  the knob matters; the heartbeat designs differ only in the coordinator's cost and drop latency) */
export const VARIANTS: Record<string, { knobs: Partial<Scenario>; only?: readonly string[] }> = {
  'as-built': { knobs: {} },
  // the tail before the light one (every replica's gradient through the coordinator, stage by stage)
  'coordinator-tail': { knobs: { tail: 'coordinator' } },
  'stage-allreduce': { knobs: { tail: 'stage-allreduce' } },
  '1f1b': { knobs: { schedule: '1f1b' } },
  'speed-matched': { knobs: { routes: 'speed-matched' } },
  'mid-step-join': { knobs: { lateJoin: 'mid-step' }, only: ['64-churn', '1000-70b'] },
  'heartbeats-per-peer': { knobs: { heartbeats: 'per-peer', lateJoin: 'mid-step' }, only: ['1000-70b'] },
  'heartbeats-hierarchical': { knobs: { heartbeats: 'hierarchical', lateJoin: 'mid-step' }, only: ['1000-70b'] },
  'balanced': { knobs: { routes: 'balanced' } },
  // aq2 (--wire-dtype aq2, issue 16 item 5: 11.2x fewer bytes than bf16 on the convergence bench) on the hops
  'balanced-aq2': { knobs: { routes: 'balanced', wireBytesPerElement: 0.18 } },
  'all-designs': { knobs: { tail: 'stage-allreduce', schedule: '1f1b', lateJoin: 'mid-step', routes: 'balanced', wireBytesPerElement: 0.18 } },
};

/** the variants a scenario runs; quick (the test of the bench's machinery): the 1000-peer scenario only as
 *  built and with all designs */
export function variantsOf(scenario: string, quick = false): Array<[string, Partial<Scenario>]> {
  return Object.entries(VARIANTS)
    .filter(([k, v]) => (v.only === undefined || v.only.includes(scenario)) && (!quick || scenario !== '1000-70b' || k === 'as-built' || k === 'all-designs'))
    .map(([k, v]) => [k, v.knobs]);
}

/** quick: a few steps and at most this many simulated hours (a run that stalls stops there) */
const QUICK_MAX_HOURS = 1;

export interface ScaleOptions { quick: boolean; log?: (s: string) => void; real?: boolean }

export async function benchScale(o: ScaleOptions): Promise<Record<string, unknown>> {
  const runs: Array<{ scenario: string; variant: string; result: SimResult }> = [];
  for (const name of SCENARIOS) {
    for (const [variant, knobs] of variantsOf(name, o.quick)) {
      // quick: a few steps (the test of the bench's machinery)
      const base = readScenario(path.join(DIR, `${name}.json`), { steps: o.quick ? 2 : FULL_STEPS[name]! });
      const sc = { ...base, ...knobs, ...(o.quick ? { maxHours: Math.min(base.maxHours, QUICK_MAX_HOURS) } : {}) };
      o.log?.(`scale: ${name} (${variant}), ${sc.peers.count} peers, ${sc.steps} steps`);
      runs.push({ scenario: name, variant, result: await simulate(sc) });
    }
  }
  // the coordinator's CPU per heartbeat, measured over real libp2p (bench/scale-heartbeat.ts)
  const heartbeat = o.real === false ? null : await heartbeatCost({ beats: 1000, peers: 8 });
  let real: Record<string, unknown> | null = null;
  if (o.real !== false) {
    const llama = tinyLlamaConfig({ hiddenSize: 256, intermediateSize: 688, numHiddenLayers: 4, numAttentionHeads: 4, numKeyValueHeads: 2, headDim: 64, vocabSize: 512 });
    real = { settings: { model: 'hidden 256, 4 layers, vocab 512', stages: 2, replicas: 2, micro_batches: 8, batch: 2, seq_len: 64, steps: 3 }, ...await compareWithReal({ llama, steps: 3, microBatches: 8, batch: 2, seqLen: 64 }) };
  }
  return { runs, real, heartbeat };
}
