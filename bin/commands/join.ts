// `swarmtune join`: the volunteer's flags, handed to runVolunteer (node/volunteer.ts); its fatal errors
// go through bin/errors.ts for their line and exit code.
import type { Command } from 'commander';
import { InvalidArgumentError } from 'commander';
import { parseBytes } from '../../node/probe.ts';
import { rootLogger } from '../log.ts';
import { multiaddrArg } from '../args.ts';
import { action, describeError, UsageError } from '../errors.ts';

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
    .option('--nat', 'NAT traversal: a reservation on the coordinator\'s relay after admission, DCUtR hole punching, AutoNAT (the coordinator needs --nat)')
    .option('--announce <multiaddr>', 'with --nat: an address others can reach this peer at, e.g. the NAT\'s /ip4/<public>/tcp/<dial port> (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--dial-port <port>', 'with --nat: dial every connection from this local port (a port-preserving NAT keeps it: TCP hole punching)', (v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1 || n > 65535) throw new InvalidArgumentError(`--dial-port must be a port in [1, 65535], got "${v}"`);
      return n;
    })
    .option('--relay', 'with --nat: this peer is publicly reachable (the operator says so); serve circuit relay v2 to the run\'s admitted members only, and NAT\'d peers reserve on it besides the coordinator')
    .action(action('join', async (addr: string, opts: { token?: string; device: string; maxMemory?: number; dataDir: string; listen: string; progressInterval: number; json?: boolean; nat?: boolean; announce?: string[]; dialPort?: number; relay?: boolean }) => {
      const coordinator = await multiaddrArg(addr);
      if (opts.nat !== true && (opts.announce !== undefined || opts.dialPort !== undefined || opts.relay === true)) throw new UsageError('--announce, --dial-port and --relay need --nat');
      for (const a of opts.announce ?? []) await multiaddrArg(a);
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
        ...(opts.nat === true ? { nat: { announce: opts.announce ?? [], dialPort: opts.dialPort, relay: opts.relay === true } } : {}),
        log: rootLogger().child('node'),
      }, { describeError: (e) => describeError(e, { address: addr }) });
    }, (addr) => ({ address: addr })));
}
