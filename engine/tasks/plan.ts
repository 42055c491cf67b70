// The plan task (`swarmtune plan`): memory by component, trainable parameters and a suggested micro-batch for
// QLoRA training of a model, from its config.json and the flag values.
import { existsSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { LlamaConfig } from '../types.ts';
import { parseLlamaConfig, readConfig } from '../formats/config.ts';
import { ConfigError, parseBytes, parseTargetModules } from '../train/config.ts';
import { OPTIM_NAMES } from '../optimizer.ts';
import type { OptimName } from '../optimizer.ts';
import { stageMemoryBytes, suggestBatch, trainableParamsLine, baseParamCount } from '../train/plan.ts';
import type { StageMemory } from '../train/plan.ts';

async function readPlanConfig(model: string): Promise<LlamaConfig> {
  // a model dir is read as every command reads it (a quantize_config.json beside config.json is refused too)
  if (existsSync(model) && statSync(model).isDirectory() && existsSync(join(model, 'config.json'))) return readConfig(model);
  const path = existsSync(model) && statSync(model).isDirectory() ? join(model, 'config.json') : model;
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new ConfigError(`--model ${model}: no config.json there (give a model dir or a config.json file)`);
  }
  return parseLlamaConfig(JSON.parse(text), path);
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

/** The flag values of `swarmtune plan`, as typed (checked here, with errors naming the flag). */
export interface PlanOptions {
  model: string;
  gpuMemory?: string;
  perDeviceTrainBatchSize?: string;
  maxSeqLength?: string;
  loraR?: string;
  targetModules?: string;
  optim?: string;
  gradientCheckpointing?: boolean;
}

export async function planReport(o: PlanOptions): Promise<PlanReport> {
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
