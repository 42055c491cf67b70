// `swarmtune launch`: the organizer's flags (the run's own plus every training key), handed to launchRun (coordinator/launch.ts).
import type { Command } from 'commander';
import { rootLogger } from '../log.ts';
import { nonNegativeInt } from '../args.ts';
import { addTrainFlags, trainFlagValues } from './train-flags.ts';

/** --allow-peers: a comma list of libp2p peer ids (base58btc, as `swarmtune join` prints them). */
export function parsePeerList(v: string | undefined): string[] | null {
  if (v === undefined) return null;
  const ids = v.split(',').map((x) => x.trim()).filter((x) => x !== '');
  if (ids.length === 0) throw new Error('--allow-peers: give at least one peer id');
  for (const id of ids) if (!/^[1-9A-HJ-NP-Za-km-z]{20,128}$/.test(id)) throw new Error(`--allow-peers: "${id}" is not a peer id (base58btc, e.g. 12D3KooW…)`);
  return ids;
}

export function registerLaunch(program: Command): void {
  const launch = program
    .command('launch')
    .description('launch a swarm fine-tune: quantize and serve the model shards, plan stages over joining peers, train, write the adapter')
    .option('--config <file>', 'run.json with snake_case training keys (flags override)')
    .option('--listen <multiaddr>', 'listen address', '/ip4/0.0.0.0/tcp/4001')
    .option('--min-peers <n>', 'peers to wait for before planning', nonNegativeInt('--min-peers'), 1)
    .option('--pipeline-stages <n>', 'fixed number of pipeline stages (default: planned from peer memory)', nonNegativeInt('--pipeline-stages'))
    .option('--wire-dtype <dtype>', 'activation/gradient wire format: f32, bf16 or int8', 'f32')
    .option('--private', 'admit only peers presenting the printed join token')
    .option('--allow-peers <ids>', 'private run: admit only these peer ids (comma list), with the token too when --private is set')
    .option('--public-pull', 'a private run\'s adapter may still be pulled by anyone')
    .option('--exit-on-finish', 'exit when training ends instead of serving pulls')
    .option('--dashboard <port>', 'serve the live dashboard on this port', nonNegativeInt('--dashboard'))
    .option('--data-dir <dir>', 'coordinator state (identity, LevelDB, blobs); default <output-dir>/coordinator')
    .option('--resume', 'continue the run the data dir holds with its stored config (the training flags and --config are ignored)');
  addTrainFlags(launch, 'launch');
  launch.action(async (opts: Record<string, unknown>) => {
    const flags = trainFlagValues(opts);
    const { launchRun } = await import('../../coordinator/launch.ts');
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
      resume: opts.resume === true,
      logger: rootLogger().child('coordinator'),
    });
  });
}
