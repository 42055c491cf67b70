// Device-resident NF4 weights: which host NF4Weight objects have a device copy, under a byte budget with LRU eviction.
//
// The base model is frozen, so a weight's content never changes under the same NF4Weight object: the
// cache keys device copies by object identity (a WeakMap) and uploads each weight once. A cheap check
// on every hit (same packed/absmax arrays, same geometry, same sampled bytes) turns a violation of
// that assumption into a CudaArgumentError instead of silently using stale device data.
//
// Entries in use by an op are pinned and never evicted; when the budget cannot be met without
// evicting a pinned entry (or a weight is larger than the whole budget) acquire() returns null and
// the caller uses the per-call upload path, so the budget is a hard limit on resident bytes.
// A weight whose host object is garbage-collected is freed on the device (FinalizationRegistry).
//
// The device side is injected (upload/free), so this file holds only the policy; cuda/backend.ts wires
// it to the library's stc_nf4_* functions.
import type { NF4Absmax, NF4Weight } from '../engine/formats/nf4.ts';
import { isDoubleQuant } from '../engine/formats/nf4.ts';
import { CudaArgumentError } from './errors.ts';

/** The device operations the cache needs. */
export interface WeightDevice {
  /** device bytes a resident copy of W takes */
  residentBytes(W: NF4Weight): number;
  /** copies W to the device; resolves to its id */
  upload(W: NF4Weight): Promise<number>;
  /** releases a device copy (a failure is counted in stats().freeErrors, never thrown) */
  free(id: number): Promise<void>;
}

export interface WeightCacheStats {
  budgetBytes: number;
  residentBytes: number;
  entries: number;
  hits: number;
  misses: number;
  uploads: number;
  evictions: number;
  /** weights freed because their host object was garbage-collected */
  collected: number;
  /** calls that used the per-call upload path because the weight did not fit the budget */
  bypassed: number;
  freeErrors: number;
}

interface Entry {
  id: number;          // 0 until the upload resolves
  bytes: number;
  pins: number;
  ready: Promise<void>;
  failed: boolean;
  packed: Uint8Array;
  absmax: NF4Absmax;
  rows: number;
  cols: number;
  blocksize: number;
  fingerprint: number;
  token: object;       // FinalizationRegistry unregister token
}

/** A pinned resident weight: use `id` for the op, then call release() exactly once. */
export interface WeightLease {
  readonly id: number;
  release(): void;
}

// Up to 32 bytes of packed and 8 absmax values (or 8 codes, 4 nested absmax and the offset of double-quantized
// constants), spread over the arrays: O(1) per call.
function fingerprint(W: NF4Weight): number {
  let h = 0x811c9dc5;
  const f = new Float32Array(1), u = new Uint32Array(f.buffer);
  const bytes = (p: Uint8Array, count: number) => {
    const np = Math.min(count, p.length);
    for (let i = 0; i < np; i++) {
      const j = np === 1 ? 0 : Math.floor(i * (p.length - 1) / (np - 1));
      h = Math.imul(h ^ p[j], 0x01000193);
    }
  };
  const floats = (a: Float32Array, count: number) => {
    const na = Math.min(count, a.length);
    for (let i = 0; i < na; i++) {
      const j = na === 1 ? 0 : Math.floor(i * (a.length - 1) / (na - 1));
      f[0] = a[j];
      h = Math.imul(h ^ u[0], 0x01000193);
    }
  };
  bytes(W.packed, 32);
  const a = W.absmax;
  if (isDoubleQuant(a)) {
    bytes(a.codes, 8);
    floats(a.nestedAbsmax, 4);
    floats(Float32Array.of(a.offset), 1);
  } else floats(a, 8);
  return h >>> 0;
}

export class NF4WeightCache {
  readonly budgetBytes: number;
  #device: WeightDevice;
  #byWeight = new WeakMap<NF4Weight, Entry>();
  /** resident (or uploading) entries in LRU order: first = least recently used */
  #lru = new Set<Entry>();
  #resident = 0;
  #closed = false;
  #registry: FinalizationRegistry<Entry>;
  #stats = { hits: 0, misses: 0, uploads: 0, evictions: 0, collected: 0, bypassed: 0, freeErrors: 0 };
  lastFreeError: Error | null = null;

