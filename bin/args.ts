// Flag value parsers and input checks shared by several commands (a bad value throws, naming the flag as typed).
import { existsSync, statSync } from 'node:fs';
import net from 'node:net';
import { InvalidArgumentError } from 'commander';
import { NetworkError, NotFoundError, UsageError } from './errors.ts';

export function nonNegativeInt(what: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`${what} must be a non-negative integer, got "${v}"`);
    return n;
  };
}

/** A model dir argument: `tiny` is the embedded demo model (written to the cache on first use), as in
 *  `train`; anything else must exist. `what` names where the value came from (`--model`). */
export async function modelDirArg(what: string, v: string): Promise<string> {
  if (v === 'tiny') return (await import('../engine/tiny/index.ts')).ensureTinyModel();
  if (!existsSync(v)) throw new NotFoundError(`${what} ${v}: no such directory (give a Hugging Face model dir, or "tiny" for the embedded demo model)`);
  return v;
}

/** A data file argument: `tiny` is the tiny model's bundled QA set; anything else must be a file. */
export async function dataFileArg(what: string, v: string): Promise<string> {
  if (v === 'tiny') return (await import('../engine/tiny/index.ts')).TINY_DATASET_PATH;
  if (!existsSync(v)) throw new NotFoundError(`${what} ${v}: no such file`);
  if (statSync(v).isDirectory()) throw new UsageError(`${what} ${v}: is a directory, not a JSONL file`);
  return v;
}

/** A coordinator address, checked before anything dials it. */
export async function multiaddrArg(v: string): Promise<string> {
  const { parseMultiaddr } = await import('../protocol/net.ts');
  try {
    parseMultiaddr(v);
  } catch (e) {
    throw new UsageError(`${(e as Error).message}; a coordinator address looks like /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW…`);
  }
  return v;
}

/** Refuse a --listen TCP address another process already holds, before anything is written (libp2p would
 *  find out only after the data dir exists). Port 0 and non-TCP addresses are left to libp2p. */
export async function checkListenFree(flag: string, addr: string): Promise<void> {
  const m = /^\/(ip4|ip6)\/([^/]+)\/tcp\/(\d+)$/.exec(addr);
  if (m === null || Number(m[3]) === 0) return;
  await new Promise<void>((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EADDRINUSE') reject(new NetworkError(`${flag} ${addr}: address already in use (another process listens there: stop it or choose another port)`));
      else if (e.code === 'EADDRNOTAVAIL') reject(new NetworkError(`${flag} ${addr}: this machine has no such address`));
      else resolve(); // anything else: libp2p reports it
    });
    srv.listen({ host: m[2], port: Number(m[3]), exclusive: true }, () => srv.close(() => resolve()));
  });
}
