// A stage peer's delta-codec state (the --wire-dtype codecs aq4 / aq2, protocol/codecs/delta.ts): one
// DeltaCache per (direction, kind, neighbour peer), so a neighbour replaced by the coordinator starts
// cold on both ends, and a hop to the coordinator (a spot check, a referee) is always cold. An
// attempt's reconstructions are staged by the hop (protocol/hop.ts) and become references only when
// the coordinator commits the attempt here (StageHost.commit); a discarded or never-committed attempt
// leaves them as they were. Memory: DELTA_CACHE_BYTES in all (float32 references), split evenly over
// the caches of at most DELTA_NEIGHBOURS neighbours per direction and kind; a new peer loaded for the
// stage (restart, reassignment) starts with none.
import type { HopDelta, HopKind } from '../protocol/hop.ts';
import { DeltaCache } from '../protocol/codecs/delta-cache.ts';
import { isDeltaCodec } from '../protocol/tensor.ts';
import type { FloatCodec } from '../protocol/tensor.ts';

/** what one stage peer may hold in delta references, all caches together (docs/protocol.md) */
export const DELTA_CACHE_BYTES = 2 * 1024 ** 3;
/** neighbours per direction and kind whose references are kept (the route's pairing is stable) */
export const DELTA_NEIGHBOURS = 2;

export const attemptKeyOf = (k: { runId: string; step: number; mb: number; attempt: number }): string => `${k.runId}/${k.step}/${k.mb}/${k.attempt}`;

export class CodecState {
  readonly codec: FloatCodec;
  readonly perCacheBytes: number;
  private readonly caches = new Map<string, Map<string, DeltaCache>>();

  constructor(codec: FloatCodec, totalBytes = DELTA_CACHE_BYTES) {
    this.codec = codec;
    // 4 (direction, kind) pairs at most (a middle stage), each with DELTA_NEIGHBOURS peers
    this.perCacheBytes = Math.floor(totalBytes / (4 * DELTA_NEIGHBOURS));
  }

  get bytes(): number {
    let n = 0;
    for (const m of this.caches.values()) for (const c of m.values()) n += c.bytes;
    return n;
  }

  /** The hop state for `kind` sent to / received from `peer` in this attempt; undefined when the
   *  codec is stateless, the attempt names no samples, or the other end is the coordinator. */
  hop(dir: 'send' | 'recv', kind: HopKind, peer: string, req: { runId: string; step: number; mb: number; attempt: number; batch: number; seqLen: number; samples?: number[] }, coordinator: string): HopDelta | undefined {
    if (!isDeltaCodec(this.codec) || req.samples === undefined || req.samples.length !== req.batch || peer === coordinator) return undefined;
    const slot = `${dir}:${kind}`;
    let m = this.caches.get(slot);
    if (m === undefined) this.caches.set(slot, m = new Map());
    let cache = m.get(peer);
    if (cache === undefined) {
      if (m.size >= DELTA_NEIGHBOURS) m.delete(m.keys().next().value!);
      m.set(peer, cache = new DeltaCache(this.perCacheBytes));
    }
    return { cache, keys: req.samples.map((i) => `${i}`), seqLen: req.seqLen, attempt: attemptKeyOf(req) };
  }

  /** The digest of the references held for `peer` (tests, diagnostics): the one a hop would name. */
  digest(dir: 'send' | 'recv', kind: HopKind, peer: string, keys: readonly string[], seqLen: number, C: number): string | undefined {
    const c = this.caches.get(`${dir}:${kind}`)?.get(peer);
    return c === undefined ? undefined : Buffer.from(c.lookup(keys, seqLen, C).digest).toString('hex');
  }

  /** The coordinator committed (true) or discarded (false) the attempt. */
  settle(k: { runId: string; step: number; mb: number; attempt: number }, commit: boolean): void {
    const a = attemptKeyOf(k);
    for (const m of this.caches.values()) for (const c of m.values()) { if (commit) c.commit(a); else c.discard(a); }
  }

  clear(): void {
    this.caches.clear();
  }
}
