// The training configuration: one table of TrainingArguments/LoraConfig-style keys with defaults, parsing of
// run.json (snake_case) and CLI flags (kebab-case), and validation with errors naming the key and the source.
//
// Fields keep their Hugging Face snake_case names on purpose: the JSON key, the flag and the field are the
// same word, so users and the coordinator's run spec never need a translation table.
import { readFileSync } from 'node:fs';
import { ALL_TARGETS, LORA_TARGETS } from '../types.ts';
import type { LoraConfig, LoraTarget } from '../types.ts';
import { OPTIM_NAMES } from '../optimizer.ts';
import type { OptimName } from '../optimizer.ts';
import { LR_SCHEDULER_TYPES } from './schedule.ts';
import type { LrSchedulerType } from './schedule.ts';

export const SAVE_STRATEGIES = ['no', 'steps', 'epoch'] as const;
export type SaveStrategy = typeof SAVE_STRATEGIES[number];
export const EVAL_STRATEGIES = ['no', 'steps', 'epoch'] as const;
export type EvalStrategy = typeof EVAL_STRATEGIES[number];
/** report_to integrations swarmtune writes ("all" means these; the JSONL log is always written) */
export const REPORT_INTEGRATIONS = ['tensorboard'] as const;
export type ReportIntegration = typeof REPORT_INTEGRATIONS[number];
/** metric_for_best_model values: HF prefixes "eval_" to a name that lacks it; eval loss is the metric we compute */
export const BEST_MODEL_METRICS = ['loss', 'eval_loss'] as const;
export const DEVICES = ['auto', 'cpu', 'ref', 'cuda'] as const;
export type TrainDevice = typeof DEVICES[number];

export interface TrainConfig {
  model: string | null;
  data: string | null;
  output_dir: string;
  num_train_epochs: number;
  max_steps: number;
  per_device_train_batch_size: number;
  gradient_accumulation_steps: number;
  learning_rate: number;
  lr_scheduler_type: LrSchedulerType;
  warmup_ratio: number;
  warmup_steps: number;
  max_grad_norm: number;
  weight_decay: number;
  adam_beta1: number;
  adam_beta2: number;
  adam_epsilon: number;
  seed: number;
  shuffle: boolean;
  logging_steps: number;
  save_strategy: SaveStrategy;
  save_steps: number;
  save_total_limit: number | null;
  eval_data: string | null;
  eval_strategy: EvalStrategy;
  /** an integer number of steps, or a fraction (< 1) of the total steps; null = logging_steps (HF) */
  eval_steps: number | null;
  per_device_eval_batch_size: number;
  load_best_model_at_end: boolean;
  metric_for_best_model: string | null;
  greater_is_better: boolean | null;
  report_to: ReportIntegration[];
  logging_dir: string | null;
  resume_from_checkpoint: string | null;
  init_adapter: string | null;
  lora_r: number;
  lora_alpha: number;
  lora_dropout: number;
  target_modules: LoraTarget[];
  use_rslora: boolean;
  init_lora_weights: true | 'gaussian';
  bnb_4bit_use_double_quant: boolean;
  optim: OptimName;
  optim_resident_bytes: number | null;
  optim_page_bytes: number;
  max_seq_length: number;
  gradient_checkpointing: boolean;
  device: TrainDevice;
  system_prompt: string;
  completion_only_loss: boolean;
  assistant_only_loss: boolean;
  skip_bad_lines: boolean;
  /** TRL SFTConfig packing (bfd, padding-free): engine/train/packing.ts */
  packing: boolean;
  /** swarm only: fraction of micro-batches whose stage computations are recomputed and compared */
  verify_fraction: number;
  json: boolean;
}

type Kind = 'int' | 'float' | 'bool' | 'string' | 'path' | 'enum' | 'targets' | 'bytes' | 'init' | 'steps' | 'report';

export interface ConfigKeySpec {
  key: keyof TrainConfig;
  kind: Kind;
  help: string;
  values?: readonly string[];
  /** inclusive lower bound for numbers */
  min?: number;
  /** the lower bound is exclusive */
  minExclusive?: boolean;
  max?: number;
  nullable?: boolean;
}

