// A simulation scenario: the model, the training shape, the peers (device classes, links, NAT), churn and the
// coordinator's costs, read from JSON and checked field by field (a bad field is one line naming it).
import { readFileSync } from 'node:fs';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';
import type { LlamaConfig } from '../engine/types.ts';

export class ScenarioError extends Error {
  override name = 'ScenarioError';
}

/** A kind of volunteer machine. GPU classes: memory and dense bf16 TFLOP/s from the vendor's data sheet;
 *  CPU classes: the FMA peak of the machine. `efficiency` turns the peak into achieved training FLOP/s. */
export interface DeviceClass { name: string; share: number; memoryGiB: number; peakTflops: number; efficiency: number }

export interface Scenario {
  name: string;
  seed: number;
  model: LlamaConfig;
  modelName: string;
  steps: number;
  microBatch: number;
  seqLen: number;
  /** micro-batches per optimizer step (gradient_accumulation_steps) */
  accumulation: number;
  loraR: number;
  /** bytes per activation element on a hop (int8: 1 + 4/64) */
  wireBytesPerElement: number;
  /** --pipeline-stages, or undefined: the planner's fewest stages */
  pipelineStages?: number;
  peers: {
    count: number;
    classes: DeviceClass[];
    /** per-peer link rate, drawn log-uniformly in [min, max] Mbit/s (symmetric) */
    linkMbit: [number, number];
    /** per-peer round trip to the network core, uniform in [min, max] ms */
    rttMs: [number, number];
    /** share of peers behind NAT, and of those the share behind a cone NAT (hole punching works; the rest strict) */
    natShare: number;
    coneShare: number;
  };
  churn: { leavePerHour: number; arrivePerHour: number } | null;
  coordinator: {
    linkMbit: number;
    /** CPU milliseconds the coordinator spends per request it sends or answers (framing, Noise, schema) */
    cpuMsPerRequest: number;
    /** CPU nanoseconds per byte it sends, receives or relays (Noise + Yamux) */
    cpuNsPerByte: number;
    /** the atomic LevelDB commit of a step */
    storeCommitMs: number;
    /** bytes per stage per micro-batch of control (message, report, commit) beyond token ids and labels */
    controlBytesPerStage: number;
    heartbeatBytes: number;
    /** CPU milliseconds per heartbeat (measured, bench/scale-heartbeat.ts); default cpuMsPerRequest */
    heartbeatCpuMs: number;
  };
  /** how the step tail aggregates: 'light' (as built, coordinator/step.ts: every replica of a stage
   *  pulls its partners' step gradients and sums them, all stages at once; the coordinator gets each
   *  stage's Σ g², every stage applies in parallel, one adapter upload per stage), 'coordinator' (the
   *  tail before it: every replica's gradient to the coordinator and the final one back, stage after
   *  stage) or 'stage-allreduce' (recursive halving/doubling among a stage's replicas, docs/scale.md) */
  tail: 'light' | 'coordinator' | 'stage-allreduce';
  /** how routes pair replicas: 'as-built' (routeFor: replica k of every stage, in peer-id order),
   *  'speed-matched' (the design of docs/scale.md: the k-th fastest of every stage) or 'balanced'
   *  (coordinator/routes.ts LoadRouter: each micro-batch's replicas picked by queue and speed) */
  routes: 'as-built' | 'speed-matched' | 'balanced';
  /** how late joiners are placed: 'as-built' (the step loop waits until the joiner has loaded its stage)
   *  or 'background' (the design of docs/scale.md: it loads while steps go on, added at the next boundary)
   *  or 'mid-step' (loads while steps go on; once loaded it fetches the step's adapter and optimizer
   *  state and joins the routes at the next micro-batch: the adapter does not change within a step) */
  lateJoin: 'as-built' | 'background' | 'mid-step';
  /** the coordinator's heartbeats: 'bounded' (as built: the period grows with the peer count above
   *  HEARTBEAT_MAX_PER_SECOND, coordinator/decide.ts), 'per-peer' (every peer every second, as first
   *  built) or 'hierarchical' (the design of docs/scale.md: a leader per stage beats its replicas and the
   *  coordinator beats the leaders) */
  heartbeats: 'bounded' | 'per-peer' | 'hierarchical';
  /** the micro-batch schedule: 'as-built' (pipelineDepth in flight per route, a commit round after each
   *  micro-batch) or '1f1b' (the design being built: 2 × stages in flight per route, one forward one
   *  backward alternating, the commit folded into the route's next control message) */
  schedule: 'as-built' | '1f1b';
  /** simulated hours after which the run stops (the figures say how many steps it made) */
  maxHours: number;
  /** where each number comes from, carried into the report */
  sources: Record<string, string>;
}

