// The delta codec against cached activations (protocol/codecs/delta.ts) and its per-hop state
// (protocol/codecs/delta-cache.ts): the layout decodes to exactly what the stateless blockwise codec
// and plain float arithmetic give, a discarded attempt leaves the references alone, a cold receiver
// is served cold, and a reference that differs is refused, never decoded.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeBlockwise, encodeBlockwise } from '../protocol/codecs/blockwise.ts';
import { decodeDelta, DIGEST_BYTES, encodeDelta, parseDeltaSpec } from '../protocol/codecs/delta.ts';
import type { DeltaParams } from '../protocol/codecs/delta.ts';
import { DeltaCache } from '../protocol/codecs/delta-cache.ts';
import { Rng } from '../engine/model/rng.ts';

const P: DeltaParams = { cold: 'int4', delta: 'int2', tau: 0.05, block: 64 };
const C = 96, S = 5;

function randn(n: number, seed: number, scale = 1): Float32Array {
  const r = new Rng(seed, 0xde17a);
  return Float32Array.from({ length: n }, () => (r.nextFloat() * 2 - 1) * scale);
}

/** encode on the sender's cache, decode on the receiver's, as one hop does */
function hop(send: DeltaCache, recv: DeltaCache, keys: string[], x: Float32Array, attempt: string, p = P) {
  const T = keys.length * S;
  const s = send.lookup(keys, S, C);
  const bytes = encodeDelta(p, x, T, C, s.refs, s.digest);
  const mine = decodeDelta(p, bytes, T, C, s.refs, s.digest, 'sender');
  const r = recv.lookup(keys, S, C);
  const out = decodeDelta(p, bytes, T, C, r.refs, r.digest, 'receiver');
  send.stage(attempt, keys, S, C, mine);
  recv.stage(attempt, keys, S, C, out);
  return { bytes, out, mine };
}

test('delta codec: cold positions decode as the blockwise codec, warm ones as ref + blockwise(delta) or the ref itself', () => {
  const send = new DeltaCache(1 << 20), recv = new DeltaCache(1 << 20);
  const keys = ['a', 'b'];
  const x0 = randn(2 * S * C, 1);
  const first = hop(send, recv, keys, x0, 'a0');
  // no reference yet: the digest is zero and every position is the cold codec's own decode
  assert.deepEqual([...first.bytes.subarray(0, DIGEST_BYTES)], new Array(DIGEST_BYTES).fill(0));
  for (let t = 0; t < 2 * S; t++) {
    const row = x0.subarray(t * C, (t + 1) * C);
    assert.deepEqual(first.out.subarray(t * C, (t + 1) * C), decodeBlockwise('int4', encodeBlockwise('int4', row), C, 'ref'));
  }
  send.commit('a0'); recv.commit('a0');
  // second visit: position 0 of each sample unchanged (SAME), the rest moved a little (DELTA)
  const x1 = Float32Array.from(first.out);
  const nudge = randn(x1.length, 2, 0.3);
  for (let t = 0; t < 2 * S; t++) if (t % S !== 0) for (let i = 0; i < C; i++) x1[t * C + i]! += nudge[t * C + i]!;
  const second = hop(send, recv, keys, x1, 'a1');
  assert.deepEqual(second.out, second.mine, 'sender and receiver reconstruct the same bits');
  for (let t = 0; t < 2 * S; t++) {
    const ref = first.out.subarray(t * C, (t + 1) * C);
    const got = second.out.subarray(t * C, (t + 1) * C);
    if (t % S === 0) { assert.deepEqual(got, ref); continue; }
    const d = Float32Array.from({ length: C }, (_, i) => x1[t * C + i]! - ref[i]!);
    const dq = decodeBlockwise('int2', encodeBlockwise('int2', d), C, 'ref');
    assert.deepEqual(got, Float32Array.from({ length: C }, (_, i) => ref[i]! + dq[i]!));
  }
  // 2 SAME positions cost nothing, 8 DELTA positions an int2 row each: fewer bytes than cold
  assert.ok(second.bytes.length < first.bytes.length / 1.5, `${second.bytes.length} vs ${first.bytes.length}`);
});

test('delta cache: a discarded attempt does not advance the reference; commit is idempotent', () => {
  const send = new DeltaCache(1 << 20), recv = new DeltaCache(1 << 20);
  const keys = ['s7'];
  const a = hop(send, recv, keys, randn(S * C, 3), 'r/0/0/0');
  send.commit('r/0/0/0'); recv.commit('r/0/0/0');
  const before = send.lookup(keys, S, C).digest;
  // a retried attempt: staged on both ends, then discarded
  hop(send, recv, keys, randn(S * C, 4), 'r/1/0/0');
  send.discard('r/1/0/0'); recv.discard('r/1/0/0');
  send.commit('r/1/0/0'); // a late commit of a discarded attempt changes nothing
  assert.deepEqual(send.lookup(keys, S, C).digest, before);
  assert.deepEqual(recv.lookup(keys, S, C).refs[0], a.out.subarray(0, C));
  // the attempt that counts: both ends move to its reconstruction, a second commit is a no-op
  const b = hop(send, recv, keys, randn(S * C, 5), 'r/1/0/1');
  send.commit('r/1/0/1'); recv.commit('r/1/0/1'); recv.commit('r/1/0/1');
  assert.deepEqual(recv.lookup(keys, S, C).refs[S - 1], b.out.subarray((S - 1) * C));
  assert.deepEqual(send.lookup(keys, S, C).digest, recv.lookup(keys, S, C).digest);
});

