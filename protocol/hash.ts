// Content addresses: the sha256 (lowercase hex) that names every blob the swarm moves.
import { createHash } from 'node:crypto';

export function sha256Hex(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** sha256Hex in slices of `sliceBytes` that yield to the event loop between them: a 2.1 GB blob (an 8B
 *  model's embedding) takes seconds to hash, which would stop the process's heartbeats. */
export async function sha256HexAsync(b: Uint8Array, opts: { signal?: AbortSignal; sliceBytes?: number } = {}): Promise<string> {
  const slice = opts.sliceBytes ?? 32 << 20;
  const h = createHash('sha256');
  for (let a = 0; a < b.length; a += slice) {
    h.update(b.subarray(a, Math.min(b.length, a + slice)));
    if (b.length > slice) { await new Promise<void>((r) => setImmediate(r)); opts.signal?.throwIfAborted(); }
  }
  return h.digest('hex');
}
