// `swarmtune train` and `swarmtune plan`: flag parsing (kebab-case = run.json snake_case keys), wiring of model
// dir, tokenizer, data and backend into the Trainer, progress/JSON output and Ctrl-C handling.
import { existsSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Command } from 'commander';
import type { Backend } from '../backend.ts';
import type { LlamaConfig } from '../types.ts';
import { parseLlamaConfig } from '../formats/config.ts';
import { openModelDir } from '../formats/model-dir.ts';
import { ConfigError, DEFAULT_TRAIN_CONFIG, TRAIN_CONFIG_KEYS, kebab, parseBytes, parseTargetModules, resolveTrainConfig } from './config.ts';
import { OPTIM_NAMES } from '../optimizer.ts';
import type { TrainConfig } from './config.ts';
import type { OptimName } from '../optimizer.ts';
import { loadDataset } from './data.ts';
import { Trainer } from './trainer.ts';
import type { StepEvent } from './trainer.ts';
import { stageMemoryBytes, suggestBatch, trainableParamsLine, baseParamCount } from './plan.ts';
import type { StageMemory } from './plan.ts';

function camel(key: string): string {
  return key.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Model dir "tiny" = the embedded demo model; data "tiny" = its bundled QA set. */
async function resolveTiny(cfg: TrainConfig): Promise<{ model: string; data: string }> {
  if (!cfg.model) throw new ConfigError('--model is required (an HF model directory, or "tiny" for the embedded demo model)');
  if (!cfg.data) throw new ConfigError('--data is required (a JSONL file, or "tiny" for the bundled QA set)');
  let { model, data } = cfg as { model: string; data: string };
  if (model === 'tiny' || data === 'tiny') {
    const tiny = await import('../tiny/index.ts');
    if (model === 'tiny') model = await tiny.ensureTinyModel();
    if (data === 'tiny') data = tiny.TINY_DATASET_PATH;
  }
  return { model, data };
}

/** The Backend for --device: createBackend's choice (auto falls back to the reference backend, saying
 *  so, when the native addon is not built). */
export async function trainBackend(device: string): Promise<Backend> {
  const { createBackend } = await import('../backends/index.ts');
  return createBackend(device as 'auto' | 'cpu' | 'ref' | 'cuda');
}

function fmtDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '?';
  const s = Math.round(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

function progressLine(e: StepEvent, totalSteps: number, elapsedMs: number, stepsDone: number): string {
  const width = 20;
  const filled = Math.round(width * e.step / totalSteps);
  const etaMs = stepsDone > 0 ? elapsedMs / stepsDone * (totalSteps - e.step) : Number.NaN;
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] step ${e.step}/${totalSteps} | loss ${e.loss.toFixed(4)} | lr ${e.lr.toExponential(2)} | ${Math.round(e.tokens_per_s)} tok/s | ETA ${fmtDuration(etaMs)}`;
}

export async function runTrainCommand(cfg: TrainConfig): Promise<number> {
  const { model, data } = await resolveTiny(cfg);
  const md = await openModelDir(model, { doubleQuant: cfg.bnb_4bit_use_double_quant });
  try {
    if (!md.tokenizer) throw new ConfigError(`${model}: no tokenizer.json; training needs the model's tokenizer`);
    const tok = md.tokenizer;
    const ds = loadDataset(data, tok, {
      maxSeqLength: cfg.max_seq_length, systemPrompt: cfg.system_prompt, completionOnlyLoss: cfg.completion_only_loss,
      skipBadLines: cfg.skip_bad_lines,
    });
    const info = (line: string): void => {
      if (cfg.json) process.stderr.write(line + '\n');
      else process.stdout.write(line + '\n');
    };
    info(`data: ${ds.examples.length} examples from ${data}${ds.skipped.length ? `, ${ds.skipped.length} bad lines skipped` : ''}${ds.truncated ? `, ${ds.truncated} truncated at ${cfg.max_seq_length} tokens` : ''}`);
    const padId = tok.padTokenId ?? md.config.padTokenId ?? tok.eosTokenId;
    if (padId === null) throw new ConfigError(`${model}: tokenizer has neither a pad nor an eos token to pad micro-batches with`);
    const backend = await trainBackend(cfg.device);
    const controller = new AbortController();
    let sigints = 0;
    const onSigint = (): void => {
      sigints++;
      if (sigints === 1) {
        process.stderr.write('\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to quit without saving)\n');
        controller.abort();
      } else process.exit(130);
    };
    process.on('SIGINT', onSigint);
    const tty = process.stderr.isTTY === true;
    let firstStep = -1;
    try {
      const trainer = new Trainer({
        config: cfg, modelConfig: md.config, weights: md.weights, backend, examples: ds.examples, padId, baseModelName: model,
      });
      const result = await trainer.run({
        info,
        signal: controller.signal,
        onStep: (e, p) => {
          if (firstStep < 0) firstStep = e.step - 1;
          if (cfg.json) {
            process.stdout.write(JSON.stringify({ event: 'step', step: e.step, loss: e.loss, lr: e.lr, grad_norm: e.grad_norm, tokens_per_s: e.tokens_per_s }) + '\n');
          }
          const line = progressLine(e, p.totalSteps, p.elapsedMs, e.step - firstStep);
          if (tty) process.stderr.write(`\r${line}\x1b[K${e.step === p.totalSteps ? '\n' : ''}`);
          else if (e.step % cfg.logging_steps === 0 || e.step === p.totalSteps) process.stderr.write(line + '\n');
        },
      });
      if (tty) process.stderr.write('\n');
      if (result.interrupted) {
        info(`interrupted at step ${result.globalStep}/${result.totalSteps}; checkpoint ${result.checkpoints.at(-1)} (resume with --resume-from-checkpoint)`);
        return 130;
      }
      info(`done: ${result.globalStep} steps, final loss ${result.lastLoss.toFixed(4)}; adapter in ${result.adapterDir}`);
      return 0;
    } finally {
      process.off('SIGINT', onSigint);
      backend.dispose();
    }
  } finally {
    await md.close();
  }
}