  constructor(budgetBytes: number, device: WeightDevice) {
    if (!Number.isSafeInteger(budgetBytes) || budgetBytes < 0) {
      throw new RangeError(`NF4WeightCache: budgetBytes=${budgetBytes} must be a non-negative integer`);
    }
    this.budgetBytes = budgetBytes;
    this.#device = device;
    // The held value is the entry, which references the arrays but never the NF4Weight object itself.
    this.#registry = new FinalizationRegistry((e: Entry) => {
      if (this.#closed || !this.#lru.has(e)) return;
      this.#stats.collected++;
      void this.#drop(e);
    });
  }

  /** Pins W's device copy, uploading it first when needed; null when it cannot be resident within
   *  the budget (the caller then uploads it for this call only). */
  async acquire(W: NF4Weight): Promise<WeightLease | null> {
    if (this.#closed) return null;
    let e = this.#byWeight.get(W);
    if (e && this.#lru.has(e)) {
      if (e.packed !== W.packed || e.absmax !== W.absmax || e.rows !== W.rows || e.cols !== W.cols ||
        e.blocksize !== W.blocksize || e.fingerprint !== fingerprint(W)) {
        throw new CudaArgumentError(`CudaBackend: NF4 weight [${W.rows},${W.cols}] changed after it was cached on the device ` +
          '(base weights must be frozen: build a new NF4Weight object instead of modifying one)');
      }
      this.#stats.hits++;
      this.#touch(e);
    } else {
      this.#stats.misses++;
      const bytes = this.#device.residentBytes(W);
      const victims = this.#makeRoom(bytes);
      if (!victims) {
        this.#stats.bypassed++;
        return null;
      }
      // the evicted copies are freed before the upload starts, so the device never holds both
      const freed = Promise.all(victims.map((v) => {
        this.#stats.evictions++;
        return this.#drop(v);
      }));
      e = {
        id: 0, bytes, pins: 0, ready: Promise.resolve(), failed: false, packed: W.packed, absmax: W.absmax,
        rows: W.rows, cols: W.cols, blocksize: W.blocksize, fingerprint: fingerprint(W), token: {},
      };
      const entry = e;
      this.#lru.add(entry);
      this.#resident += bytes;
      this.#byWeight.set(W, entry);
      this.#registry.register(W, entry, entry.token);
      this.#stats.uploads++;
      entry.ready = freed.then(() => this.#device.upload(W)).then((id) => {
        entry.id = id;
        // closed or collected while uploading: release the copy nobody can use
        if (this.#closed || !this.#lru.has(entry)) void this.#freeId(id);
      }, (err: unknown) => {
        entry.failed = true;
        if (this.#lru.has(entry)) this.#forget(entry);
        throw err;
      });
    }
    const entry = e;
    entry.pins++;
    try {
      await entry.ready;
    } catch (err) {
      entry.pins--;
      throw err;
    }
    if (this.#closed || entry.failed || entry.id === 0) {
      entry.pins--;
      return null;
    }
    let released = false;
    return {
      id: entry.id,
      release: () => {
        if (released) return;
        released = true;
        entry.pins--;
      },
    };
  }

  /** Frees every unpinned device copy (used when an op runs out of device memory); resolves to how
   *  many once the frees have completed. */
  async evictUnpinned(): Promise<number> {
    const frees: Promise<void>[] = [];
    for (const e of [...this.#lru]) {
      if (e.pins === 0) {
        this.#stats.evictions++;
        frees.push(this.#drop(e));
      }
    }
    await Promise.all(frees);
    return frees.length;
  }

  stats(): WeightCacheStats {
    return { budgetBytes: this.budgetBytes, residentBytes: this.#resident, entries: this.#lru.size, ...this.#stats };
  }

  /** Forgets every entry without freeing (the context that owned them is being closed). */
  close(): void {
    this.#closed = true;
    for (const e of this.#lru) this.#registry.unregister(e.token);
    this.#lru.clear();
    this.#resident = 0;
  }

  #touch(e: Entry): void {
    this.#lru.delete(e);
    this.#lru.add(e);
  }

  // The least-recently-used unpinned entries whose eviction makes `bytes` more fit (maybe none);
  // null when they cannot be made to fit.
  #makeRoom(bytes: number): Entry[] | null {
    if (bytes > this.budgetBytes) return null;
    if (this.#resident + bytes <= this.budgetBytes) return [];
    let free = this.budgetBytes - this.#resident;
    const victims: Entry[] = [];
    for (const e of this.#lru) {
      if (free >= bytes) break;
      if (e.pins > 0) continue;
      victims.push(e);
      free += e.bytes;
    }
    return free < bytes ? null : victims;
  }

  // Removes an entry from the accounting and frees its device copy (now, or when its upload lands).
  #drop(e: Entry): Promise<void> {
    this.#forget(e);
    return e.id !== 0 ? this.#freeId(e.id) : Promise.resolve();
  }

  #forget(e: Entry): void {
    this.#lru.delete(e);
    this.#resident -= e.bytes;
    this.#registry.unregister(e.token);
  }

  // Never rejects: a failed free is counted and kept in lastFreeError.
  #freeId(id: number): Promise<void> {
    if (this.#closed) return Promise.resolve();
    return this.#device.free(id).catch((err: unknown) => {
      this.#stats.freeErrors++;
      this.lastFreeError = err instanceof Error ? err : new Error(String(err));
    });
  }
}
