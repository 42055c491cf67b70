// Placeholder until this command lands.
import type { Command } from 'commander';
export function registerGenerate(_program: Command): void {}