/** Register every TrainConfig key as a flag: --kebab-case <value>, booleans as --x / --no-x. */
function addTrainFlags(cmd: Command): void {
  cmd.option('--config <file>', 'run.json with the same keys in snake_case (flags override it)');
  for (const spec of TRAIN_CONFIG_KEYS) {
    const flag = kebab(spec.key);
    const def = DEFAULT_TRAIN_CONFIG[spec.key];
    const defText = Array.isArray(def) ? def.join(',') : String(def);
    if (spec.kind === 'bool') {
      cmd.option(`--${flag}`, `${spec.help} (default ${defText})`);
      cmd.option(`--no-${flag}`, `disable --${flag}`);
    } else {
      const choices = spec.values ? ` [${spec.values.join('|')}]` : '';
      cmd.option(`--${flag} <value>`, `${spec.help}${choices} (default ${defText})`);
    }
  }
}

function flagsToSnake(opts: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const spec of TRAIN_CONFIG_KEYS) {
    const v = opts[camel(spec.key)];
    if (v !== undefined) out[spec.key] = v;
  }
  return out;
}

/** Parse argv-style flags into a TrainConfig (what `swarmtune train` does before training; used by tests). */
export function trainConfigFromOptions(opts: Record<string, unknown>): TrainConfig {
  return resolveTrainConfig({ configFile: (opts.config as string | undefined) ?? null, flags: flagsToSnake(opts) });
}

async function readPlanConfig(model: string): Promise<LlamaConfig> {
  const path = existsSync(model) && statSync(model).isDirectory() ? join(model, 'config.json') : model;
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new ConfigError(`--model ${model}: no config.json there (give a model dir or a config.json file)`);
  }
  return parseLlamaConfig(JSON.parse(text), path);
}

function gib(b: number): string {
  return `${(b / 2 ** 30).toFixed(2)} GiB`;
}

export interface PlanReport {
  model: string;
  trainable_params: number;
  all_params: number;
  trainable_line: string;
  micro_batch: number;
  seq_len: number;
  memory: StageMemory;
  memory_without_double_quant_bytes: number;
  quant_constants_without_double_quant_bytes: number;
  gpu_memory_bytes: number | null;
  suggestion: { per_device_train_batch_size: number; gradient_accumulation_steps: number; fits: boolean } | null;
}

export async function planReport(o: { model: string; gpuMemory?: string; perDeviceTrainBatchSize?: string; maxSeqLength?: string; loraR?: string; targetModules?: string; optim?: string; gradientCheckpointing?: boolean }): Promise<PlanReport> {
  const cfg = await readPlanConfig(o.model);
  const r = o.loraR !== undefined ? Number(o.loraR) : 16;
  if (!Number.isInteger(r) || r < 1) throw new ConfigError(`--lora-r must be a positive integer, got ${o.loraR}`);
  const mb = o.perDeviceTrainBatchSize !== undefined ? Number(o.perDeviceTrainBatchSize) : 1;
  if (!Number.isInteger(mb) || mb < 1) throw new ConfigError(`--per-device-train-batch-size must be a positive integer, got ${o.perDeviceTrainBatchSize}`);
  const seq = o.maxSeqLength !== undefined ? Number(o.maxSeqLength) : 512;
  if (!Number.isInteger(seq) || seq < 2) throw new ConfigError(`--max-seq-length must be an integer >= 2, got ${o.maxSeqLength}`);
  const targets = parseTargetModules(o.targetModules ?? 'all-linear', '--target-modules');
  const optim = (o.optim ?? 'paged_adamw_32bit') as OptimName;
  if (!OPTIM_NAMES.includes(optim)) throw new ConfigError(`--optim must be one of ${OPTIM_NAMES.join(', ')}, got ${optim}`);
  const base = {
    layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: { r, targetModules: targets }, seqLen: seq, optim,
    gradientCheckpointing: o.gradientCheckpointing ?? true,
  };
  const memory = stageMemoryBytes(cfg, { ...base, microBatch: mb });
  const noDq = stageMemoryBytes(cfg, { ...base, microBatch: mb, doubleQuant: false });
  const gpu = o.gpuMemory !== undefined ? parseBytes(o.gpuMemory, '--gpu-memory') : null;
  const s = gpu !== null ? suggestBatch(cfg, base, gpu, 16) : null;
  const all = baseParamCount(cfg) + memory.trainableParams;
  return {
    model: o.model, trainable_params: memory.trainableParams, all_params: all,
    trainable_line: trainableParamsLine(memory.trainableParams, all), micro_batch: mb, seq_len: seq, memory,
    memory_without_double_quant_bytes: noDq.totalBytes, quant_constants_without_double_quant_bytes: noDq.quantConstantsBytes,
    gpu_memory_bytes: gpu,
    suggestion: s ? { per_device_train_batch_size: s.microBatch, gradient_accumulation_steps: s.gradientAccumulationSteps, fits: s.fits } : null,
  };
}

