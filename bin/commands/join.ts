// `swarmtune join`: the volunteer's flags, handed to runVolunteer (node/volunteer.ts).
import type { Command } from 'commander';
import { parseBytes } from '../../node/probe.ts';
import { rootLogger } from '../log.ts';

export function registerJoin(program: Command): void {
  program
    .command('join <multiaddr>')
    .description('join a swarm run as a volunteer: take a stage, fetch its shard, serve forward/backward')
    .option('--token <token>', 'join token of a private run')
    .option('--device <device>', 'auto, cpu, ref or cuda:N', 'auto')
    .option('--max-memory <size>', 'memory offered for the stage, e.g. 10GiB (default: 80% of free RAM)')
    .option('--data-dir <dir>', 'identity and shard cache', '.swarmtune/volunteer')
    .option('--listen <multiaddr>', 'listen address for peers fetching blobs', '/ip4/0.0.0.0/tcp/0')
    .option('--json', 'print one JSON object per line for events')
    .action(async (addr: string, opts: { token?: string; device: string; maxMemory?: string; dataDir: string; listen: string; json?: boolean }) => {
      const { runVolunteer } = await import('../../node/volunteer.ts');
      process.exitCode = await runVolunteer({
        coordinator: addr,
        token: opts.token ?? null,
        device: opts.device,
        maxMemoryBytes: opts.maxMemory !== undefined ? parseBytes(opts.maxMemory, '--max-memory') : undefined,
        dataDir: opts.dataDir,
        listen: opts.listen,
        json: opts.json === true,
        log: rootLogger().child('node'),
      });
    });
}
