// `swarmtune status`: a run's peers and progress, fetched and formatted by coordinator/client.ts.
import type { Command } from 'commander';
import { fetchStatus, formatStatus } from '../../coordinator/client.ts';
import { multiaddrArg } from '../args.ts';
import { action } from '../errors.ts';

export function registerStatus(program: Command): void {
  program
    .command('status <multiaddr>')
    .description('show a run: peers with stage, device, throughput, health; step, loss, tokens/s')
    .option('--json', 'print the status as one JSON object')
    .action(action('status', async (addr: string, opts: { json?: boolean }) => {
      const s = await fetchStatus(await multiaddrArg(addr));
      process.stdout.write((opts.json === true ? JSON.stringify(s) : formatStatus(s)) + '\n');
    }, (addr) => ({ address: addr })));
}
