// CLI commands of the coordinator: launch (run a swarm fine-tune), status and pull.
import type { Command } from 'commander';
import { TRAIN_CONFIG_KEYS } from '../engine/train/config.ts';
import { fetchStatus, formatStatus, pullToDir } from './client.ts';

function camel(kebabName: string): string {
  return kebabName.replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

function intArg(what: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${what} must be a non-negative integer, got "${v}"`);
    return n;
  };
}

/** --allow-peers: a comma list of libp2p peer ids (base58btc, as `swarmtune join` prints them). */
export function parsePeerList(v: string | undefined): string[] | null {
  if (v === undefined) return null;
  const ids = v.split(',').map((x) => x.trim()).filter((x) => x !== '');
  if (ids.length === 0) throw new Error('--allow-peers: give at least one peer id');
  for (const id of ids) if (!/^[1-9A-HJ-NP-Za-km-z]{20,128}$/.test(id)) throw new Error(`--allow-peers: "${id}" is not a peer id (base58btc, e.g. 12D3KooW…)`);
  return ids;
}

export function registerCoordinatorCommands(program: Command): void {
  const launch = program
    .command('launch')
    .description('launch a swarm fine-tune: quantize and serve the model shards, plan stages over joining peers, train, write the adapter')
    .option('--config <file>', 'run.json with snake_case training keys (flags override)')
    .option('--listen <multiaddr>', 'listen address', '/ip4/0.0.0.0/tcp/4001')
    .option('--min-peers <n>', 'peers to wait for before planning', intArg('--min-peers'), 1)
    .option('--pipeline-stages <n>', 'fixed number of pipeline stages (default: planned from peer memory)', intArg('--pipeline-stages'))
    .option('--wire-dtype <dtype>', 'activation/gradient wire format: f32, bf16 or int8', 'f32')
    .option('--private', 'admit only peers presenting the printed join token')
    .option('--allow-peers <ids>', 'private run: admit only these peer ids (comma list), with the token too when --private is set')
    .option('--public-pull', 'a private run\'s adapter may still be pulled by anyone')
    .option('--exit-on-finish', 'exit when training ends instead of serving pulls')
    .option('--dashboard <port>', 'serve the live dashboard on this port', intArg('--dashboard'))
    .option('--data-dir <dir>', 'coordinator state (identity, LevelDB, blobs); default <output-dir>/coordinator');
  // the trainer's keys, as the same kebab-case flags `swarmtune train` takes
  for (const spec of TRAIN_CONFIG_KEYS) {
    const flag = spec.key.replace(/_/g, '-');
    if (spec.kind === 'bool') {
      launch.option(`--${flag}`, spec.help);
      launch.option(`--no-${flag}`, `disable ${flag}`);
    } else {
      launch.option(`--${flag} <value>`, spec.help);
    }
  }
  launch.action(async (opts: Record<string, unknown>) => {
    const flags: Record<string, unknown> = {};
    for (const spec of TRAIN_CONFIG_KEYS) {
      const v = opts[camel(spec.key.replace(/_/g, '-'))];
      if (v !== undefined) flags[spec.key] = v;
    }
    const { launchRun } = await import('./launch.ts');
    const wire = String(opts.wireDtype);
    if (wire !== 'f32' && wire !== 'bf16' && wire !== 'int8') throw new Error(`--wire-dtype must be f32, bf16 or int8, got "${wire}"`);
    process.exitCode = await launchRun({
      configFile: (opts.config as string | undefined) ?? null,
      flags,
      listen: String(opts.listen),
      minPeers: Math.max(1, opts.minPeers as number),
      pipelineStages: opts.pipelineStages as number | undefined,
      wireCodec: wire,
      private: opts.private === true,
      allowPeers: parsePeerList(opts.allowPeers as string | undefined),
      publicPull: opts.publicPull === true,
      exitOnFinish: opts.exitOnFinish === true,
      dashboardPort: opts.dashboard as number | undefined,
      dataDir: (opts.dataDir as string | undefined) ?? null,
    });
  });

  program
    .command('status <multiaddr>')
    .description('show a run: peers with stage, device, throughput, health; step, loss, tokens/s')
    .option('--json', 'print the status as one JSON object')
    .action(async (addr: string, opts: { json?: boolean }) => {
      const s = await fetchStatus(addr);
      process.stdout.write((opts.json === true ? JSON.stringify(s) : formatStatus(s)) + '\n');
    });

  program
    .command('pull <multiaddr>')
    .description('download a committed adapter of a run as a PEFT adapter dir')
    .requiredOption('--out <dir>', 'output directory')
    .option('--step <n>', 'committed step to pull (default: latest)', intArg('--step'))
    .option('--token <token>', 'join token of a private run')
    .action(async (addr: string, opts: { out: string; step?: number; token?: string }) => {
      const a = await pullToDir(addr, opts.out, { step: opts.step, token: opts.token });
      process.stdout.write(`wrote the adapter of step ${a.step} (${a.tensors.length} tensors) to ${opts.out}\n`);
    });
}
