// Placeholder until this command lands.
import type { Command } from 'commander';
export function registerEval(_program: Command): void {}
