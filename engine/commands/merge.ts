// Placeholder until this command lands.
import type { Command } from 'commander';
export function registerMerge(_program: Command): void {}
