#!/usr/bin/env node
// swarmtune CLI: registers the compute backends and every command (bin/commands/), then parses the arguments.
import { Command } from 'commander';
import { registerBuiltinBackends } from './backends.ts';
import { registerEval } from './commands/eval.ts';
import { registerGenerate } from './commands/generate.ts';
import { registerQuantize } from './commands/quantize.ts';
import { registerMerge } from './commands/merge.ts';
import { registerTrain } from './commands/train.ts';
import { registerPlan } from './commands/plan.ts';
import { registerJoin } from './commands/join.ts';
import { registerLaunch } from './commands/launch.ts';
import { registerStatus } from './commands/status.ts';
import { registerPull } from './commands/pull.ts';
import { registerDemo } from './commands/demo.ts';
import { registerSimulate } from './commands/simulate.ts';
import { configureUsageErrors, prefixUsageErrors } from './errors.ts';

registerBuiltinBackends();
const program = new Command();
program
  .name('swarmtune')
  .description('Peer-to-peer QLoRA fine-tuning across volunteer GPUs')
  .version('0.1.0');
configureUsageErrors(program);
// the order of `swarmtune --help`
registerEval(program);
registerGenerate(program);
registerQuantize(program);
registerMerge(program);
registerTrain(program);
registerPlan(program);
registerJoin(program);
registerLaunch(program);
registerStatus(program);
registerPull(program);
registerDemo(program);
registerSimulate(program);
prefixUsageErrors(program);
await program.parseAsync(process.argv);