/** Defaults follow transformers TrainingArguments / TRL SFTConfig / PEFT LoraConfig unless noted. */
export const DEFAULT_TRAIN_CONFIG: Readonly<TrainConfig> = Object.freeze({
  model: null,
  data: null,
  output_dir: 'swarmtune-output',
  num_train_epochs: 3,
  max_steps: -1,
  per_device_train_batch_size: 8,
  gradient_accumulation_steps: 1,
  learning_rate: 5e-5,
  lr_scheduler_type: 'linear',
  warmup_ratio: 0,
  warmup_steps: 0,
  max_grad_norm: 1.0,
  weight_decay: 0,
  adam_beta1: 0.9,
  adam_beta2: 0.999,
  adam_epsilon: 1e-8,
  seed: 42,
  shuffle: true,
  // HF logs every 500 steps; a fine-tune on one machine is short, so every 10 is more useful
  logging_steps: 10,
  save_strategy: 'steps',
  save_steps: 500,
  save_total_limit: null,
  eval_data: null,
  eval_strategy: 'no',
  eval_steps: null,
  per_device_eval_batch_size: 8,
  load_best_model_at_end: false,
  metric_for_best_model: null,
  greater_is_better: null,
  // transformers 5 defaults to "none" (4.x reported to every installed integration); the JSONL log is always on
  report_to: [],
  logging_dir: null,
  resume_from_checkpoint: null,
  init_adapter: null,
  lora_r: 8,
  lora_alpha: 8,
  lora_dropout: 0,
  target_modules: ['q_proj', 'v_proj'],
  use_rslora: false,
  init_lora_weights: true,
  // BitsAndBytesConfig defaults to False; the QLoRA recipe (and its paper's NF4+DQ results) sets True
  bnb_4bit_use_double_quant: true,
  optim: 'adamw_torch',
  optim_resident_bytes: null,
  optim_page_bytes: 1 << 20,
  max_seq_length: 1024,
  gradient_checkpointing: true,
  device: 'auto',
  system_prompt: 'You are a helpful AI assistant.',
  // TRL: completion_only_loss None means "on for prompt/completion data", the only records it applies to
  completion_only_loss: true,
  assistant_only_loss: false,
  skip_bad_lines: false,
  packing: false,
  // swarmtune's own: 5% catches a cheater that tampers every micro-batch within ~60 of them at 95% (docs/security.md)
  verify_fraction: 0.05,
  json: false,
}) as TrainConfig;