function printPlan(p: PlanReport): void {
  const m = p.memory;
  const rows: [string, number][] = [
    ['NF4 weights (packed 4-bit)', m.nf4WeightsBytes],
    ['quantization constants (double quant)', m.quantConstantsBytes],
    ['  (without double quant: fp32 absmax)', p.quant_constants_without_double_quant_bytes],
    ['embeddings (bf16)', m.embeddingsBytes],
    ['lm_head (bf16)', m.lmHeadBytes],
    ['norms (fp32)', m.normsBytes],
    ['LoRA weights (fp32)', m.loraWeightsBytes],
    ['LoRA grads (fp32)', m.loraGradsBytes],
    ['optimizer state on device', m.optimizerBytes],
    [`activations (batch ${p.micro_batch} x ${p.seq_len}, checkpointing)`, m.activationsBytes],
    ['workspace (largest dequantized linear)', m.workspaceBytes],
  ];
  console.log(p.trainable_line);
  for (const [k, v] of rows) console.log(`  ${k.padEnd(52)} ${gib(v).padStart(12)}`);
  if (m.optimizerHostBytes > 0) console.log(`  ${'optimizer state in host pages (paged)'.padEnd(52)} ${gib(m.optimizerHostBytes).padStart(12)}`);
  console.log(`  ${'total on device'.padEnd(52)} ${gib(m.totalBytes).padStart(12)}`);
  console.log(`  ${'total without double quantization'.padEnd(52)} ${gib(p.memory_without_double_quant_bytes).padStart(12)}`);
  if (p.suggestion && p.gpu_memory_bytes !== null) {
    const s = p.suggestion;
    console.log(s.fits
      ? `suggested for ${gib(p.gpu_memory_bytes)}: --per-device-train-batch-size ${s.per_device_train_batch_size} --gradient-accumulation-steps ${s.gradient_accumulation_steps} (effective batch ${s.per_device_train_batch_size * s.gradient_accumulation_steps})`
      : `does not fit in ${gib(p.gpu_memory_bytes)} even at micro-batch 1: split it across volunteers (swarmtune launch) or shorten --max-seq-length`);
  }
}

export function registerTrainCommands(program: Command): void {
  const train = program.command('train')
    .description('fine-tune a QLoRA adapter on this machine (the same engine as the swarm)');
  addTrainFlags(train);
  train.action(async (opts: Record<string, unknown>) => {
    try {
      process.exitCode = await runTrainCommand(trainConfigFromOptions(opts));
    } catch (e) {
      process.stderr.write(`swarmtune train: ${(e as Error).name}: ${(e as Error).message}\n`);
      process.exitCode = 1;
    }
  });

  program.command('plan')
    .description('memory by component, trainable parameters and a suggested micro-batch for QLoRA training')
    .requiredOption('--model <dir|config.json>', 'HF model directory or its config.json')
    .option('--gpu-memory <size>', 'memory of one GPU, e.g. 24GiB; enables the batch suggestion')
    .option('--per-device-train-batch-size <n>', 'micro-batch for the memory table (default 1)')
    .option('--max-seq-length <n>', 'sequence length (default 512)')
    .option('--lora-r <n>', 'LoRA rank (default 16)')
    .option('--target-modules <list>', 'comma list or all-linear (default all-linear)')
    .option('--optim <name>', `${OPTIM_NAMES.join('|')} (default paged_adamw_32bit)`)
    .option('--no-gradient-checkpointing', 'keep every layer\'s activations')
    .option('--json', 'print the plan as one JSON object')
    .action(async (opts: { model: string; json?: boolean; gpuMemory?: string; perDeviceTrainBatchSize?: string; maxSeqLength?: string; loraR?: string; targetModules?: string; optim?: string; gradientCheckpointing?: boolean }) => {
      try {
        const p = await planReport(opts);
        if (opts.json) console.log(JSON.stringify(p));
        else printPlan(p);
      } catch (e) {
        process.stderr.write(`swarmtune plan: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
