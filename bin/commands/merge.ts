// `swarmtune merge`: flags of the merge task (engine/tasks/merge.ts), progress on a terminal, the written files on stdout.
import type { Command } from 'commander';
import { mergeAdapter } from '../../engine/tasks/merge.ts';

export function registerMerge(program: Command): void {
  program.command('merge')
    .description('merge a LoRA adapter into its (dequantized) base model and write a Hugging Face model dir')
    .requiredOption('--model <dir>', 'base model dir (full precision or bitsandbytes NF4)')
    .requiredOption('--adapter <dir>', 'PEFT adapter dir (adapter_config.json + adapter_model.safetensors)')
    .requiredOption('--out <dir>', 'where to write the merged model')
    .option('--dtype <dtype>', 'bf16 or f32', 'bf16')
    .option('--device <device>', 'auto, cpu or ref (for dequantization and the B·A products)', 'auto')
    .action(async (opts: { model: string; adapter: string; out: string; dtype: string; device: string }) => {
      try {
        const files = await mergeAdapter({ ...opts, dtype: opts.dtype as 'bf16' | 'f32',
          onProgress: (d, n) => { if (process.stderr.isTTY) process.stderr.write(`\rmerging ${d}/${n}`); } });
        if (process.stderr.isTTY) process.stderr.write('\n');
        console.log(`merged ${opts.adapter} into ${opts.model}: ${opts.out} (${files.join(', ')})`);
      } catch (e) {
        process.stderr.write(`swarmtune merge: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
