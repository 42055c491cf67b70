// Engine commands that need no network: eval, generate, quantize, merge.
import type { Command } from 'commander';
import { registerEval } from './commands/eval.ts';
import { registerGenerate } from './commands/generate.ts';
import { registerQuantize } from './commands/quantize.ts';
import { registerMerge } from './commands/merge.ts';

export function registerEngineCommands(program: Command): void {
  registerEval(program);
  registerGenerate(program);
  registerQuantize(program);
  registerMerge(program);
}
