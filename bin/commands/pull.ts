// `swarmtune pull`: download a committed adapter of a run into a PEFT adapter dir (coordinator/client.ts).
import type { Command } from 'commander';
import { pullToDir } from '../../coordinator/client.ts';
import { multiaddrArg, nonNegativeInt } from '../args.ts';
import { action } from '../errors.ts';

export function registerPull(program: Command): void {
  program
    .command('pull <multiaddr>')
    .description('download a committed adapter of a run as a PEFT adapter dir')
    .requiredOption('--out <dir>', 'output directory')
    .option('--step <n>', 'committed step to pull (default: latest)', nonNegativeInt('--step'))
    .option('--token <token>', 'join token of a private run')
    .action(action('pull', async (addr: string, opts: { out: string; step?: number; token?: string }) => {
      // the adapter dir is written only once every tensor has arrived: a failed pull leaves no --out
      const a = await pullToDir(await multiaddrArg(addr), opts.out, { step: opts.step, token: opts.token });
      process.stdout.write(`wrote the adapter of step ${a.step} (${a.tensors.length} tensors) to ${opts.out}\n`);
    }, (addr) => ({ address: addr })));
}
