// The device-resident NF4 weight cache's policy (cuda/weight-cache.ts), without a GPU: upload once per
// NF4Weight object, LRU eviction under the byte budget, pinned entries never evicted, bypass when a
// weight cannot fit, frozen-weight check, frees on garbage collection and on close.
//
// The device is a host-memory stand-in that keeps a copy of each uploaded weight by id, so the tests
// check that a lease's id names a copy of exactly the weight asked for. The real upload/free path is
// exercised by tests/gpu/weights.gpu.ts on a GPU machine. Runs in well under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { NF4WeightCache, type WeightDevice } from '../cuda/weight-cache.ts';
import { CudaArgumentError } from '../cuda/errors.ts';
import { randomNF4 } from '../engine/model/random-model.ts';
import { Rng } from '../engine/model/rng.ts';
import type { NF4Absmax, NF4Weight } from '../engine/formats/nf4.ts';
import { nf4ConstantsBytes } from '../engine/formats/nf4.ts';

class HostDevice implements WeightDevice {
  copies = new Map<number, { packed: Uint8Array; absmax: NF4Absmax; bytes: number }>();
  log: string[] = [];
  nextId = 1;
  failNextUpload: Error | null = null;
  residentBytes(W: NF4Weight): number {
    return W.packed.length + nf4ConstantsBytes(W);
  }
  async upload(W: NF4Weight): Promise<number> {
    await new Promise((r) => setImmediate(r));  // uploads complete asynchronously, as on the device
    if (this.failNextUpload) {
      const e = this.failNextUpload;
      this.failNextUpload = null;
      throw e;
    }
    const id = this.nextId++;
    this.copies.set(id, { packed: W.packed.slice(), absmax: structuredClone(W.absmax), bytes: this.residentBytes(W) });
    this.log.push(`upload ${id}`);
    return id;
  }
  async free(id: number): Promise<void> {
    if (!this.copies.delete(id)) throw new Error(`free of unknown id ${id}`);
    this.log.push(`free ${id}`);
  }
  bytes(): number {
    let b = 0;
    for (const c of this.copies.values()) b += c.bytes;
    return b;
  }
}

const rng = new Rng(11, 3);
// 64x64 blocksize 64: 2048 packed bytes + 64 absmax floats = 2304 bytes each
const weight = () => randomNF4(64, 64, 0.1, rng, 64);
const SIZE = 2304;

async function use(cache: NF4WeightCache, dev: HostDevice, W: NF4Weight): Promise<number | null> {
  const lease = await cache.acquire(W);
  if (!lease) return null;
  const copy = dev.copies.get(lease.id);
  assert.ok(copy, `lease id ${lease.id} has no device copy`);
  assert.deepEqual(copy.packed, W.packed);
  assert.deepEqual(copy.absmax, W.absmax);
  lease.release();
  return lease.id;
}

test('each weight is uploaded once and then hit; ids name copies of the right weight', async () => {
  const dev = new HostDevice();
  const cache = new NF4WeightCache(10 * SIZE, dev);
  const a = weight(), b = weight();
  const ia = await use(cache, dev, a), ib = await use(cache, dev, b);
  assert.notEqual(ia, ib);
  assert.equal(await use(cache, dev, a), ia);
  assert.equal(await use(cache, dev, b), ib);
  assert.deepEqual(dev.log, [`upload ${ia}`, `upload ${ib}`]);
  const st = cache.stats();
  assert.deepEqual([st.uploads, st.hits, st.misses, st.entries, st.residentBytes], [2, 2, 2, 2, 2 * SIZE]);
  // concurrent first uses of one weight share one upload
  const c = weight();
  const leases = await Promise.all([cache.acquire(c), cache.acquire(c), cache.acquire(c)]);
  assert.equal(new Set(leases.map((l) => l!.id)).size, 1);
  for (const l of leases) l!.release();
  assert.equal(cache.stats().uploads, 3);
});

test('over budget the least recently used unpinned weight is evicted, and freed before the next upload', async () => {
  const dev = new HostDevice();
  const cache = new NF4WeightCache(3 * SIZE, dev);
  const [a, b, c, d] = [weight(), weight(), weight(), weight()];
  const ia = await use(cache, dev, a);
  const ib = await use(cache, dev, b);
  const ic = await use(cache, dev, c);
  await use(cache, dev, a);            // a is now the most recent: b is the LRU
  const id = await use(cache, dev, d);
  assert.deepEqual(dev.log.slice(3), [`free ${ib}`, `upload ${id}`]);
  assert.deepEqual([...dev.copies.keys()].sort(), [ia, ic, id].sort());
  assert.ok(dev.bytes() <= 3 * SIZE && cache.stats().residentBytes === dev.bytes());
  assert.equal(cache.stats().evictions, 1);
  // b comes back with a fresh upload (its old id is gone for good)
  const ib2 = await use(cache, dev, b);
  assert.notEqual(ib2, ib);
  assert.equal(cache.stats().residentBytes, 3 * SIZE);
});

