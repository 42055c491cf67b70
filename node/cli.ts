// CLI commands of this area (placeholder until the area's commands land).
import type { Command } from 'commander';
export function registerNodeCommands(_program: Command): void {}
