// Blobs from peers: real libp2p nodes on 127.0.0.1 serve a blob's chunks; a joiner fetches from several at once,
// every chunk and the whole blob checked against hashes made here with node:crypto (not the store's own code),
// a lying provider blamed and its chunks taken from the others; files over 2 GiB hash, serve and read by range.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { BlobStore, chunkCount, chunkRange, errorLine, hashBlob, hashFile, type BlobEvent } from '../protocol/blobs.ts';
import { createSwarmNode, serve, dialableAddrs, type SwarmNode } from '../protocol/net.ts';
import { CHUNK_BYTES } from '../protocol/constants.ts';
import type { BlobRef, WeightsResponse } from '../protocol/messages.ts';

const nodes: SwarmNode[] = [];
const dirs: string[] = [];
after(async () => {
  for (const n of nodes) await n.stop();
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function tmp(): Promise<string> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-blobs-'));
  dirs.push(d);
  return d;
}

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

/** 3.5 chunks of deterministic bytes (not all equal, so a chunk served at the wrong offset is caught) */
function blobBytes(): Uint8Array {
  const b = new Uint8Array(3 * CHUNK_BYTES + CHUNK_BYTES / 2 + 17);
  let x = 12345;
  for (let i = 0; i < b.length; i += 4) { x = (x * 1103515245 + 12345) >>> 0; b[i] = x & 255; b[i + 1] = (x >> 8) & 255; }
  return b;
}

interface Peer { node: SwarmNode; store: BlobStore; addr: string; served: number }

/** A node serving `weights` from its store; `tamper` may change what it sends. */
async function peer(tamper?: (res: WeightsResponse, offset: number) => WeightsResponse): Promise<Peer> {
  const dir = await tmp();
  const node = await createSwarmNode({ dataDir: dir });
  nodes.push(node);
  const store = new BlobStore(dir);
  const p: Peer = { node, store, addr: dialableAddrs(node)[0]!, served: 0 };
  await serve(node, 'weights', async (req) => {
    p.served++;
    const res = await store.serveChunk(req);
    return tamper ? tamper(res, req.offset) : res;
  });
  return p;
}

function refOf(bytes: Uint8Array, providers: Peer[], chunks = true): BlobRef {
  const chunkSha256: string[] = [];
  for (let off = 0; off < bytes.length; off += CHUNK_BYTES) chunkSha256.push(sha(bytes.subarray(off, off + CHUNK_BYTES)));
  return { name: 'embed', sha256: sha(bytes), sizeBytes: bytes.length, providers: providers.map((p) => p.addr), ...(chunks ? { chunkSha256 } : {}) };
}

test('a joiner fetches one blob from four peers at once, every chunk checked; the file is the blob and is served on', { timeout: 120_000 }, async () => {
  const bytes = blobBytes();
  const holders = await Promise.all([peer(), peer(), peer(), peer()]);
  for (const h of holders) assert.equal(await h.store.put(bytes), sha(bytes));
  assert.deepEqual(holders[0]!.store.chunkHashes(sha(bytes)), refOf(bytes, []).chunkSha256, 'the publisher lists the same chunk hashes node:crypto makes');
  const joiner = await peer();
  const events: BlobEvent[] = [];
  joiner.store.onEvent = (e) => events.push(e);
  const ref = refOf(bytes, holders);
  const file = await joiner.store.fetch(joiner.node, ref);
  assert.equal(sha(new Uint8Array(await readFile(file))), sha(bytes));
  const fetched = events.find((e) => e.kind === 'fetched');
  assert.ok(fetched && fetched.kind === 'fetched', JSON.stringify(events));
  const counts = Object.values(fetched.chunksFrom);
  assert.equal(counts.reduce((a, b) => a + b, 0), 4, 'four chunks in all');
  assert.ok(fetched.providers >= 2, `chunks came from several peers: ${JSON.stringify(fetched.chunksFrom)}`);
  assert.equal(holders.reduce((a, h) => a + h.served, 0), 4, 'each chunk asked once');
  assert.deepEqual((await readdir(path.dirname(file))).filter((f) => f.includes('.part')), [], 'no partial file left');
  // the joiner now serves the blob on, by range from its file, to the next joiner
  const next = await peer();
  const again = await next.store.get(next.node, { ...ref, providers: [joiner.addr] });
  assert.equal(sha(again), sha(bytes));
  // a second fetch is a cache hit
  await joiner.store.fetch(joiner.node, ref);
  assert.equal(events.filter((e) => e.kind === 'cache-hit').length, 1);
});

test('a provider that sends a bad chunk is blamed by name and its chunks come from the others', { timeout: 120_000 }, async () => {
  const bytes = blobBytes();
  const liar = await peer((res, offset) => {
    if (offset !== CHUNK_BYTES) return res;
    const b = res.bytes.slice();
    b[100] ^= 1;
    return { sizeBytes: res.sizeBytes, bytes: b };
  });
  const honest = await peer();
  for (const h of [liar, honest]) await h.store.put(bytes);
  const joiner = await peer();
  const events: BlobEvent[] = [];
  joiner.store.onEvent = (e) => events.push(e);
  // the liar first, so it is asked for chunk 1 (each provider takes two chunks at once)
  const got = await joiner.store.get(joiner.node, refOf(bytes, [liar, honest]));
  assert.equal(sha(got), sha(bytes));
  const failed = events.filter((e) => e.kind === 'provider-failed');
  assert.equal(failed.length, 1, JSON.stringify(events));
  assert.equal(failed[0]!.kind === 'provider-failed' && failed[0]!.from, liar.node.peerId.toString());
  assert.match(failed[0]!.kind === 'provider-failed' ? failed[0]!.error : '', /^IntegrityError: chunk 1 at 8388608 hashes to [0-9a-f]{64}, the reference says [0-9a-f]{64}$/);

  // without chunk hashes the whole blob's hash fails; each provider is then tried alone, and the honest one wins
  const joiner2 = await peer();
  const events2: BlobEvent[] = [];
  joiner2.store.onEvent = (e) => events2.push(e);
  const got2 = await joiner2.store.get(joiner2.node, refOf(bytes, [liar, honest], false));
  assert.equal(sha(got2), sha(bytes));
  const blamed = events2.filter((e) => e.kind === 'provider-failed').map((e) => e.kind === 'provider-failed' && e.from);
  assert.deepEqual(blamed, [liar.node.peerId.toString()], JSON.stringify(events2));
  const ok = events2.find((e) => e.kind === 'fetched');
  assert.deepEqual(ok && ok.kind === 'fetched' && Object.keys(ok.chunksFrom), [honest.node.peerId.toString()]);
});

test('no good provider: one error naming each, nothing left on disk; a wrong size or a bad ref is refused', { timeout: 60_000 }, async () => {
  const bytes = blobBytes();
  const short = await peer((res) => ({ sizeBytes: res.sizeBytes, bytes: res.bytes.subarray(0, res.bytes.length - 1) }));
  const liesAboutSize = await peer((res) => ({ sizeBytes: res.sizeBytes + 1, bytes: res.bytes }));
  const empty = await peer();                                 // does not hold it
  for (const h of [short, liesAboutSize]) await h.store.put(bytes);
  const joiner = await peer();
  const err = await joiner.store.get(joiner.node, refOf(bytes, [short, liesAboutSize, empty])).then(() => null, (e: Error) => e);
  assert.ok(err !== null);
  assert.equal(err.name, 'SwarmError');
  assert.ok(!err.message.includes('\n'), 'one line');
  assert.match(err.message, /^could not fetch blob embed \([0-9a-f]{64}\) from any of 3 providers: /);
  assert.match(err.message, new RegExp(`${short.node.peerId}: IntegrityError: chunk \\d at \\d+: ${CHUNK_BYTES - 1} bytes, expected ${CHUNK_BYTES}`));
  assert.match(err.message, new RegExp(`${liesAboutSize.node.peerId}: IntegrityError: the provider says the blob has ${bytes.length + 1} bytes, the reference ${bytes.length}`));
  assert.match(err.message, new RegExp(`${empty.node.peerId}: RemoteError: SwarmError: blob [0-9a-f]{64} is not held here`));
  const files = await readdir(joiner.store.dir).catch(() => []);
  assert.deepEqual(files, [], 'no partial or unverified file under the blob dir');
  // a reference whose chunk list does not fit its size
  await assert.rejects(joiner.store.get(joiner.node, { ...refOf(bytes, [short]), chunkSha256: [sha(bytes)] }),
    { name: 'IntegrityError', message: /blob embed: its reference lists 1 chunk hashes, a 29360145-byte blob has 4 chunks of 8388608 bytes/ });
});

test('a corrupt cached file is refused and deleted; an aborted fetch is not a provider failure', { timeout: 60_000 }, async () => {
  const bytes = blobBytes();
  const holder = await peer();
  await holder.store.put(bytes);
  const dir = await tmp();
  const f = path.join(dir, 'blobs', sha(bytes));
  const s1 = new BlobStore(dir);
  await s1.put(bytes);
  const fh = await open(f, 'r+');
  await fh.write(new Uint8Array([0xff ^ bytes[5]!]), 0, 1, 5);
  await fh.close();
  const s2 = new BlobStore(dir);                              // a new process: nothing verified yet
  const events: BlobEvent[] = [];
  s2.onEvent = (e) => events.push(e);
  assert.equal(await s2.cachedFile({ name: 'embed', sha256: sha(bytes) }), null);
  assert.equal(events[0]?.kind, 'corrupt-cache');
  await assert.rejects(readFile(f), { code: 'ENOENT' });
  const ac = new AbortController();
  ac.abort(new Error('leaving'));
  const joiner = await peer();
  const ev: BlobEvent[] = [];
  joiner.store.onEvent = (e) => ev.push(e);
  await assert.rejects(joiner.store.get(joiner.node, refOf(bytes, [holder]), { signal: ac.signal }), /leaving/);
  assert.deepEqual(ev.filter((e) => e.kind === 'provider-failed'), []);
});

test('hashFile streams a file to the same whole and chunk hashes node:crypto gives for the bytes', async () => {
  const bytes = blobBytes();
  const f = path.join(await tmp(), 'b');
  await (await open(f, 'w')).close();
  const fh = await open(f, 'w');
  await fh.write(bytes, 0, bytes.length, 0);
  await fh.close();
  const h = await hashFile(f);
  assert.equal(h.sha256, sha(bytes));
  assert.equal(h.sizeBytes, bytes.length);
  assert.deepEqual(h.chunkSha256, refOf(bytes, []).chunkSha256);
  assert.deepEqual(hashBlob(bytes), { sha256: h.sha256, chunkSha256: h.chunkSha256 });
});

test('a blob over 2 GiB: hashed in one streaming pass, verified from the cache, served by range past 2 GiB', { timeout: 120_000 }, async () => {
  const dir = await tmp();
  const size = 2 * 1024 ** 3 + 3 * 1024 * 1024 + 5;     // over fs.readFile's 2 GiB limit
  const tail = new Uint8Array([1, 2, 3, 4, 5]);
  const scratch = path.join(dir, 'big');
  // a sparse file: zeros except its last five bytes
  const fh = await open(scratch, 'w');
  await fh.truncate(size);
  await fh.write(tail, 0, tail.length, size - tail.length);
  await fh.close();
  await assert.rejects(readFile(scratch), { code: 'ERR_FS_FILE_TOO_LARGE' }, 'the reason this exists');
  // the reference hash, made independently: zeros in 64 MiB pieces, then the tail
  const h = createHash('sha256');
  const zeros = new Uint8Array(64 << 20);
  let left = size - tail.length;
  while (left > 0) { const n = Math.min(left, zeros.length); h.update(zeros.subarray(0, n)); left -= n; }
  h.update(tail);
  const want = h.digest('hex');
  // placed in the store under its hash, it verifies from the cache (one streaming pass) and serves its last bytes
  const store = new BlobStore(dir);
  await mkdir(store.dir, { recursive: true });
  await rename(scratch, path.join(store.dir, want));
  assert.equal(await store.cachedFile({ name: 'big', sha256: want }), path.join(store.dir, want));
  const chunks = store.chunkHashes(want)!;
  assert.equal(chunks.length, Math.ceil(size / CHUNK_BYTES));
  const lastChunk = new Uint8Array(size - (chunks.length - 1) * CHUNK_BYTES);
  lastChunk.set(tail, lastChunk.length - tail.length);
  assert.equal(chunks.at(-1), sha(lastChunk));
  assert.equal(chunks[0], sha(new Uint8Array(CHUNK_BYTES)));
  const res = await store.serveChunk({ sha256: want, offset: size - 7, length: 100 });
  assert.equal(res.sizeBytes, size);
  assert.deepEqual([...res.bytes], [0, 0, 1, 2, 3, 4, 5]);
});

test('a publisher\'s small chunk size: the reference names it, 3 providers share 200+ chunks by range, each checked; range arithmetic past 2 and 4 GiB is exact', { timeout: 60_000 }, async () => {
  const cb = 4096;
  const bytes = blobBytes().subarray(0, 200 * cb + 123);
  const holders = await Promise.all([peer(), peer(), peer()]);
  const publisher = new BlobStore(await tmp(), { chunkBytes: cb });
  await publisher.put(bytes);
  for (const h of holders) await h.store.put(bytes);
  const chunkSha256: string[] = [];
  for (let off = 0; off < bytes.length; off += cb) chunkSha256.push(sha(bytes.subarray(off, off + cb)));
  assert.deepEqual(publisher.chunkHashes(sha(bytes)), chunkSha256, 'the publisher hashes by its own chunk size');
  const joiner = await peer();
  const events: BlobEvent[] = [];
  joiner.store.onEvent = (e) => events.push(e);
  const ref: BlobRef = { name: 'embed', sha256: sha(bytes), sizeBytes: bytes.length, providers: holders.map((h) => h.addr), chunkBytes: cb, chunkSha256 };
  assert.equal(sha(await joiner.store.get(joiner.node, ref)), sha(bytes));
  const fetched = events.find((e) => e.kind === 'fetched');
  assert.ok(fetched?.kind === 'fetched');
  assert.equal(Object.values(fetched.chunksFrom).reduce((a, b) => a + b, 0), 201);
  assert.equal(Object.keys(fetched.chunksFrom).length, 3, `every provider served: ${JSON.stringify(fetched.chunksFrom)}`);
  assert.equal(holders.reduce((a, h) => a + h.served, 0), 201, 'each chunk asked once');
  // a chunk list made for another chunk size is refused before anything is fetched
  await assert.rejects(joiner.store.get(joiner.node, { ...ref, sha256: sha(bytes.subarray(1)), chunkBytes: 8192 }), { name: 'IntegrityError', message: /lists 201 chunk hashes, a 819323-byte blob has 101 chunks of 8192 bytes/ });
  // a 5 GiB + 3 byte blob in 8 MiB chunks: 641 chunks, the last one 3 bytes at exactly 5 GiB
  const big = 5 * 1024 ** 3 + 3;
  assert.equal(chunkCount(big), 641);
  assert.deepEqual(chunkRange(640, big), { offset: 5 * 1024 ** 3, length: 3 });
  assert.deepEqual(chunkRange(256, big), { offset: 2 ** 31, length: CHUNK_BYTES }, 'the chunk at 2 GiB');
  assert.deepEqual(chunkRange(512, big), { offset: 2 ** 32, length: CHUNK_BYTES }, 'the chunk at 4 GiB');
  assert.throws(() => new BlobStore(dirs[0]!, { chunkBytes: 100 }), { name: 'SwarmError', message: /blob chunk size 100: must be an integer from 1024 to 8388608 bytes/ });
});

test('a provider failure is one line naming what was thrown, never "undefined: undefined"', () => {
  assert.equal(errorLine(new TypeError('bad')), 'TypeError: bad');
  assert.equal(errorLine(new Error('')), 'Error: no message given');
  assert.equal(errorLine(new Error('two\n  lines')), 'Error: two lines');
  assert.equal(errorLine({ code: 'ERR_STREAM_RESET' }), 'ERR_STREAM_RESET: {"code":"ERR_STREAM_RESET"}');
  assert.equal(errorLine({ name: 'AbortError', message: 'aborted' }), 'AbortError: aborted');
  assert.equal(errorLine(undefined), 'the request failed with no error value (undefined)');
  assert.equal(errorLine('reset'), 'thrown string: reset');
});

test('putFile stores what a writer put in a file under its sha256 (as put does for bytes); a failed write leaves nothing', async () => {
  const bytes = blobBytes().subarray(0, CHUNK_BYTES + 999);
  const store = new BlobStore(await tmp(), { chunkBytes: 64 << 10 });
  const got = await store.putFile(async (file) => {
    const fh = await open(file, 'w');
    await fh.write(bytes, 0, 1000, 0);                 // in two pieces, as a tensor-by-tensor writer does
    await fh.write(bytes, 1000, bytes.length - 1000, 1000);
    await fh.close();
  });
  assert.deepEqual(got, { sha256: sha(bytes), sizeBytes: bytes.length });
  assert.equal(sha(new Uint8Array(await readFile(path.join(store.dir, sha(bytes))))), sha(bytes));
  assert.equal(store.chunkHashes(sha(bytes))!.length, Math.ceil(bytes.length / (64 << 10)));
  assert.deepEqual(await readdir(store.dir), [sha(bytes)], 'no temporary file left');
  await assert.rejects(store.putFile(async (file) => { await (await open(file, 'w')).close(); throw new Error('disk full'); }), /disk full/);
  assert.deepEqual(await readdir(store.dir), [sha(bytes)], 'a failed write leaves nothing');
});