test('delta codec: a cold or different receiver refuses warm bytes; the cold fallback decodes correctly', () => {
  const send = new DeltaCache(1 << 20), recv = new DeltaCache(1 << 20);
  const keys = ['x', 'y'];
  const x = randn(2 * S * C, 6);
  hop(send, recv, keys, x, 'a0');
  send.commit('a0'); recv.commit('a0');
  const s = send.lookup(keys, S, C);
  const warm = encodeDelta(P, x, 2 * S, C, s.refs, s.digest);
  // a restarted receiver (empty cache): refused with a line naming the mismatch
  const fresh = new DeltaCache(1 << 20);
  const f = fresh.lookup(keys, S, C);
  assert.throws(() => decodeDelta(P, warm, 2 * S, C, f.refs, f.digest, 'hop'), /reference mismatch/);
  // one element different in the receiver's reference: also refused, not decoded against it
  const other = new DeltaCache(1 << 20);
  const y = Float32Array.from(recv.lookup(keys, S, C).refs.flatMap((r) => [...r!]));
  y[17] = y[17]! + 1e-3;
  other.stage('z', keys, S, C, y); other.commit('z');
  const o = other.lookup(keys, S, C);
  assert.notDeepEqual(o.digest, s.digest);
  assert.throws(() => decodeDelta(P, warm, 2 * S, C, o.refs, o.digest, 'hop'), /reference mismatch/);
  // the fallback: the sender encodes without references; any receiver decodes it, as the cold codec
  const cold = encodeDelta(P, x, 2 * S, C, [], s.digest);
  const got = decodeDelta(P, cold, 2 * S, C, f.refs, f.digest, 'hop');
  for (let t = 0; t < 2 * S; t++) {
    assert.deepEqual(got.subarray(t * C, (t + 1) * C), decodeBlockwise('int4', encodeBlockwise('int4', x.subarray(t * C, (t + 1) * C)), C, 'ref'));
  }
  // warm positions the receiver has no reference for (a shorter cached sample) are refused too
  assert.throws(() => decodeDelta(P, warm, 2 * S, C, [], s.digest, 'hop'), /does not have/);
});

test('delta codec: bad bytes are one clear error; the cache stays within its bound', () => {
  const x = randn(3 * C, 8);
  const good = encodeDelta(P, x, 3, C, [], new Uint8Array(DIGEST_BYTES));
  const modes = good.slice(); modes[DIGEST_BYTES] = modes[DIGEST_BYTES]! | 0xc0;
  assert.throws(() => decodeDelta(P, modes, 3, C, [], new Uint8Array(DIGEST_BYTES), 'hop'), /mode 3 at position 0/);
  assert.throws(() => decodeDelta(P, good.subarray(0, good.length - 1), 3, C, [], new Uint8Array(DIGEST_BYTES), 'hop'), /end inside position 2/);
  assert.throws(() => decodeDelta(P, Uint8Array.from([...good, 0]), 3, C, [], new Uint8Array(DIGEST_BYTES), 'hop'), /1 bytes after the last position/);
  assert.throws(() => parseDeltaSpec('aq:int4:int3:0.1'), /codecs must be one of/);
  // bound: 3 samples of S x C float32 fit, the 4th pushes out the least recently committed one
  const one = S * C * 4;
  const cache = new DeltaCache(3 * one);
  for (const k of ['p', 'q', 'r', 's']) { cache.stage(k, [k], S, C, randn(S * C, k.charCodeAt(0))); cache.commit(k); }
  assert.equal(cache.bytes, 3 * one);
  assert.deepEqual(['p', 'q', 'r', 's'].map((k) => cache.has(k)), [false, true, true, true]);
});

test('int1 (the differences\' 1-bit codec): sign times the block\'s mean |x|, on blocks of any length', () => {
  const x = randn(300, 9);
  for (const block of [64, 128]) {
    const got = decodeBlockwise('int1', encodeBlockwise('int1', x, block), x.length, 'int1', block);
    for (let lo = 0; lo < x.length; lo += block) {
      const hi = Math.min(x.length, lo + block);
      let m = 0;
      for (let i = lo; i < hi; i++) m += Math.abs(x[i]!);
      m = Math.fround(m / (hi - lo));
      for (let i = lo; i < hi; i++) assert.equal(got[i], x[i]! >= 0 ? m : -m, `block ${block} element ${i}`);
    }
  }
  // a delta codec with 128-element int1 scales costs 1.25 bits per element of a DELTA position
  const p = parseDeltaSpec('aq:int2:int1:0.5:128');
  assert.deepEqual(p.act, { cold: 'int2', delta: 'int1', tau: 0.5, block: 128 });
  const ref = randn(256, 10), x2 = Float32Array.from(ref, (v, i) => v + (i % 3 === 0 ? 0.5 : -0.4));
  const bytes = encodeDelta(p.act, x2, 1, 256, [ref], Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]));
  assert.equal(bytes.length, DIGEST_BYTES + 1 + 2 * 4 + 256 / 8);
});