/** Published Llama shapes (config.json of meta-llama/Meta-Llama-3-8B and -70B). */
export const MODELS: Record<string, () => LlamaConfig> = {
  'llama-3-8b': () => tinyLlamaConfig({ vocabSize: 128256, hiddenSize: 4096, intermediateSize: 14336, numHiddenLayers: 32, numAttentionHeads: 32, numKeyValueHeads: 8, headDim: 128, ropeTheta: 500000, maxPositionEmbeddings: 8192 }),
  'llama-3-70b': () => tinyLlamaConfig({ vocabSize: 128256, hiddenSize: 8192, intermediateSize: 28672, numHiddenLayers: 80, numAttentionHeads: 64, numKeyValueHeads: 8, headDim: 128, ropeTheta: 500000, maxPositionEmbeddings: 8192 }),
};

type Obj = Record<string, unknown>;

function field(o: Obj, key: string, where: string): unknown {
  if (!(key in o)) throw new ScenarioError(`${where}.${key} is missing`);
  return o[key];
}
function num(o: Obj, key: string, where: string, min: number, max: number, dflt?: number): number {
  const v = key in o || dflt === undefined ? field(o, key, where) : dflt;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) throw new ScenarioError(`${where}.${key} must be a number in [${min}, ${max}], got ${JSON.stringify(v)}`);
  return v;
}
function int(o: Obj, key: string, where: string, min: number, max: number, dflt?: number): number {
  const v = num(o, key, where, min, max, dflt);
  if (!Number.isInteger(v)) throw new ScenarioError(`${where}.${key} must be an integer, got ${v}`);
  return v;
}
function obj(v: unknown, where: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ScenarioError(`${where} must be an object`);
  return v as Obj;
}
function range(o: Obj, key: string, where: string, min: number, max: number): [number, number] {
  const v = field(o, key, where);
  if (!Array.isArray(v) || v.length !== 2 || v.some((x) => typeof x !== 'number' || !(x >= min && x <= max)) || v[0] > v[1]) {
    throw new ScenarioError(`${where}.${key} must be [low, high] with ${min} ≤ low ≤ high ≤ ${max}, got ${JSON.stringify(v)}`);
  }
  return [v[0], v[1]];
}
function oneOf<T extends string>(o: Obj, key: string, where: string, values: readonly T[], dflt: T): T {
  const v = key in o ? o[key] : dflt;
  if (!values.includes(v as T)) throw new ScenarioError(`${where}.${key} must be one of ${values.join(', ')}, got ${JSON.stringify(v)}`);
  return v as T;
}

