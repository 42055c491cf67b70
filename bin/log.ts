// The process's root logger (`DEBUG=swarmtune:*` patterns), made on first use so `--help` never reads the knobs.
import { createLogger } from '../protocol/log.ts';
import type { Logger } from '../protocol/log.ts';
import { knobs } from '../engine/env.ts';

let root: Logger | undefined;

export function rootLogger(): Logger {
  return (root ??= createLogger({ debug: knobs().debug }));
}
