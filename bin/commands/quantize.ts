// `swarmtune quantize`: flags of the quantize task (engine/tasks/quantize.ts), progress on stderr, a summary on stdout.
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { quantizeModelDir } from '../../engine/tasks/quantize.ts';
import { checkBlocksize } from '../../engine/formats/nf4.ts';
import { action, UsageError } from '../errors.ts';
import { modelDirArg } from '../args.ts';

export function registerQuantize(program: Command): void {
  program
    .command('quantize')
    .description('write a bitsandbytes NF4 (4-bit) checkpoint of a Hugging Face model dir')
    .requiredOption('--model <dir>', 'full-precision HF model directory (config.json + safetensors), or tiny (the embedded demo model)')
    .requiredOption('--out <dir>', 'output directory')
    .option('--no-double-quant', 'keep float32 absmax (bnb_4bit_use_double_quant=false)')
    .option('--blocksize <n>', 'NF4 block size (power of two, 32..4096)', (v: string) => {
      const n = Number(v);
      try { checkBlocksize(n, '--blocksize'); } catch (e) { throw new InvalidArgumentError((e as Error).message); }
      return n;
    }, 64)
    .option('--max-shard-size <bytes>', 'split the output into shards of at most this many bytes', '5000000000')
    .action(action('quantize', async (o: { model: string; out: string; doubleQuant: boolean; blocksize: number; maxShardSize: string }) => {
      const model = await modelDirArg('--model', o.model);
      const blocksize = o.blocksize;
      const maxShardBytes = Number(o.maxShardSize);
      if (!Number.isFinite(maxShardBytes) || maxShardBytes <= 0) throw new UsageError(`--max-shard-size must be a positive number of bytes, got "${o.maxShardSize}"`);
      const startMs = Date.now();
      let lastLogMs = 0;
      const r = await quantizeModelDir(model, o.out, {
        blocksize, doubleQuant: o.doubleQuant, maxShardBytes,
        onTensor: (name, i, total) => {
          const now = Date.now();
          if (now - lastLogMs > 2000 || i === total - 1) {
            lastLogMs = now;
            process.stderr.write(`quantize: ${i + 1}/${total} ${name}\n`);
          }
        },
      });
      const gb = (b: number) => (b / 1e9).toFixed(2);
      console.log(`quantized ${r.quantized} linear weights, copied ${r.copied} tensors: ${gb(r.inputBytes)} GB → ${gb(r.outputBytes)} GB in ${((Date.now() - startMs) / 1000).toFixed(1)} s`);
      console.log(`wrote ${o.out}: ${r.files.join(', ')}, config.json`);
    }));
}