export function parseScenario(json: unknown, overrides: { steps?: number; peers?: number } = {}): Scenario {
  const o = obj(json, 'scenario');
  const name = field(o, 'name', 'scenario');
  if (typeof name !== 'string' || name === '') throw new ScenarioError('scenario.name must be a non-empty string');
  const modelName = field(o, 'model', 'scenario');
  if (typeof modelName !== 'string' || MODELS[modelName] === undefined) throw new ScenarioError(`scenario.model must be one of ${Object.keys(MODELS).join(', ')}, got ${JSON.stringify(modelName)}`);
  const model = MODELS[modelName]!();
  const t = obj(field(o, 'train', 'scenario'), 'scenario.train');
  const p = obj(field(o, 'peers', 'scenario'), 'scenario.peers');
  const c = obj(field(o, 'coordinator', 'scenario'), 'scenario.coordinator');
  const classesRaw = field(p, 'classes', 'scenario.peers');
  if (!Array.isArray(classesRaw) || classesRaw.length === 0) throw new ScenarioError('scenario.peers.classes must be a non-empty array');
  const classes = classesRaw.map((x, i): DeviceClass => {
    const w = `scenario.peers.classes[${i}]`;
    const k = obj(x, w);
    if (typeof k.name !== 'string' || k.name === '') throw new ScenarioError(`${w}.name must be a non-empty string`);
    return { name: k.name, share: num(k, 'share', w, 0, 1), memoryGiB: num(k, 'memory_gib', w, 0.5, 1024), peakTflops: num(k, 'peak_tflops', w, 0.001, 10_000), efficiency: num(k, 'efficiency', w, 0.001, 1) };
  });
  const shares = classes.reduce((a, k) => a + k.share, 0);
  if (Math.abs(shares - 1) > 1e-6) throw new ScenarioError(`scenario.peers.classes shares must sum to 1, they sum to ${shares}`);
  let churn: Scenario['churn'] = null;
  if (o.churn !== undefined && o.churn !== null) {
    const ch = obj(o.churn, 'scenario.churn');
    churn = { leavePerHour: num(ch, 'leave_per_hour', 'scenario.churn', 0, 10), arrivePerHour: num(ch, 'arrive_per_hour', 'scenario.churn', 0, 10) };
  }
  const layers = model.numHiddenLayers;
  const ps = t.pipeline_stages === undefined ? undefined : int(t, 'pipeline_stages', 'scenario.train', 1, layers);
  const sources = o.sources === undefined ? {} : obj(o.sources, 'scenario.sources');
  for (const [k, v] of Object.entries(sources)) if (typeof v !== 'string') throw new ScenarioError(`scenario.sources.${k} must be a string`);
  return {
    name, modelName, model, seed: int(o, 'seed', 'scenario', 0, 2 ** 31),
    steps: overrides.steps ?? int(t, 'steps', 'scenario.train', 1, 1e7),
    microBatch: int(t, 'micro_batch', 'scenario.train', 1, 4096), seqLen: int(t, 'seq_len', 'scenario.train', 1, 1 << 20),
    accumulation: int(t, 'accumulation', 'scenario.train', 1, 1 << 20), loraR: int(t, 'lora_r', 'scenario.train', 1, 4096),
    wireBytesPerElement: num(t, 'wire_bytes_per_element', 'scenario.train', 0.1, 8),
    pipelineStages: ps,
    peers: {
      count: overrides.peers ?? int(p, 'count', 'scenario.peers', 1, 1e6), classes,
      linkMbit: range(p, 'link_mbit', 'scenario.peers', 0.1, 1e6), rttMs: range(p, 'rtt_ms', 'scenario.peers', 0, 10_000),
      natShare: num(p, 'nat_share', 'scenario.peers', 0, 1), coneShare: num(p, 'cone_share', 'scenario.peers', 0, 1),
    },
    churn,
    coordinator: {
      linkMbit: num(c, 'link_mbit', 'scenario.coordinator', 0.1, 1e6), cpuMsPerRequest: num(c, 'cpu_ms_per_request', 'scenario.coordinator', 0, 1000),
      cpuNsPerByte: num(c, 'cpu_ns_per_byte', 'scenario.coordinator', 0, 1e6), storeCommitMs: num(c, 'store_commit_ms', 'scenario.coordinator', 0, 1e6),
      controlBytesPerStage: num(c, 'control_bytes_per_stage', 'scenario.coordinator', 0, 1e9), heartbeatBytes: num(c, 'heartbeat_bytes', 'scenario.coordinator', 0, 1e9),
      heartbeatCpuMs: num(c, 'heartbeat_cpu_ms', 'scenario.coordinator', 0, 1000, num(c, 'cpu_ms_per_request', 'scenario.coordinator', 0, 1000)),
    },
    tail: oneOf(o, 'tail', 'scenario', ['light', 'coordinator', 'stage-allreduce'] as const, 'light'),
    routes: oneOf(o, 'routes', 'scenario', ['as-built', 'speed-matched', 'balanced'] as const, 'as-built'),
    lateJoin: oneOf(o, 'late_join', 'scenario', ['as-built', 'background', 'mid-step'] as const, 'as-built'),
    heartbeats: oneOf(o, 'heartbeats', 'scenario', ['bounded', 'per-peer', 'hierarchical'] as const, 'bounded'),
    schedule: oneOf(o, 'schedule', 'scenario', ['as-built', '1f1b'] as const, 'as-built'),
    maxHours: num(o, 'max_hours', 'scenario', 0.001, 1e6, 24 * 30),
    sources: sources as Record<string, string>,
  };
}

export function readScenario(file: string, overrides: { steps?: number; peers?: number } = {}): Scenario {
  let text: string;
  try { text = readFileSync(file, 'utf8'); } catch (e) { throw new ScenarioError(`cannot read ${file}: ${(e as Error).message}`); }
  let json: unknown;
  try { json = JSON.parse(text); } catch (e) { throw new ScenarioError(`${file} is not JSON: ${(e as Error).message}`); }
  return parseScenario(json, overrides);
}
