// A run's identity: the fingerprint of what defines its result (model and data content, the training keys
// that change the numbers), the check a relaunch on an existing data dir must pass, and training_args.json.
import { createReadStream } from 'node:fs';
import { open, readdir, stat } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { DEFAULT_TRAIN_CONFIG, TRAIN_CONFIG_KEYS, applyConfigOverrides, kebab, validateTrainConfig } from '../engine/train/config.ts';
import type { TrainConfig } from '../engine/train/config.ts';

/** The training keys whose value changes the trained adapter. Left out on purpose: where files go
 *  (output_dir), when to log or checkpoint (logging_steps, save_*), how memory is used
 *  (gradient_checkpointing recomputes the same numbers, optim_*_bytes page the same state), the local
 *  device and the output format (device, json), and model/data/init_adapter, which count by content. */
export const RESULT_KEYS = [
  'num_train_epochs', 'max_steps', 'per_device_train_batch_size', 'gradient_accumulation_steps',
  'learning_rate', 'lr_scheduler_type', 'warmup_ratio', 'warmup_steps', 'max_grad_norm', 'weight_decay',
  'adam_beta1', 'adam_beta2', 'adam_epsilon', 'seed', 'shuffle', 'lora_r', 'lora_alpha', 'lora_dropout',
  'target_modules', 'use_rslora', 'init_lora_weights', 'optim', 'max_seq_length', 'system_prompt',
  'completion_only_loss', 'assistant_only_loss', 'skip_bad_lines', 'bnb_4bit_use_double_quant', 'packing',
] as const satisfies ReadonlyArray<keyof TrainConfig>;

/** What defines a run, stored in its meta when it is created. */
export interface RunFingerprint {
  version: 1;
  /** the paths as given (shown to the user; the hashes are what count) */
  model: string;
  data: string;
  /** config.json, the tokenizer files and every safetensors header (names, dtypes, shapes, sizes) */
  model_sha256: string;
  /** the quantized weights' content: sha256 over the shard blobs' sha256s (null until published) */
  weights_sha256: string | null;
  /** the data file's bytes */
  data_sha256: string;
  /** --init-adapter's adapter_model.safetensors bytes */
  init_adapter_sha256: string | null;
  /** activation/gradient wire format (bf16 and int8 round the numbers) */
  wire_dtype: string;
  config: Record<string, unknown>;
}

/** A relaunch whose settings differ from the run its data dir holds. */
export class RunMismatchError extends Error {
  override readonly name = 'RunMismatchError';
}

/** --resume on a data dir that holds no run, or a stored run that can no longer be continued as stored. */
export class ResumeError extends Error {
  override readonly name = 'ResumeError';
}

export async function fileSha256(file: string, opts: { signal?: AbortSignal } = {}): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { signal: opts.signal })) h.update(chunk as Buffer);
  return h.digest('hex');
}

const MODEL_TEXT_FILES = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja'];

/** sha256 over what shapes the model without reading its weights: config.json, the tokenizer files,
 *  and each safetensors file's header and size (the weights' own content is `weights_sha256`). */
export async function modelSha256(dir: string): Promise<string> {
  const h = createHash('sha256');
  const files = (await readdir(dir)).sort();
  for (const f of files) {
    const p = path.join(dir, f);
    if (MODEL_TEXT_FILES.includes(f)) {
      h.update(`\0${f}\0`).update(await fileSha256(p));
    } else if (f.endsWith('.safetensors')) {
      const size = (await stat(p)).size;
      const fh = await open(p, 'r');
      try {
        const len = Buffer.alloc(8);
        await fh.read(len, 0, 8, 0);
        const n = Math.min(Number(len.readBigUInt64LE(0)), Math.max(0, size - 8));
        const header = Buffer.alloc(n);
        await fh.read(header, 0, n, 8);
        h.update(`\0${f}\0${size}\0`).update(header);
      } finally {
        await fh.close();
      }
    }
  }
  return h.digest('hex');
}

export function resultConfig(train: TrainConfig): Record<string, unknown> {
  return Object.fromEntries(RESULT_KEYS.map((k) => [k, train[k]]));
}

const short = (sha: string | null) => (sha === null ? 'none' : `${sha.slice(0, 8)}…`);
const show = (v: unknown) => (Array.isArray(v) ? v.join(',') : typeof v === 'string' ? (v.length > 40 ? JSON.stringify(`${v.slice(0, 37)}...`) : v) : String(v));

