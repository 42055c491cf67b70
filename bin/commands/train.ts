// `swarmtune train`: the training keys as flags (plus --config), handed to the train task (engine/tasks/train.ts).
import type { Command } from 'commander';
import { runTrain } from '../../engine/tasks/train.ts';
import { action } from '../errors.ts';
import { dataFileArg } from '../args.ts';
import { addTrainFlags, trainConfigFromOptions } from './train-flags.ts';

export function registerTrain(program: Command): void {
  const train = program.command('train')
    .description('fine-tune a QLoRA adapter on this machine (the same engine as the swarm)');
  train.option('--config <file>', 'run.json with the same keys in snake_case (flags override it)');
  addTrainFlags(train, 'train');
  train.action(action('train', async (opts: Record<string, unknown>) => {
    const cfg = trainConfigFromOptions(opts);
    // the eval file is checked (and `tiny` resolved) before the model loads, as launch does
    if (cfg.eval_data !== null) cfg.eval_data = await dataFileArg(opts.evalData !== undefined ? '--eval-data' : `config ${String(opts.config)}: eval_data`, cfg.eval_data);
    return runTrain(cfg);
  }));
}
