// `npm run bench -- --only scale`: the three committed scenarios through the simulator (sim/), each as built
// and with the designs of docs/scale.md, and the simulator against a real 4-volunteer run (bench/scale-real.ts).
import path from 'node:path';
import { readScenario } from '../sim/scenario.ts';
import type { Scenario } from '../sim/scenario.ts';
import { simulate } from '../sim/simulate.ts';
import type { SimResult } from '../sim/simulate.ts';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';
import { compareWithReal } from './scale-real.ts';

/** steps per scenario and variant in the full section: the figures are per-step means, and the 1000-peer runs
 *  cost about a second of CPU per step (1000 steps: docs/scale.md) */
export const FULL_STEPS = 50;
export const SCENARIOS = ['64-heterogeneous', '64-churn', '1000-70b'] as const;
const DIR = path.join(import.meta.dirname, 'scenarios');

/** the designs of docs/scale.md, one knob each on top of the scenario as built */
export const VARIANTS: Record<string, Partial<Scenario>> = {
  'as-built': {},
  // the tail before the light one (every replica's gradient through the coordinator, stage by stage)
  'coordinator-tail': { tail: 'coordinator' },
  'stage-allreduce': { tail: 'stage-allreduce' },
  'all-designs': { tail: 'stage-allreduce', routes: 'speed-matched', lateJoin: 'background' },
};

export interface ScaleOptions { quick: boolean; log?: (s: string) => void; real?: boolean }

export async function benchScale(o: ScaleOptions): Promise<Record<string, unknown>> {
  const runs: Array<{ scenario: string; variant: string; result: SimResult }> = [];
  for (const name of SCENARIOS) {
    for (const [variant, knobs] of Object.entries(VARIANTS)) {
      // quick: a few steps (the test of the bench's machinery)
      const sc = { ...readScenario(path.join(DIR, `${name}.json`), { steps: o.quick ? 2 : FULL_STEPS }), ...knobs };
      o.log?.(`scale: ${name} (${variant}), ${sc.peers.count} peers, ${sc.steps} steps`);
      runs.push({ scenario: name, variant, result: await simulate(sc) });
    }
  }
  let real: Record<string, unknown> | null = null;
  if (o.real !== false) {
    const llama = tinyLlamaConfig({ hiddenSize: 256, intermediateSize: 688, numHiddenLayers: 4, numAttentionHeads: 4, numKeyValueHeads: 2, headDim: 64, vocabSize: 512 });
    real = { settings: { model: 'hidden 256, 4 layers, vocab 512', stages: 2, replicas: 2, micro_batches: 8, batch: 2, seq_len: 64, steps: 3 }, ...await compareWithReal({ llama, steps: 3, microBatches: 8, batch: 2, seqLen: 64 }) };
  }
  return { runs, real };
}