/** What differs between the stored run and the one asked for, each side as `key=value` in the user's words. */
export function fingerprintDiff(stored: RunFingerprint, asked: RunFingerprint): Array<{ key: string; stored: string; asked: string }> {
  const out: Array<{ key: string; stored: string; asked: string }> = [];
  if (stored.model_sha256 !== asked.model_sha256 || (stored.weights_sha256 !== null && asked.weights_sha256 !== null && stored.weights_sha256 !== asked.weights_sha256)) {
    const sha = (f: RunFingerprint) => short(f.weights_sha256 !== null && stored.model_sha256 === asked.model_sha256 ? f.weights_sha256 : f.model_sha256);
    out.push({ key: 'model', stored: `model=${path.basename(stored.model)} (sha256 ${sha(stored)})`, asked: `model=${path.basename(asked.model)} (sha256 ${sha(asked)})` });
  }
  if (stored.data_sha256 !== asked.data_sha256) {
    out.push({ key: 'data', stored: `data=${path.basename(stored.data)} (sha256 ${short(stored.data_sha256)})`, asked: `data=${path.basename(asked.data)} (sha256 ${short(asked.data_sha256)})` });
  }
  if (stored.init_adapter_sha256 !== asked.init_adapter_sha256) {
    out.push({ key: 'init_adapter', stored: `init_adapter=${short(stored.init_adapter_sha256)}`, asked: `init_adapter=${short(asked.init_adapter_sha256)}` });
  }
  if (stored.wire_dtype !== asked.wire_dtype) out.push({ key: 'wire_dtype', stored: `wire_dtype=${stored.wire_dtype}`, asked: `wire_dtype=${asked.wire_dtype}` });
  for (const k of RESULT_KEYS) {
    const a = JSON.stringify(stored.config[k]), b = JSON.stringify(asked.config[k]);
    if (a !== b) out.push({ key: k, stored: `${k}=${show(stored.config[k])}`, asked: `${k}=${show(asked.config[k])}` });
  }
  return out;
}

/** The one line a refused relaunch prints. */
export function mismatchMessage(o: { runId: string; step: number; totalSteps: number; diff: ReturnType<typeof fingerprintDiff> }): string {
  return `this data dir holds run ${o.runId.slice(0, 8)}… (step ${o.step} of ${o.totalSteps}) trained with ${o.diff.map((d) => d.stored).join(', ')}; ` +
    `you asked for ${o.diff.map((d) => d.asked).join(', ')}: relaunch with the same settings, pass --resume to continue it with its stored config, or use a new --data-dir`;
}

/** The stored run's training config, validated again (a store written by another version fails here, naming the key). */
export function storedTrainConfig(stored: Record<string, unknown>): TrainConfig {
  const known = new Set<string>(TRAIN_CONFIG_KEYS.map((s) => s.key));
  const picked = Object.fromEntries(Object.entries(stored).filter(([k]) => known.has(k)));
  return validateTrainConfig(applyConfigOverrides({ ...DEFAULT_TRAIN_CONFIG, target_modules: [...DEFAULT_TRAIN_CONFIG.target_modules] }, picked, 'the stored run config'));
}

/** The flags (as the user typed them) whose values --resume ignores because the stored run's differ. */
export function ignoredFlags(stored: TrainConfig, asked: TrainConfig, given: Record<string, unknown>): string[] {
  return Object.keys(given).filter((k) => k !== 'json' && JSON.stringify(stored[k as keyof TrainConfig]) !== JSON.stringify(asked[k as keyof TrainConfig])).map((k) => `--${kebab(k)}`);
}

/** training_args.json: every training key of the run, snake_case as TrainingArguments.to_json_string()
 *  writes them, and as `--config` reads them back: `swarmtune launch --config training_args.json`
 *  reproduces the run (with the same model and data files). */
export function trainingArgs(train: TrainConfig): Record<string, unknown> {
  return Object.fromEntries(TRAIN_CONFIG_KEYS.map((s) => [s.key, s.key === 'json' ? false : train[s.key]]));
}

/** One line of the stored config for `status`: the result keys and the content hashes. */
export function describeRun(f: RunFingerprint): string {
  return [
    `model=${f.model} (sha256 ${short(f.weights_sha256 ?? f.model_sha256)})`, `data=${f.data} (sha256 ${short(f.data_sha256)})`,
    ...(f.init_adapter_sha256 !== null ? [`init_adapter sha256 ${short(f.init_adapter_sha256)}`] : []), `wire_dtype=${f.wire_dtype}`,
    ...RESULT_KEYS.map((k) => `${k}=${show(f.config[k])}`),
  ].join(', ');
}
