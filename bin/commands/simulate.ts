// `swarmtune simulate`: a run at scale in simulated time (sim/): the scenario's peers, links and churn
// against the coordinator's own decisions; a summary, or with --json one object as the last line.
import type { Command } from 'commander';
import { readScenario } from '../../sim/scenario.ts';
import { simulate } from '../../sim/simulate.ts';
import type { SimResult } from '../../sim/simulate.ts';
import { action, UsageError } from '../errors.ts';

function positiveInt(flag: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`${flag} must be a positive integer, got "${v}"`);
  return n;
}

function printResult(r: SimResult): void {
  const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
  console.log(`scenario ${r.scenario}: ${r.peers} peers (${r.peers_used} placed, ${r.peers_rejected} rejected), ${r.stages.length} stage(s), ${r.steps} steps in ${(r.simulated_s / 3600).toFixed(2)} simulated hours (start-up ${r.startup_s.toFixed(0)} s)`);
  console.log(`  tokens/s ${r.tokens_per_s.toFixed(1)} of an ideal ${r.ideal_tokens_per_s.toFixed(1)} (${pct(r.ideal_fraction)}); ${r.steps_per_hour.toFixed(2)} steps/hour; step ${r.step_s.mean.toFixed(1)} s (micro-batches ${r.micro_batch_phase_s.toFixed(1)} s, tail ${r.tail_s.toFixed(1)} s)`);
  for (const [s, st] of r.stages.entries()) console.log(`  stage ${s} layers [${st.layers[0]}, ${st.layers[1]}): ${st.replicas_at_start} replicas, utilization ${pct(st.utilization)}, bubble ${pct(st.bubble)}`);
  console.log(`  lost steps ${r.lost_steps}, repeated steps ${r.repeated_steps}, micro-batch retries ${r.micro_batch_retries}; ${r.joins} joins, ${r.leaves} leaves`);
  const j = r.join_to_first_microbatch_s;
  if (j.n > 0) console.log(`  join to first micro-batch: p50 ${j.p50!.toFixed(0)} s, p95 ${j.p95!.toFixed(0)} s (${j.n} joiners)`);
  console.log(`  coordinator: ${pct(r.coordinator.cpu_fraction)} of a core, ${(r.coordinator.bytes_per_step / 1e6).toFixed(1)} MB per step (${pct(r.coordinator.link_fraction)} of its link), planner ${r.planner_ms.toFixed(1)} ms`);
  console.log(`  simulated in ${r.sim_wall_s.toFixed(1)} s (${r.events} events)`);
}

export function registerSimulate(program: Command): void {
  program.command('simulate')
    .description('simulate a run at scale (peers, links, NAT, churn from a scenario) against the coordinator\'s own decisions')
    .requiredOption('--config <sim.json>', 'the scenario (bench/scenarios/*.json; docs/scale.md describes the keys)')
    .option('--steps <n>', 'optimizer steps instead of the scenario\'s')
    .option('--peers <n>', 'peers at the start instead of the scenario\'s')
    .option('--json', 'print the result as one JSON object (the last line)')
    .action(action('simulate', async (opts: { config: string; steps?: string; peers?: string; json?: boolean }) => {
      const sc = readScenario(opts.config, { steps: positiveInt('--steps', opts.steps), peers: positiveInt('--peers', opts.peers) });
      const r = await simulate(sc);
      if (opts.json) console.log(JSON.stringify(r));
      else printResult(r);
    }));
}
