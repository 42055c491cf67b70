#!/usr/bin/env node
// swarmtune CLI: parses arguments with commander and hands off to engine/, node/ or coordinator/.
import { Command } from 'commander';
import { registerEngineCommands } from '../engine/cli.ts';
import { registerTrainCommands } from '../engine/train/cli.ts';
import { registerNodeCommands } from '../node/cli.ts';
import { registerCoordinatorCommands } from '../coordinator/cli.ts';
import { registerDemoCommand } from '../coordinator/demo/cli.ts';
import { registerBuiltinBackends } from './backends.ts';

registerBuiltinBackends();
const program = new Command();
program
  .name('swarmtune')
  .description('Peer-to-peer QLoRA fine-tuning across volunteer GPUs')
  .version('0.1.0');
registerEngineCommands(program);     // eval, generate, quantize, merge
registerTrainCommands(program);      // train, plan
registerNodeCommands(program);       // join
registerCoordinatorCommands(program); // launch, status, pull
registerDemoCommand(program);        // demo
await program.parseAsync(process.argv);
