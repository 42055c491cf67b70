// Builds netlab's delay device (delay.c) with the system C compiler, cached in os.tmpdir() by a hash of the
// source, the flags and the compiler's version, so a run compiles it at most once per machine and change.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { sh, shSync } from './sh.ts';

export const DELAY_SOURCE = path.join(import.meta.dirname, 'delay.c');
const CFLAGS = ['-O2', '-std=c11', '-Wall', '-Wextra', '-Werror'];

/** The compiler netlab uses: $CC, else cc; null when there is none. */
export function cCompiler(): string | null {
  const cc = process.env.CC || 'cc';
  return shSync([cc, '--version'], { timeoutMs: 5000 }) === null ? null : cc;
}

let built: Promise<string> | null = null;

/** Path of the compiled delay device, compiling it on first use. */
export function delayDevice(): Promise<string> {
  built ??= build().catch(e => { built = null; throw e; });
  return built;
}

async function build(): Promise<string> {
  const cc = cCompiler();
  if (!cc) throw new Error('netlab: no C compiler (cc or $CC) to build tests/netlab/delay.c');
  const source = readFileSync(DELAY_SOURCE);
  const version = shSync([cc, '--version'], { timeoutMs: 5000 }) ?? '';
  const hash = createHash('sha256').update(source).update('\0' + CFLAGS.join(' ') + '\0' + version).digest('hex').slice(0, 16);
  const dir = path.join(tmpdir(), 'swarmtune-netlab', hash);
  const exe = path.join(dir, 'delay');
  if (existsSync(exe)) return exe;
  mkdirSync(dir, { recursive: true });
  const partial = `${exe}.${process.pid}.partial`;
  try {
    await sh([cc, ...CFLAGS, '-o', partial, DELAY_SOURCE], { timeoutMs: 60_000 });
    renameSync(partial, exe);                            // atomic: a concurrent run sees no half-written file
  } finally {
    rmSync(partial, { force: true });
  }
  return exe;
}