test('pinned weights are never evicted; a weight that cannot fit bypasses the cache', async () => {
  const dev = new HostDevice();
  const cache = new NF4WeightCache(2 * SIZE, dev);
  const [a, b, c] = [weight(), weight(), weight()];
  const la = await cache.acquire(a), lb = await cache.acquire(b);
  assert.ok(la && lb);
  assert.equal(await cache.acquire(c), null, 'evicted a pinned weight');
  assert.ok(dev.copies.has(la.id) && dev.copies.has(lb.id));
  la.release();
  la.release();  // a second release is harmless
  const ic = await use(cache, dev, c);
  assert.ok(ic !== null && !dev.copies.has(la.id) && dev.copies.has(lb.id));
  lb.release();
  const big = randomNF4(128, 128, 0.1, rng, 64);  // 9216 bytes > the whole budget
  assert.equal(await cache.acquire(big), null);
  assert.equal(cache.stats().bypassed, 2);
  assert.equal(new NF4WeightCache(0, dev).stats().budgetBytes, 0);
  assert.equal(await new NF4WeightCache(0, dev).acquire(a), null);  // budget 0 = always per call
  assert.throws(() => new NF4WeightCache(-1, dev), RangeError);
});

test('a cached weight that changed under the same object is a CudaArgumentError', async () => {
  const dev = new HostDevice();
  const cache = new NF4WeightCache(4 * SIZE, dev);
  const a = weight();
  await use(cache, dev, a);
  a.packed[0] ^= 0xff;  // first byte is always sampled
  await assert.rejects(cache.acquire(a), (e: Error) => e instanceof CudaArgumentError && /changed after it was cached/.test(e.message));
  a.packed[0] ^= 0xff;
  await use(cache, dev, a);
  (a as { packed: Uint8Array }).packed = a.packed.slice();  // same content, other array: also refused
  await assert.rejects(cache.acquire(a), CudaArgumentError);
  // double-quantized constants: a changed code, nested absmax or offset is caught too
  const d = randomNF4(64, 64, 0.1, rng, 64, { doubleQuant: true });
  assert.ok(await use(cache, dev, d), 'the double-quantized weight is resident');
  for (const change of [() => { d.absmax.codes[0] ^= 1; }, () => { d.absmax.nestedAbsmax[0] *= 2; }, () => { d.absmax.offset = Math.fround(d.absmax.offset * 2); }]) {
    const saved = structuredClone(d.absmax);
    change();
    await assert.rejects(cache.acquire(d), (e: Error) => e instanceof CudaArgumentError && /changed after it was cached/.test(e.message));
    Object.assign(d.absmax, saved);
    assert.ok(await use(cache, dev, d));
  }
});

test('a failed upload is reported and leaves nothing accounted', async () => {
  const dev = new HostDevice();
  const cache = new NF4WeightCache(4 * SIZE, dev);
  const a = weight();
  dev.failNextUpload = new Error('simulated out of memory');
  await assert.rejects(cache.acquire(a), /simulated out of memory/);
  assert.deepEqual([cache.stats().entries, cache.stats().residentBytes], [0, 0]);
  assert.ok(await use(cache, dev, a));
});

test('evictUnpinned frees every unpinned copy; close forgets without freeing', async () => {
  const dev = new HostDevice();
  const cache = new NF4WeightCache(4 * SIZE, dev);
  const [a, b, c] = [weight(), weight(), weight()];
  await use(cache, dev, a);
  await use(cache, dev, b);
  const lc = await cache.acquire(c);
  assert.equal(await cache.evictUnpinned(), 2);
  assert.deepEqual([...dev.copies.keys()], [lc!.id]);
  lc!.release();
  cache.close();
  assert.deepEqual(cache.stats().entries, 0);
  assert.equal(await cache.acquire(a), null);
  assert.equal(dev.copies.size, 1, 'close must leave the freeing to the context');
});

test('a weight whose host object is garbage-collected is freed on the device', async () => {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const dev = new HostDevice();
  const cache = new NF4WeightCache(8 * SIZE, dev);
  const keep = weight();
  await use(cache, dev, keep);
  await (async () => { await use(cache, dev, weight()); })();
  assert.equal(dev.copies.size, 2);
  for (let i = 0; i < 50 && dev.copies.size > 1; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.equal(dev.copies.size, 1, 'the collected weight was not freed');
  assert.equal(cache.stats().collected, 1);
  assert.equal(cache.stats().residentBytes, SIZE);
  assert.ok(await use(cache, dev, keep));
});
