// `swarmtune join`: the volunteer's flags, handed to runVolunteer (node/volunteer.ts); its fatal errors
// go through bin/errors.ts for their line and exit code.
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { parseBytes } from '../../node/probe.ts';
import { rootLogger } from '../log.ts';
import { multiaddrArg } from '../args.ts';
import { action, describeError } from '../errors.ts';

function sizeArg(v: string): number {
  try {
    return parseBytes(v, '--max-memory');
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
}

function secondsArg(v: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || n < 0) throw new InvalidArgumentError(`--progress-interval must be a number of seconds >= 0, got "${v}"`);
  return n;
}

export function registerJoin(program: Command): void {
  program
    .command('join <multiaddr>')
    .description('join a swarm run as a volunteer: take a stage, fetch its shard, serve forward/backward')
    .option('--token <token>', 'join token of a private run')
    .option('--device <device>', 'auto, cpu, ref or cuda:N', 'auto')
    .option('--max-memory <size>', 'memory offered for the stage, e.g. 10GiB (default: 80% of free RAM)', sizeArg)
    .option('--data-dir <dir>', 'identity and shard cache', '.swarmtune/volunteer')
    .option('--listen <multiaddr>', 'listen address for peers fetching blobs', '/ip4/0.0.0.0/tcp/0')
    .option('--progress-interval <seconds>', 'a progress line (stage, step, micro-batches served, tokens/s) at most this often while serving; 0: none', secondsArg, 10)
    .option('--json', 'print one JSON object per line for events')
    .action(action('join', async (addr: string, opts: { token?: string; device: string; maxMemory?: number; dataDir: string; listen: string; progressInterval: number; json?: boolean }) => {
      const coordinator = await multiaddrArg(addr);
      const { runVolunteer } = await import('../../node/volunteer.ts');
      return runVolunteer({
        coordinator,
        token: opts.token ?? null,
        device: opts.device,
        maxMemoryBytes: opts.maxMemory,
        dataDir: opts.dataDir,
        listen: opts.listen,
        json: opts.json === true,
        progressIntervalMs: opts.progressInterval * 1000,
        log: rootLogger().child('node'),
      }, { describeError: (e) => describeError(e, { address: addr }) });
    }, (addr) => ({ address: addr })));
}
