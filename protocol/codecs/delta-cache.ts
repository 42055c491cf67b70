// The state of the delta codec (protocol/codecs/delta.ts) on one end of one hop direction: per sample
// (a key both ends know, e.g. the step plan's example index), the last reconstructed value of its
// boundary tensor [positions, C]. Both ends keep one; they stay equal because both store what
// decodeDelta reconstructed from the same bytes, and only when the attempt that carried them commits:
//   lookup(keys, S, C)       references for a [B·S, C] tensor whose row b is sample keys[b], and the
//                            digest of exactly those references (key, length, content hash per row)
//   stage(attempt, ...)      remember an attempt's reconstruction; nothing changes yet
//   commit(attempt)          the attempt counted: its reconstructions become the references
//   discard(attempt)         a retried or dropped attempt leaves the references as they were
// A receiver that lost its cache (restart, a replacement peer) or evicted other entries computes
// another digest and refuses the tensor (decodeDelta), and the sender sends it again cold (all
// positions FULL, digest zero): never a silent mismatch. Memory is bounded by maxBytes (float32 data);
// past it the least recently committed samples are dropped (they go cold, on both ends alike when both
// hold the same bound; otherwise the digest catches the difference).
import { createHash } from 'node:crypto';
import { DIGEST_BYTES } from './delta.ts';
import type { DeltaRefs } from './delta.ts';

/** staged attempts kept at most (a step's micro-batches in flight are far fewer) */
export const MAX_PENDING = 256;

interface Entry {
  data: Float32Array;
  C: number;
  hash: string;
}

export interface DeltaLookup {
  refs: DeltaRefs;
  digest: Uint8Array;
  /** positions that have a reference */
  warm: number;
}

export class DeltaCache {
  private readonly entries = new Map<string, Entry>();
  private readonly pending = new Map<string, { key: string; data: Float32Array; C: number }[]>();
  private heldBytes = 0;

  readonly maxBytes: number;

  constructor(maxBytes: number) {
    this.maxBytes = maxBytes;
    if (!(maxBytes >= 0)) throw new RangeError(`DeltaCache: maxBytes must be >= 0, got ${maxBytes}`);
  }

  get bytes(): number { return this.heldBytes; }
  get size(): number { return this.entries.size; }
  has(key: string): boolean { return this.entries.has(key); }

  lookup(keys: ReadonlyArray<string | undefined>, S: number, C: number): DeltaLookup {
    const refs: (Float32Array | undefined)[] = new Array(keys.length * S).fill(undefined);
    const h = createHash('sha256');
    let warm = 0;
    keys.forEach((key, b) => {
      const e = key === undefined ? undefined : this.entries.get(key);
      if (e === undefined || e.C !== C) { h.update(`${key ?? ''}|-\n`); return; }
      const n = Math.min(S, e.data.length / C);
      h.update(`${key}|${n}|${e.hash}\n`);
      for (let s = 0; s < n; s++) refs[b * S + s] = e.data.subarray(s * C, (s + 1) * C);
      warm += n;
    });
    const digest = new Uint8Array(h.digest().subarray(0, DIGEST_BYTES));
    if (digest.every((x) => x === 0)) digest[0] = 1; // zero is reserved for "no reference"
    return { refs, digest, warm };
  }

  /** Remember attempt's reconstruction x [B·S, C] of samples keys (an undefined key is not cached). */
  stage(attempt: string, keys: ReadonlyArray<string | undefined>, S: number, C: number, x: Float32Array): void {
    const list: { key: string; data: Float32Array; C: number }[] = [];
    keys.forEach((key, b) => { if (key !== undefined) list.push({ key, C, data: x.slice(b * S * C, (b + 1) * S * C) }); });
    this.pending.set(attempt, list);
    // attempts never settled (a coordinator that died before committing) are dropped, oldest first
    for (const [k] of this.pending) { if (this.pending.size <= MAX_PENDING) break; this.pending.delete(k); }
  }

  /** Apply attempt's staged reconstructions (idempotent: a second commit, or one never staged, does nothing). */
  commit(attempt: string): void {
    const list = this.pending.get(attempt);
    if (list === undefined) return;
    this.pending.delete(attempt);
    for (const { key, data, C } of list) {
      this.drop(key);
      if (data.byteLength > this.maxBytes) continue;
      const hash = createHash('sha256').update(new Uint8Array(data.buffer, data.byteOffset, data.byteLength)).digest('hex').slice(0, 16);
      this.entries.set(key, { data, C, hash });
      this.heldBytes += data.byteLength;
    }
    for (const [key] of this.entries) {
      if (this.heldBytes <= this.maxBytes) break;
      this.drop(key);
    }
  }

  discard(attempt: string): void {
    this.pending.delete(attempt);
  }

  /** Forget everything (a restart, a new run). */
  clear(): void {
    this.entries.clear();
    this.pending.clear();
    this.heldBytes = 0;
  }

  private drop(key: string): void {
    const e = this.entries.get(key);
    if (e === undefined) return;
    this.heldBytes -= e.data.byteLength;
    this.entries.delete(key);
  }
}
