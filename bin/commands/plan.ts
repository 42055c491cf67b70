// `swarmtune plan`: flags of the plan task (engine/tasks/plan.ts) and its memory table (or --json).
import type { Command } from 'commander';
import { OPTIM_NAMES } from '../../engine/optimizer.ts';
import { planReport } from '../../engine/tasks/plan.ts';
import type { PlanOptions, PlanReport } from '../../engine/tasks/plan.ts';
import { action } from '../errors.ts';
import { modelDirArg } from '../args.ts';

function gib(b: number): string {
  return `${(b / 2 ** 30).toFixed(2)} GiB`;
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

export function registerPlan(program: Command): void {
  program.command('plan')
    .description('memory by component, trainable parameters and a suggested micro-batch for QLoRA training')
    .requiredOption('--model <dir|config.json>', 'HF model directory or its config.json, or tiny (the embedded demo model)')
    .option('--gpu-memory <size>', 'memory of one GPU, e.g. 24GiB; enables the batch suggestion')
    .option('--per-device-train-batch-size <n>', 'micro-batch for the memory table (default 1)')
    .option('--max-seq-length <n>', 'sequence length (default 512)')
    .option('--lora-r <n>', 'LoRA rank (default 16)')
    .option('--target-modules <list>', 'comma list or all-linear (default all-linear)')
    .option('--optim <name>', `${OPTIM_NAMES.join('|')} (default paged_adamw_32bit)`)
    .option('--no-gradient-checkpointing', 'keep every layer\'s activations')
    .option('--json', 'print the plan as one JSON object')
    .action(action('plan', async (opts: PlanOptions & { json?: boolean }) => {
      const p = await planReport({ ...opts, model: await modelDirArg('--model', opts.model) });
      if (opts.json) console.log(JSON.stringify(p));
      else printPlan(p);
    }));
}