export const TRAIN_CONFIG_KEYS: readonly ConfigKeySpec[] = [
  { key: 'model', kind: 'path', nullable: true, help: 'HF model directory (safetensors + config.json + tokenizer)' },
  { key: 'data', kind: 'path', nullable: true, help: 'training data, JSONL' },
  { key: 'output_dir', kind: 'path', help: 'where the adapter, checkpoints and the log go' },
  { key: 'num_train_epochs', kind: 'float', min: 0, minExclusive: true, help: 'epochs (ignored when max_steps > 0)' },
  { key: 'max_steps', kind: 'int', min: -1, help: 'total optimizer steps; overrides num_train_epochs when > 0' },
  { key: 'per_device_train_batch_size', kind: 'int', min: 1, help: 'sequences per micro-batch' },
  { key: 'gradient_accumulation_steps', kind: 'int', min: 1, help: 'micro-batches per optimizer step' },
  { key: 'learning_rate', kind: 'float', min: 0, help: 'peak learning rate' },
  { key: 'lr_scheduler_type', kind: 'enum', values: LR_SCHEDULER_TYPES, help: 'learning-rate schedule' },
  { key: 'warmup_ratio', kind: 'float', min: 0, max: 1, help: 'warmup as a fraction of total steps' },
  { key: 'warmup_steps', kind: 'int', min: 0, help: 'warmup steps (wins over warmup_ratio when > 0)' },
  { key: 'max_grad_norm', kind: 'float', min: 0, help: 'gradient clipping norm (0 disables)' },
  { key: 'weight_decay', kind: 'float', min: 0, help: 'AdamW weight decay' },
  { key: 'adam_beta1', kind: 'float', min: 0, max: 1, help: 'AdamW beta1' },
  { key: 'adam_beta2', kind: 'float', min: 0, max: 1, help: 'AdamW beta2' },
  { key: 'adam_epsilon', kind: 'float', min: 0, help: 'AdamW epsilon' },
  { key: 'seed', kind: 'int', min: 0, help: 'seed for LoRA init, shuffling and dropout' },
  { key: 'shuffle', kind: 'bool', help: 'shuffle examples every epoch from the seed (off keeps file order)' },
  { key: 'logging_steps', kind: 'int', min: 1, help: 'log (JSONL, progress) every N steps' },
  { key: 'save_strategy', kind: 'enum', values: SAVE_STRATEGIES, help: 'when to write checkpoint-N dirs' },
  { key: 'save_steps', kind: 'int', min: 1, help: 'checkpoint every N steps (save_strategy steps)' },
  { key: 'save_total_limit', kind: 'int', min: 1, nullable: true, help: 'keep at most N checkpoints (oldest deleted)' },
  { key: 'eval_data', kind: 'path', nullable: true, help: 'evaluation data, JSONL in the formats of --data (HF eval_dataset)' },
  { key: 'eval_strategy', kind: 'enum', values: EVAL_STRATEGIES, help: 'when to compute eval_loss on eval_data during training' },
  { key: 'eval_steps', kind: 'steps', nullable: true, help: 'evaluate every N steps (eval_strategy steps); a float < 1 is a fraction of the total steps; default logging_steps' },
  { key: 'per_device_eval_batch_size', kind: 'int', min: 1, help: 'sequences per evaluation batch' },
  { key: 'load_best_model_at_end', kind: 'bool', help: 'the adapter written at the end is the best evaluated checkpoint\'s (save and eval strategies must match)' },
  { key: 'metric_for_best_model', kind: 'enum', values: BEST_MODEL_METRICS, nullable: true, help: 'metric that picks the best checkpoint (default loss when load_best_model_at_end)' },
  { key: 'greater_is_better', kind: 'bool', nullable: true, help: 'a larger metric is better (default: false for a loss)' },
  { key: 'report_to', kind: 'report', help: 'where logs go besides training_log.jsonl: none, tensorboard or all (a comma list)' },
  { key: 'logging_dir', kind: 'path', nullable: true, help: 'TensorBoard event files dir (default <output_dir>/runs/<date>_<host>, as HF)' },
  { key: 'resume_from_checkpoint', kind: 'path', nullable: true, help: 'checkpoint dir to resume from, or "latest" in output_dir' },
  { key: 'init_adapter', kind: 'path', nullable: true, help: 'start from this PEFT adapter dir (its r, alpha, targets apply)' },
  { key: 'lora_r', kind: 'int', min: 1, help: 'LoRA rank' },
  { key: 'lora_alpha', kind: 'float', min: 0, minExclusive: true, help: 'LoRA alpha (scaling = alpha / r)' },
  { key: 'lora_dropout', kind: 'float', min: 0, max: 1, help: 'dropout on the LoRA branch input' },
  { key: 'target_modules', kind: 'targets', help: `comma list of ${LORA_TARGETS.join(',')} (Phi-3: qkv_proj,o_proj,gate_up_proj,down_proj) or "all-linear"` },
  { key: 'use_rslora', kind: 'bool', help: 'scaling = alpha / sqrt(r)' },
  { key: 'init_lora_weights', kind: 'init', help: 'true (kaiming-uniform A, zero B) or "gaussian"' },
  { key: 'bnb_4bit_use_double_quant', kind: 'bool', help: 'hold the NF4 absmax double-quantized as bitsandbytes does (8-bit codes + a float32 absmax per 256 blocks: ~0.127 instead of 0.5 bits per parameter) when a full-precision model is quantized on load; a prequantized checkpoint keeps its own form' },
  { key: 'optim', kind: 'enum', values: OPTIM_NAMES, help: 'optimizer' },
  { key: 'optim_resident_bytes', kind: 'bytes', nullable: true, help: 'paged optimizers: bytes of state kept in memory; pages past it spill to disk (e.g. 64MiB)' },
  { key: 'optim_page_bytes', kind: 'bytes', min: 4096, help: 'paged optimizers: page size' },
  { key: 'max_seq_length', kind: 'int', min: 2, help: 'truncate tokenized examples to this length' },
  { key: 'gradient_checkpointing', kind: 'bool', help: 'recompute layer activations in backward' },
  { key: 'device', kind: 'enum', values: DEVICES, help: 'compute backend: auto (CUDA if a GPU passes its self-check, else native CPU), cpu (native), ref (float64 reference) or cuda' },
  { key: 'system_prompt', kind: 'string', help: 'system message for {"question","answer"} records' },
  { key: 'completion_only_loss', kind: 'bool', help: 'prompt/completion and question/answer records: train only on the tokens past the prompt (TRL completion_only_loss)' },
  { key: 'assistant_only_loss', kind: 'bool', help: 'conversational records: train only on assistant turns (TRL assistant_only_loss; off trains every token)' },
  { key: 'skip_bad_lines', kind: 'bool', help: 'skip (and count) malformed JSONL lines instead of failing' },
  { key: 'packing', kind: 'bool', help: 'TRL packing: examples best-fit into rows of max_seq_length, each micro-batch one row without padding, attention kept inside each example' },
  { key: 'verify_fraction', kind: 'float', min: 0, max: 1, help: 'swarm (launch): fraction of micro-batches a second peer or the coordinator recomputes and compares, banning a peer that computed wrong (docs/security.md); train ignores it' },
  { key: 'json', kind: 'bool', help: 'print one JSON object per line for step events' },
];

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

