// protocol/pager.ts: page plans, server-side validation and the client loops, against hand-computed cases.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { planPages, servePage, readPages, serveChunk, readChunks } from '../protocol/pager.ts';
import { CHUNK_BYTES, PAGE_BYTES, PAGE_TENSORS } from '../protocol/constants.ts';

test('planPages packs by bytes and count, never an empty page, an oversized item alone', () => {
  assert.deepEqual(planPages([10, 10, 10, 10], 25), [{ from: 0, count: 2 }, { from: 2, count: 2 }]);
  assert.deepEqual(planPages([30, 5, 5], 25), [{ from: 0, count: 1 }, { from: 1, count: 2 }]);
  assert.deepEqual(planPages([1, 1, 1], 100, 2), [{ from: 0, count: 2 }, { from: 2, count: 1 }]);
  assert.deepEqual(planPages([]), []);
  const many = planPages(new Array(PAGE_TENSORS * 2 + 1).fill(4));
  assert.deepEqual(many.map((p) => p.count), [PAGE_TENSORS, PAGE_TENSORS, 1]);
});

test('servePage validates the range and caps count and bytes', () => {
  assert.deepEqual(servePage(10, 8, 5, 'x'), { from: 8, count: 2 });
  assert.deepEqual(servePage(10, 10, 5, 'x'), { from: 10, count: 0 });
  assert.deepEqual(servePage(1000, 0, 1000, 'x'), { from: 0, count: PAGE_TENSORS });
  assert.deepEqual(servePage(10, 0, 10, 'x', () => PAGE_BYTES / 2), { from: 0, count: 2 });
  assert.deepEqual(servePage(10, 0, 10, 'x', () => PAGE_BYTES * 2), { from: 0, count: 1 });
  assert.throws(() => servePage(10, 11, 1, 'grads'), { name: 'SchemaError', message: /grads: page start 11 outside \[0, 10\]/ });
  assert.throws(() => servePage(10, -1, 1, 'x'), { name: 'SchemaError' });
  assert.throws(() => servePage(10, 0, 1.5, 'x'), { name: 'SchemaError' });
});

test('readPages reads a list through a server that pages it, and refuses stalls and changes', async () => {
  const list = Array.from({ length: 150 }, (_, i) => i);
  let calls = 0;
  const got = await readPages(async (from) => { calls++; const p = servePage(list.length, from, 1000, 'l'); return { total: list.length, items: list.slice(p.from, p.from + p.count) }; }, 'l');
  assert.deepEqual(got, list);
  assert.equal(calls, Math.ceil(150 / PAGE_TENSORS));
  assert.deepEqual(await readPages(async () => ({ total: 0, items: [] }), 'l'), []);
  await assert.rejects(readPages(async () => ({ total: 3, items: [] }), 'adapter'), /adapter: empty page at 0 of 3/);
  let t = 4;
  await assert.rejects(readPages(async () => ({ total: t++, items: [1] }), 'g'), /changed from 4 to 5/);
  await assert.rejects(readPages(async () => ({ total: 2, items: [1, 2, 3] }), 'g'), /overruns/);
  await assert.rejects(readPages(async () => ({ total: 1, items: [1] }), 'g', { signal: AbortSignal.abort() }), { name: 'AbortError' });
});

test('serveChunk and readChunks move a byte range exactly, with sizes checked', async () => {
  const data = new Uint8Array(2 * CHUNK_BYTES + 123).map((_, i) => (i * 7) & 255);
  const lengths: number[] = [];
  const got = await readChunks(async (off, len) => { lengths.push(len); return serveChunk(data, off, len, 'd'); }, 'd');
  assert.deepEqual(got, data);
  assert.deepEqual(lengths, [CHUNK_BYTES, CHUNK_BYTES, 123]);
  const known = await readChunks(async (off, len) => serveChunk(data, off, len, 'd'), 'd', { expectedBytes: data.length, chunkBytes: 1 << 20 });
  assert.deepEqual(known, data);
  assert.equal((await readChunks(async (off, len) => serveChunk(new Uint8Array(0), off, len, 'e'), 'e')).length, 0);
  await assert.rejects(readChunks(async (off, len) => serveChunk(data, off, len, 'd'), 'blob w', { expectedBytes: 10 }), /blob w: the sender says \d+ bytes, expected 10/);
  await assert.rejects(readChunks(async () => ({ sizeBytes: 5, bytes: new Uint8Array(0) }), 'z'), /z: bad chunk of 0 bytes at 0 of 5/);
  assert.throws(() => serveChunk(data, data.length + 1, 1, 'opt'), { name: 'SchemaError', message: /opt: offset/ });
});
