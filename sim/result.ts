// What a simulated run reports (the last line of `swarmtune simulate --json`), and the small helpers that round it.
import type { Scenario } from './scenario.ts';

export interface SimResult {
  scenario: string;
  peers: number;
  peers_used: number;
  peers_rejected: number;
  stages: Array<{ layers: [number, number]; replicas_at_start: number; utilization: number; bubble: number }>;
  steps: number;
  micro_batches_per_step: number;
  tokens_per_step: number;
  simulated_s: number;
  startup_s: number;
  tokens_per_s: number;
  ideal_tokens_per_s: number;
  ideal_fraction: number;
  ideal_all_peers_tokens_per_s: number;
  step_s: { mean: number; p50: number; p95: number };
  /** mean per step: until every micro-batch committed; the step tail (collect, apply, upload, store) */
  micro_batch_phase_s: number;
  tail_s: number;
  steps_per_hour: number;
  steps_target: number;
  /** the run reached the scenario's max_hours before its last step */
  stopped_at_time_cap: boolean;
  lost_steps: number;
  repeated_steps: number;
  micro_batch_retries: number;
  joins: number;
  leaves: number;
  join_to_first_microbatch_s: { p50: number | null; p95: number | null; n: number };
  /** background and mid-step joins: arrival until the shard is loaded (at the joiner's link) */
  join_to_loaded_s: { p50: number | null; p95: number | null; n: number };
  coordinator: { cpu_fraction: number; bytes_per_step: number; link_fraction: number; relayed_bytes_per_step: number; requests_per_s: number };
  hops: { direct: number; punched: number; relayed: number };
  planner_ms: number;
  sim_wall_s: number;
  events: number;
  tail: Scenario['tail'];
  routes: Scenario['routes'];
  late_join: Scenario['lateJoin'];
  heartbeats: Scenario['heartbeats'];
  schedule: Scenario['schedule'];
  /** the heartbeat period at the run's mean serving peer count, and how long an idle peer that left stays
   *  in routes (mean over the leaves) */
  heartbeat: { period_s: number; silence_s: number; detect_idle_leave_s: number | null; cpu_fraction: number; requests_per_s: number };
}

export const q = (xs: number[], p: number): number | null => {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
};
export const r3 = (x: number) => Number(x.toFixed(3));
export const avg = (xs: number[]) => (xs.length === 0 ? 0 : xs.reduce((a, b) => a + b, 0) / xs.length);