/** Parse sizes like 4096, "64MiB", "1.5GB", "24GiB" into bytes. */
export function parseBytes(value: unknown, what: string): number {
  if (typeof value === 'number') {
    if (!Number.isFinite(value) || value < 0) throw new ConfigError(`${what}: expected a non-negative byte count, got ${value}`);
    return Math.floor(value);
  }
  if (typeof value !== 'string') throw new ConfigError(`${what}: expected a byte size like "64MiB", got ${JSON.stringify(value)}`);
  const m = /^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgt]?i?b?)?\s*$/i.exec(value);
  if (!m) throw new ConfigError(`${what}: cannot parse byte size "${value}" (examples: 4096, 64MiB, 24GB)`);
  const n = Number(m[1]);
  const unit = (m[2] ?? '').toLowerCase();
  const pow: Record<string, number> = { '': 1, b: 1, k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, t: 1e12, tb: 1e12,
    ki: 1024, kib: 1024, mi: 1024 ** 2, mib: 1024 ** 2, gi: 1024 ** 3, gib: 1024 ** 3, ti: 1024 ** 4, tib: 1024 ** 4 };
  const mult = pow[unit];
  if (mult === undefined) throw new ConfigError(`${what}: unknown unit "${m[2]}" in "${value}"`);
  return Math.floor(n * mult);
}

/** "all-linear" → every Llama linear; otherwise a comma list / array of known module names. */
export function parseTargetModules(value: unknown, what: string): LoraTarget[] {
  let names: string[];
  if (typeof value === 'string') names = value.split(',').map((s) => s.trim()).filter((s) => s.length > 0);
  else if (Array.isArray(value) && value.every((v) => typeof v === 'string')) names = value as string[];
  else throw new ConfigError(`${what}: expected a list of module names, got ${JSON.stringify(value)}`);
  if (names.length === 1 && names[0] === 'all-linear') return [...LORA_TARGETS];
  if (names.length === 0) throw new ConfigError(`${what}: empty target module list`);
  const out: LoraTarget[] = [];
  for (const n of names) {
    if (!(ALL_TARGETS as readonly string[]).includes(n)) {
      throw new ConfigError(`${what}: unknown target module "${n}"; expected ${ALL_TARGETS.join(', ')} or all-linear`);
    }
    if (!out.includes(n as LoraTarget)) out.push(n as LoraTarget);
  }
  // fixed order so parameter order never depends on how the user listed them
  return ALL_TARGETS.filter((t) => out.includes(t));
}

/** The source name of flags: their errors name the flag as typed (`--learning-rate`), not the key. */
export const COMMAND_LINE = 'command line';

