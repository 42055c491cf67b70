// `swarmtune train`: the training keys as flags (plus --config), handed to the train task (engine/tasks/train.ts).
import type { Command } from 'commander';
import { runTrain } from '../../engine/tasks/train.ts';
import { addTrainFlags, trainConfigFromOptions } from './train-flags.ts';

export function registerTrain(program: Command): void {
  const train = program.command('train')
    .description('fine-tune a QLoRA adapter on this machine (the same engine as the swarm)');
  train.option('--config <file>', 'run.json with the same keys in snake_case (flags override it)');
  addTrainFlags(train, 'train');
  train.action(async (opts: Record<string, unknown>) => {
    try {
      process.exitCode = await runTrain(trainConfigFromOptions(opts));
    } catch (e) {
      process.stderr.write(`swarmtune train: ${(e as Error).name}: ${(e as Error).message}\n`);
      process.exitCode = 1;
    }
  });
}
