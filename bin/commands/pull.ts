// `swarmtune pull`: download a committed adapter of a run into a PEFT adapter dir (coordinator/client.ts).
import type { Command } from 'commander';
import { pullToDir } from '../../coordinator/client.ts';
import { nonNegativeInt } from '../args.ts';

export function registerPull(program: Command): void {
  program
    .command('pull <multiaddr>')
    .description('download a committed adapter of a run as a PEFT adapter dir')
    .requiredOption('--out <dir>', 'output directory')
    .option('--step <n>', 'committed step to pull (default: latest)', nonNegativeInt('--step'))
    .option('--token <token>', 'join token of a private run')
    .action(async (addr: string, opts: { out: string; step?: number; token?: string }) => {
      const a = await pullToDir(addr, opts.out, { step: opts.step, token: opts.token });
      process.stdout.write(`wrote the adapter of step ${a.step} (${a.tensors.length} tensors) to ${opts.out}\n`);
    });
}