function parseValue(spec: ConfigKeySpec, raw: unknown, source: string): unknown {
  const what = source === COMMAND_LINE ? `--${kebab(spec.key)}` : `${source}: ${spec.key}`;
  if (raw === null && spec.nullable) return null;
  switch (spec.kind) {
    case 'int':
    case 'float': {
      const n = typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : raw;
      if (typeof n !== 'number' || !Number.isFinite(n)) throw new ConfigError(`${what}: expected a number, got ${JSON.stringify(raw)}`);
      if (spec.kind === 'int' && !Number.isInteger(n)) throw new ConfigError(`${what}: expected an integer, got ${n}`);
      if (spec.min !== undefined && (spec.minExclusive ? n <= spec.min : n < spec.min)) {
        throw new ConfigError(`${what}: must be ${spec.minExclusive ? '>' : '>='} ${spec.min}, got ${n}`);
      }
      if (spec.max !== undefined && n > spec.max) throw new ConfigError(`${what}: must be <= ${spec.max}, got ${n}`);
      return n;
    }
    case 'bool':
      if (typeof raw === 'boolean') return raw;
      if (raw === 'true' || raw === '1') return true;
      if (raw === 'false' || raw === '0') return false;
      throw new ConfigError(`${what}: expected true or false, got ${JSON.stringify(raw)}`);
    case 'string':
    case 'path':
      if (typeof raw !== 'string' || (spec.kind === 'path' && raw === '')) throw new ConfigError(`${what}: expected a ${spec.kind === 'path' ? 'non-empty path' : 'string'}, got ${JSON.stringify(raw)}`);
      return raw;
    case 'enum':
      if (typeof raw !== 'string' || !spec.values!.includes(raw)) {
        throw new ConfigError(`${what}: expected one of ${spec.values!.join(', ')}, got ${JSON.stringify(raw)}`);
      }
      return raw;
    case 'targets':
      return parseTargetModules(raw, what);
    case 'bytes': {
      const b = parseBytes(raw, what);
      if (spec.min !== undefined && b < spec.min) throw new ConfigError(`${what}: must be >= ${spec.min} bytes, got ${b}`);
      return b;
    }
    case 'steps': {
      const n = typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : raw;
      if (typeof n !== 'number' || !Number.isFinite(n) || n <= 0) throw new ConfigError(`${what}: expected a positive number of steps or a fraction < 1 of the total, got ${JSON.stringify(raw)}`);
      if (n >= 1 && !Number.isInteger(n)) throw new ConfigError(`${what}: a value >= 1 is a number of steps and must be an integer, got ${n}`);
      return n;
    }
    case 'report':
      return parseReportTo(raw, what);
    case 'init':
      if (raw === true || raw === 'true') return true;
      if (raw === 'gaussian') return 'gaussian';
      throw new ConfigError(`${what}: expected true or "gaussian", got ${JSON.stringify(raw)}`);
  }
}

/** HF report_to: "none", "all", one integration or a list of them. Integrations swarmtune does not write
 *  (wandb, mlflow, …) are refused rather than silently dropped. */
export function parseReportTo(value: unknown, what: string): ReportIntegration[] {
  let names: string[];
  if (typeof value === 'string') names = value.split(',').map((x) => x.trim()).filter((x) => x !== '');
  else if (Array.isArray(value) && value.every((v) => typeof v === 'string')) names = value as string[];
  else throw new ConfigError(`${what}: expected "none", "all", "tensorboard" or a list of them, got ${JSON.stringify(value)}`);
  const out = new Set<ReportIntegration>();
  for (const n of names) {
    if (n === 'none') continue;
    if (n === 'all') { for (const r of REPORT_INTEGRATIONS) out.add(r); continue; }
    if (!(REPORT_INTEGRATIONS as readonly string[]).includes(n)) {
      throw new ConfigError(`${what}: "${n}" is not supported; swarmtune writes ${REPORT_INTEGRATIONS.join(', ')} (and always training_log.jsonl); use none, all or tensorboard`);
    }
    out.add(n as ReportIntegration);
  }
  if (names.includes('none') && out.size > 0) throw new ConfigError(`${what}: "none" cannot be combined with ${[...out].join(', ')}`);
  return [...out];
}

const SPEC_BY_KEY = new Map(TRAIN_CONFIG_KEYS.map((s) => [s.key as string, s]));

