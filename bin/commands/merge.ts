// `swarmtune merge`: flags of the merge task (engine/tasks/merge.ts), progress on a terminal, the written files on stdout.
import type { Command } from 'commander';
import { mergeAdapter } from '../../engine/tasks/merge.ts';
import { action, UsageError } from '../errors.ts';
import { modelDirArg } from '../args.ts';

export function registerMerge(program: Command): void {
  program.command('merge')
    .description('merge a LoRA adapter into its (dequantized) base model and write a Hugging Face model dir')
    .requiredOption('--model <dir>', 'base model dir (full precision or bitsandbytes NF4), or tiny (the embedded demo model)')
    .requiredOption('--adapter <dir>', 'PEFT adapter dir (adapter_config.json + adapter_model.safetensors)')
    .requiredOption('--out <dir>', 'where to write the merged model')
    .option('--dtype <dtype>', 'bf16 or f32', 'bf16')
    .option('--device <device>', 'auto, cpu or ref (for dequantization and the B·A products)', 'auto')
    .action(action('merge', async (opts: { model: string; adapter: string; out: string; dtype: string; device: string }) => {
      if (opts.dtype !== 'bf16' && opts.dtype !== 'f32') throw new UsageError(`--dtype must be bf16 or f32, got "${opts.dtype}"`);
      const model = await modelDirArg('--model', opts.model);
      const files = await mergeAdapter({ ...opts, model, dtype: opts.dtype,
        onProgress: (d, n) => { if (process.stderr.isTTY) process.stderr.write(`\rmerging ${d}/${n}`); } });
      if (process.stderr.isTTY) process.stderr.write('\n');
      console.log(`merged ${opts.adapter} into ${opts.model}: ${opts.out} (${files.join(', ')})`);
    }));
}
