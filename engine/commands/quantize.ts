// Placeholder until this command lands.
import type { Command } from 'commander';
export function registerQuantize(_program: Command): void {}