/** Apply snake_case overrides onto a config; unknown keys are an error naming the source. */
export function applyConfigOverrides(base: TrainConfig, overrides: Record<string, unknown>, source: string): TrainConfig {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(overrides)) {
    if (v === undefined) continue;
    const spec = SPEC_BY_KEY.get(k);
    if (!spec) {
      const near = [...SPEC_BY_KEY.keys()].filter((x) => x.includes(k) || k.includes(x)).slice(0, 3);
      throw new ConfigError(`${source}: unknown key "${k}"${near.length ? ` (did you mean ${near.join(', ')}?)` : ''}`);
    }
    out[k] = parseValue(spec, v, source);
  }
  return out as unknown as TrainConfig;
}

/** Checks that involve several keys. */
export function validateTrainConfig(cfg: TrainConfig): TrainConfig {
  if (cfg.adam_beta1 >= 1) throw new ConfigError(`adam_beta1 must be < 1, got ${cfg.adam_beta1}`);
  if (cfg.adam_beta2 >= 1) throw new ConfigError(`adam_beta2 must be < 1, got ${cfg.adam_beta2}`);
  if (cfg.lora_dropout >= 1) throw new ConfigError(`lora_dropout must be < 1, got ${cfg.lora_dropout}`);
  if (cfg.optim_resident_bytes !== null && !cfg.optim.startsWith('paged_')) {
    throw new ConfigError(`optim_resident_bytes applies to paged optimizers only (paged_adamw_32bit, paged_adamw_8bit); optim is ${cfg.optim}`);
  }
  if (cfg.eval_strategy !== 'no' && cfg.eval_data === null) {
    throw new ConfigError(`eval_strategy ${cfg.eval_strategy} needs eval_data (--eval-data FILE): there is nothing to evaluate on`);
  }
  if (cfg.load_best_model_at_end) {
    if (cfg.eval_strategy === 'no') throw new ConfigError('load_best_model_at_end needs an eval_strategy (steps or epoch) and eval_data: without evaluations there is no best checkpoint');
    // transformers TrainingArguments' own constraint: the best evaluated step must have a checkpoint
    if (cfg.save_strategy !== cfg.eval_strategy) {
      throw new ConfigError(`load_best_model_at_end requires the save and eval strategy to match, but found eval_strategy ${cfg.eval_strategy} and save_strategy ${cfg.save_strategy}`);
    }
    const evalSteps = cfg.eval_steps ?? cfg.logging_steps;
    if (cfg.eval_strategy === 'steps' && evalSteps >= 1 && cfg.save_steps % evalSteps !== 0) {
      throw new ConfigError(`load_best_model_at_end requires the saving steps to be a round multiple of the evaluation steps, but found save_steps ${cfg.save_steps}, which is not a round multiple of eval_steps ${evalSteps}`);
    }
  }
  return cfg;
}

/** Read run.json: an object of snake_case keys. */
export function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(`config ${file}: cannot read (${(e as Error).message})`);
  }
  let obj: unknown;
  try {
    obj = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`config ${file}: invalid JSON (${(e as Error).message})`);
  }
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) throw new ConfigError(`config ${file}: expected a JSON object of snake_case keys`);
  return obj as Record<string, unknown>;
}

/** defaults < config file < flags. `flags` uses snake_case keys (the CLI converts kebab-case). */
export function resolveTrainConfig(opts: { configFile?: string | null; flags?: Record<string, unknown> }): TrainConfig {
  let cfg: TrainConfig = { ...DEFAULT_TRAIN_CONFIG, target_modules: [...DEFAULT_TRAIN_CONFIG.target_modules] };
  if (opts.configFile) cfg = applyConfigOverrides(cfg, readConfigFile(opts.configFile), `config ${opts.configFile}`);
  if (opts.flags) cfg = applyConfigOverrides(cfg, opts.flags, COMMAND_LINE);
  return validateTrainConfig(cfg);
}

export function loraConfigOf(cfg: TrainConfig): LoraConfig {
  return {
    r: cfg.lora_r,
    loraAlpha: cfg.lora_alpha,
    loraDropout: cfg.lora_dropout,
    targetModules: [...cfg.target_modules],
    useRslora: cfg.use_rslora,
    initLoraWeights: cfg.init_lora_weights,
  };
}

export function kebab(key: string): string {
  return key.replace(/_/g, '-');
}
