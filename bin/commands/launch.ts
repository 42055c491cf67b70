// `swarmtune launch`: the organizer's flags (the run's own plus every training key), handed to launchRun (coordinator/launch.ts).
import type { Command } from 'commander';
import { rootLogger } from '../log.ts';
import { checkListenFree, dataFileArg, modelDirArg, nonNegativeInt } from '../args.ts';
import { action, UsageError } from '../errors.ts';
import { kebab, resolveTrainConfig } from '../../engine/train/config.ts';
import { addTrainFlags, trainFlagValues } from './train-flags.ts';
import { FLOAT_CODECS, isFloatCodec } from '../../protocol/tensor.ts';

/** --allow-peers: a comma list of libp2p peer ids (base58btc, as `swarmtune join` prints them). */
export function parsePeerList(v: string | undefined): string[] | null {
  if (v === undefined) return null;
  const ids = v.split(',').map((x) => x.trim()).filter((x) => x !== '');
  if (ids.length === 0) throw new UsageError('--allow-peers: give at least one peer id');
  for (const id of ids) if (!/^[1-9A-HJ-NP-Za-km-z]{20,128}$/.test(id)) throw new UsageError(`--allow-peers: "${id}" is not a peer id (base58btc, e.g. 12D3KooW…)`);
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
    .option('--wire-dtype <dtype>', `activation/gradient wire format: ${FLOAT_CODECS.join(', ')} (docs/protocol.md "Tensor codecs")`, 'f32')
    .option('--private', 'admit only peers presenting the printed join token')
    .option('--allow-peers <ids>', 'private run: admit only these peer ids (comma list), with the token too when --private is set')
    .option('--public-pull', 'a private run\'s adapter may still be pulled by anyone')
    .option('--exit-on-finish', 'exit when training ends instead of serving pulls')
    .option('--dashboard <port>', 'serve the live dashboard on this port', nonNegativeInt('--dashboard'))
    .option('--data-dir <dir>', 'coordinator state (identity, LevelDB, blobs); default <output-dir>/coordinator')
    .option('--resume', 'continue the run the data dir holds with its stored config (the training flags and --config are ignored)');
  addTrainFlags(launch, 'launch');
  launch.action(action('launch', async (opts: Record<string, unknown>) => {
    const flags = trainFlagValues(opts);
    const configFile = (opts.config as string | undefined) ?? null;
    const wire = String(opts.wireDtype);
    if (!isFloatCodec(wire)) throw new UsageError(`--wire-dtype must be one of ${FLOAT_CODECS.join(', ')}, got "${wire}"`);
    const allowPeers = parsePeerList(opts.allowPeers as string | undefined);
    // every input is checked before launchRun writes anything: the config (flags named as typed), the model
    // dir and the data file (`tiny` as in train), the listen address
    const train = resolveTrainConfig({ configFile, flags });
    const from = (key: 'model' | 'data') => (flags[key] !== undefined ? `--${kebab(key)}` : `config ${configFile}: ${key}`);
    // --resume takes the model and data from the stored run (launchRun checks them)
    if (opts.resume !== true) {
      if (train.model === null) throw new UsageError('--model is required (an HF model directory, or "tiny" for the embedded demo model)');
      if (train.data === null) throw new UsageError('--data is required (a JSONL file, or "tiny" for the bundled QA set)');
      flags.model = await modelDirArg(from('model'), train.model);
      flags.data = await dataFileArg(from('data'), train.data);
      if (train.eval_data !== null) flags.eval_data = await dataFileArg(flags.eval_data !== undefined ? '--eval-data' : `config ${configFile}: eval_data`, train.eval_data);
    }

    await checkListenFree('--listen', String(opts.listen));
    const { launchRun } = await import('../../coordinator/launch.ts');
    return launchRun({
      configFile,
      flags,
      listen: String(opts.listen),
      minPeers: Math.max(1, opts.minPeers as number),
      pipelineStages: opts.pipelineStages as number | undefined,
      wireCodec: wire,
      private: opts.private === true,
      allowPeers,
      publicPull: opts.publicPull === true,
      exitOnFinish: opts.exitOnFinish === true,
      dashboardPort: opts.dashboard as number | undefined,
      dataDir: (opts.dataDir as string | undefined) ?? null,
      resume: opts.resume === true,
      logger: rootLogger().child('coordinator'),
    });
  }));
}
