// Content-addressed blob store: sha256-verified files on disk, fetched in parallel chunks from several providers, served by range.
//
// A blob is cut into chunks of the publisher's size (its reference's `chunkBytes`, CHUNK_BYTES by default; the
// last one shorter). A reference may list each chunk's sha256
// (`chunkSha256`, made by the publisher): then every chunk is checked the moment it arrives, a provider that
// sends a bad chunk (or fails) is dropped and that chunk is fetched again from another provider. The whole
// blob's sha256 is checked in every case, by one streaming pass over the file before it is renamed into
// place (after an fsync of the file and then of the directory: a crash never leaves a half blob under its
// hash). No blob is ever held in one buffer to move it: chunks go straight to their offsets in the file,
// and served chunks are read from disk by range, so blobs over 2 GiB (an 8B or 70B embedding) work.
import { randomBytes, createHash } from 'node:crypto';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { BLOB_PEER_PARALLEL, BLOB_MAX_PEERS, BLOB_TIMEOUT_MS, CHUNK_BYTES } from './constants.ts';
import { IntegrityError, SwarmError } from './errors.ts';
import type { BlobRef, WeightsRequest, WeightsResponse } from './messages.ts';
import { request, parseMultiaddr } from './net.ts';
import type { SwarmNode } from './net.ts';

export type BlobEvent =
  | { kind: 'cache-hit'; sha256: string; name: string; sizeBytes: number }
  | { kind: 'fetched'; sha256: string; name: string; sizeBytes: number; from: string; providers: number; ms: number; chunksFrom: Record<string, number> }
  | { kind: 'corrupt-cache'; sha256: string; name: string; got: string }
  | { kind: 'provider-failed'; sha256: string; name: string; from: string; error: string };

/** sha256 of the whole blob and of each CHUNK_BYTES chunk of it. */
export interface BlobHashes { sha256: string; chunkSha256: string[] }

/** The chunk hashes of bytes held in memory (the publisher's side). */
export function hashBlob(bytes: Uint8Array, chunkBytes = CHUNK_BYTES): BlobHashes {
  const whole = createHash('sha256').update(bytes);
  const chunkSha256: string[] = [];
  for (let off = 0; off < bytes.length; off += chunkBytes) chunkSha256.push(createHash('sha256').update(bytes.subarray(off, off + chunkBytes)).digest('hex'));
  return { sha256: whole.digest('hex'), chunkSha256 };
}

/** Stream a file once, hashing it whole and chunk by chunk (never more than one chunk in memory). */
export async function hashFile(file: string, chunkBytes = CHUNK_BYTES): Promise<BlobHashes & { sizeBytes: number }> {
  const fh = await open(file, 'r');
  try {
    const whole = createHash('sha256');
    const chunkSha256: string[] = [];
    const buf = new Uint8Array(chunkBytes);
    let sizeBytes = 0;
    for (;;) {
      let n = 0;
      while (n < chunkBytes) {
        const { bytesRead } = await fh.read(buf, n, chunkBytes - n, sizeBytes + n);
        if (bytesRead === 0) break;
        n += bytesRead;
      }
      if (n === 0) break;
      const piece = buf.subarray(0, n);
      whole.update(piece);
      chunkSha256.push(createHash('sha256').update(piece).digest('hex'));
      sizeBytes += n;
      if (n < chunkBytes) break;
    }
    return { sha256: whole.digest('hex'), chunkSha256, sizeBytes };
  } finally {
    await fh.close();
  }
}

/** A file's bytes in one buffer, read in pieces (fs.readFile refuses files over 2 GiB). */
export async function readWholeFile(file: string): Promise<Uint8Array> {
  const fh = await open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    const out = new Uint8Array(size);
    for (let off = 0; off < size;) {
      const { bytesRead } = await fh.read(out, off, Math.min(CHUNK_BYTES * 8, size - off), off);
      if (bytesRead === 0) throw new SwarmError(`${file} shrank to ${off} bytes while it was read (expected ${size})`);
      off += bytesRead;
    }
    return out;
  } finally {
    await fh.close();
  }
}

async function writeAll(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  for (let off = 0; off < bytes.length;) {
    const { bytesWritten } = await fh.write(bytes, off, Math.min(bytes.length - off, 1 << 30), position + off);
    off += bytesWritten;
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try { await fh.sync(); } finally { await fh.close(); }
}

/** One line for whatever a failed request threw: `Name: message` for an Error (a blank message says so),
 *  else the value itself, never `undefined: undefined`. */
export function errorLine(e: unknown): string {
  if (e instanceof Error) return `${e.name || 'Error'}: ${e.message || 'no message given'}`.replace(/\s*\n\s*/g, ' ');
  if (e !== null && typeof e === 'object') {
    const o = e as { name?: unknown; message?: unknown; code?: unknown };
    const name = typeof o.name === 'string' && o.name !== '' ? o.name : typeof o.code === 'string' ? o.code : 'Error';
    return `${name}: ${typeof o.message === 'string' && o.message !== '' ? o.message : JSON.stringify(e)?.slice(0, 200) ?? String(e)}`;
  }
  return e === undefined || e === null ? `the request failed with no error value (${String(e)})` : `thrown ${typeof e}: ${String(e)}`;
}

/** The peer a provider multiaddr names (its /p2p/ id), so several addresses of one peer count once. */
function providerKey(addr: string): string {
  const i = addr.lastIndexOf('/p2p/');
  return i >= 0 ? addr.slice(i + 5) : addr;
}

/** How many chunks of `chunkBytes` a blob of `sizeBytes` has, and where chunk i lies (plain float
 *  arithmetic on integers below 2^53, so offsets past 2 GiB and 4 GiB are exact). */
export function chunkCount(sizeBytes: number, chunkBytes = CHUNK_BYTES): number { return Math.ceil(sizeBytes / chunkBytes); }
export function chunkRange(i: number, sizeBytes: number, chunkBytes = CHUNK_BYTES): { offset: number; length: number } {
  const offset = i * chunkBytes;
  return { offset, length: Math.min(chunkBytes, sizeBytes - offset) };
}

export interface BlobFetchOptions {
  signal?: AbortSignal;
}

export interface BlobStoreInit {
  /** the chunk size this store cuts the blobs it publishes into (default CHUNK_BYTES, at most that);
   *  blobs it fetches follow the chunk size their reference names */
  chunkBytes?: number;
}

export class BlobStore {
  readonly dir: string;
  /** blobs verified in this process (served to others without rehashing), with their chunk hashes */
  private readonly verified = new Map<string, { file: string; sizeBytes: number; chunkSha256: string[] }>();
  /** one download per blob at a time */
  private readonly inflight = new Map<string, Promise<string>>();
  onEvent: (e: BlobEvent) => void = () => {};
  /** a private run's join token, sent with every weights request this store makes */
  token: string | null = null;

  /** the chunk size of the blobs this store publishes (chunkHashes) */
  readonly chunkBytes: number;

  constructor(dataDir: string, init: BlobStoreInit = {}) {
    this.dir = path.join(dataDir, 'blobs');
    this.chunkBytes = init.chunkBytes ?? CHUNK_BYTES;
    if (!Number.isSafeInteger(this.chunkBytes) || this.chunkBytes < 1024 || this.chunkBytes > CHUNK_BYTES) {
      throw new SwarmError(`blob chunk size ${this.chunkBytes}: must be an integer from 1024 to ${CHUNK_BYTES} bytes`);
    }
  }

  private file(sha: string): string {
    if (!/^[0-9a-f]{64}$/.test(sha)) throw new IntegrityError(`not a sha256: ${sha}`);
    return path.join(this.dir, sha);
  }

  /** Store bytes under their own hash (the coordinator publishing shards); durable before it returns. */
  async put(bytes: Uint8Array): Promise<string> {
    const h = hashBlob(bytes, this.chunkBytes);
    await mkdir(this.dir, { recursive: true });
    const f = this.file(h.sha256);
    const tmp = `${f}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    const fh = await open(tmp, 'w');
    try {
      await writeAll(fh, bytes, 0);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, f);
    await fsyncDir(this.dir);
    this.verified.set(h.sha256, { file: f, sizeBytes: bytes.length, chunkSha256: h.chunkSha256 });
    return h.sha256;
  }

  /** Store a blob that `write` puts into a file (given its path) without holding it in memory: the file is
   *  fsynced, hashed in one streaming pass, renamed under its hash and the directory fsynced before this
   *  returns; a failed write leaves nothing. */
  async putFile(write: (file: string) => Promise<void>): Promise<{ sha256: string; sizeBytes: number }> {
    await mkdir(this.dir, { recursive: true });
    const tmp = path.join(this.dir, `put.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      await write(tmp);
      const fh = await open(tmp, 'r+');
      try { await fh.sync(); } finally { await fh.close(); }
      const h = await hashFile(tmp, this.chunkBytes);
      const f = this.file(h.sha256);
      await rename(tmp, f);
      await fsyncDir(this.dir);
      this.verified.set(h.sha256, { file: f, sizeBytes: h.sizeBytes, chunkSha256: h.chunkSha256 });
      return { sha256: h.sha256, sizeBytes: h.sizeBytes };
    } finally {
      await rm(tmp, { force: true });
    }
  }

  /** Drop a blob from the cache (no longer served from here); a missing one is no error. */
  async remove(sha: string): Promise<void> {
    const f = this.file(sha);
    this.verified.delete(sha);
    await rm(f, { force: true });
  }

  /** The chunk hashes (by this store's chunkBytes) of a blob verified here, for the references a publisher hands out. */
  chunkHashes(sha256: string): string[] | undefined {
    return this.verified.get(sha256)?.chunkSha256;
  }

  /** The blob's file if it is in the cache and hashes right (hashing it once per process); a corrupt
   *  copy is deleted. */
  async cachedFile(ref: Pick<BlobRef, 'sha256' | 'name'>): Promise<string | null> {
    const known = this.verified.get(ref.sha256);
    if (known !== undefined) return known.file;
    const f = this.file(ref.sha256);
    let h: Awaited<ReturnType<typeof hashFile>>;
    try {
      h = await hashFile(f, this.chunkBytes);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
    if (h.sha256 !== ref.sha256) {
      this.onEvent({ kind: 'corrupt-cache', sha256: ref.sha256, name: ref.name, got: h.sha256 });
      await rm(f, { force: true });
      return null;
    }
    this.verified.set(ref.sha256, { file: f, sizeBytes: h.sizeBytes, chunkSha256: h.chunkSha256 });
    return f;
  }

  /** Read a blob from the local cache if it is there and hashes right; a corrupt copy is deleted. */
  async readCached(ref: Pick<BlobRef, 'sha256' | 'name'>): Promise<Uint8Array | null> {
    const f = await this.cachedFile(ref);
    return f === null ? null : readWholeFile(f);
  }

  /** The blob's verified file: from the cache, else fetched in chunks from its providers. */
  async fetch(node: SwarmNode, ref: BlobRef, opts: BlobFetchOptions = {}): Promise<string> {
    const cached = await this.cachedFile(ref);
    if (cached !== null) {
      this.onEvent({ kind: 'cache-hit', sha256: ref.sha256, name: ref.name, sizeBytes: ref.sizeBytes });
      return cached;
    }
    let p = this.inflight.get(ref.sha256);
    if (p === undefined) {
      p = this.download(node, ref, opts.signal).finally(() => this.inflight.delete(ref.sha256));
      this.inflight.set(ref.sha256, p);
    }
    return p;
  }

  /** The blob's bytes in one buffer (fetched first if need be). Read in pieces, so a blob over 2 GiB
   *  does not fail as fs.readFile would. */
  async get(node: SwarmNode, ref: BlobRef, opts: BlobFetchOptions = {}): Promise<Uint8Array> {
    return readWholeFile(await this.fetch(node, ref, opts));
  }

  private async download(node: SwarmNode, ref: BlobRef, signal?: AbortSignal): Promise<string> {
    const cb = ref.chunkBytes ?? CHUNK_BYTES;
    if (ref.chunkSha256 !== undefined && ref.chunkSha256.length !== chunkCount(ref.sizeBytes, cb)) {
      throw new IntegrityError(`blob ${ref.name}: its reference lists ${ref.chunkSha256.length} chunk hashes, a ${ref.sizeBytes}-byte blob has ${chunkCount(ref.sizeBytes, cb)} chunks of ${cb} bytes`);
    }
    // providers by peer, in the reference's order (peers already serving the stage come first)
    const byPeer = new Map<string, string[]>();
    for (const a of ref.providers) {
      const k = providerKey(a);
      byPeer.set(k, [...(byPeer.get(k) ?? []), a]);
    }
    const peers = [...byPeer.entries()].map(([key, addrs]) => ({ key, addrs }));
    if (peers.length === 0) throw new SwarmError(`blob ${ref.name} (${ref.sha256}) has no providers`);
    await mkdir(this.dir, { recursive: true });
    const final = this.file(ref.sha256);
    const errors: string[] = [];
    const t0 = performance.now();
    const attempt = async (group: typeof peers): Promise<{ ok: boolean; chunksFrom: Record<string, number> }> => {
      const tmp = `${final}.part-${process.pid}-${randomBytes(4).toString('hex')}`;
      try {
        const chunksFrom = await this.fetchChunks(node, ref, group, tmp, errors, signal);
        const h = await hashFile(tmp, this.chunkBytes);
        if (h.sha256 !== ref.sha256 || h.sizeBytes !== ref.sizeBytes) {
          const who = Object.keys(chunksFrom);
          const msg = `blob ${ref.name} hashes to ${h.sha256} (${h.sizeBytes} bytes), expected ${ref.sha256} (${ref.sizeBytes} bytes)`;
          errors.push(`${who.join('+')}: IntegrityError: ${msg}`);
          if (who.length === 1) this.onEvent({ kind: 'provider-failed', sha256: ref.sha256, name: ref.name, from: who[0]!, error: `IntegrityError: ${msg}` });
          return { ok: false, chunksFrom };
        }
        await rename(tmp, final);
        await fsyncDir(this.dir);
        this.verified.set(ref.sha256, { file: final, sizeBytes: h.sizeBytes, chunkSha256: h.chunkSha256 });
        return { ok: true, chunksFrom };
      } finally {
        await rm(tmp, { force: true });
      }
    };
    let r = await attempt(peers);
    // without chunk hashes a bad whole-blob hash names no culprit: then try each provider alone
    if (!r.ok && ref.chunkSha256 === undefined && peers.length > 1) {
      for (const p of peers) {
        signal?.throwIfAborted();
        r = await attempt([p]).catch((e: unknown) => { if (signal?.aborted === true) throw e; return { ok: false, chunksFrom: {} }; });
        if (r.ok) break;
      }
    }
    if (!r.ok) throw new SwarmError(`could not fetch blob ${ref.name} (${ref.sha256}) from any of ${peers.length} providers: ${errors.join('; ')}`);
    const from = Object.keys(r.chunksFrom);
    this.onEvent({ kind: 'fetched', sha256: ref.sha256, name: ref.name, sizeBytes: ref.sizeBytes, from: from.join(','), providers: from.length, ms: Math.round(performance.now() - t0), chunksFrom: r.chunksFrom });
    return final;
  }

  /** Fill `tmp` with the blob's chunks, BLOB_PEER_PARALLEL requests in flight per provider. A provider
   *  that fails or sends a bad chunk is dropped and its chunk goes back in the queue for the others.
   *  Returns how many chunks each provider delivered. */
  private async fetchChunks(node: SwarmNode, ref: BlobRef, peers: { key: string; addrs: string[] }[], tmp: string, errors: string[], signal?: AbortSignal): Promise<Record<string, number>> {
    const cb = ref.chunkBytes ?? CHUNK_BYTES;
    const n = chunkCount(ref.sizeBytes, cb);
    const queue = Array.from({ length: n }, (_, i) => i);
    const chunksFrom: Record<string, number> = {};
    const bad = new Set<string>();
    const token = this.token !== null ? { token: this.token } : {};
    const fh = await open(tmp, 'w');
    try {
      const worker = async (p: { key: string; addrs: string[] }): Promise<void> => {
        const target = p.addrs.map(parseMultiaddr);
        while (queue.length > 0 && !bad.has(p.key)) {
          signal?.throwIfAborted();
          const i = queue.shift()!;
          const { offset, length } = chunkRange(i, ref.sizeBytes, cb);
          try {
            const res = await request(node, target, 'weights', { sha256: ref.sha256, offset, length, ...token }, { timeoutMs: BLOB_TIMEOUT_MS, signal });
            if (res.sizeBytes !== ref.sizeBytes) throw new IntegrityError(`the provider says the blob has ${res.sizeBytes} bytes, the reference ${ref.sizeBytes}`);
            if (res.bytes.length !== length) throw new IntegrityError(`chunk ${i} at ${offset}: ${res.bytes.length} bytes, expected ${length}`);
            const want = ref.chunkSha256?.[i];
            if (want !== undefined) {
              const got = createHash('sha256').update(res.bytes).digest('hex');
              if (got !== want) throw new IntegrityError(`chunk ${i} at ${offset} hashes to ${got}, the reference says ${want}`);
            }
            await writeAll(fh, res.bytes, offset);
            chunksFrom[p.key] = (chunksFrom[p.key] ?? 0) + 1;
          } catch (e) {
            queue.unshift(i);
            // a fetch given up on (the volunteer is leaving) is not a provider's failure
            if (signal?.aborted === true) throw signal.reason ?? e;
            if (!bad.has(p.key)) {
              bad.add(p.key);
              const msg = errorLine(e);
              errors.push(`${p.key}: ${msg}`);
              this.onEvent({ kind: 'provider-failed', sha256: ref.sha256, name: ref.name, from: p.key, error: msg });
            }
          }
        }
      };
      if (n === 0) {
        // an empty blob: any provider's answer must agree that it is empty
        for (const p of peers) {
          try {
            const res = await request(node, p.addrs.map(parseMultiaddr), 'weights', { sha256: ref.sha256, offset: 0, length: 1, ...token }, { timeoutMs: BLOB_TIMEOUT_MS, signal });
            if (res.sizeBytes !== 0 || res.bytes.length !== 0) throw new IntegrityError(`the provider says the blob has ${res.sizeBytes} bytes, the reference 0`);
            chunksFrom[p.key] = 0;
            break;
          } catch (e) {
            if (signal?.aborted === true) throw signal.reason ?? e;
            errors.push(`${p.key}: ${errorLine(e)}`);
          }
        }
      }
      // rounds: when a provider drops out, the chunk it held goes back to the queue; whoever is left takes it
      while (queue.length > 0) {
        const good = peers.filter((p) => !bad.has(p.key)).slice(0, BLOB_MAX_PEERS);
        if (good.length === 0) break;
        await Promise.all(good.flatMap((p) => Array.from({ length: BLOB_PEER_PARALLEL }, () => worker(p))));
      }
      if (queue.length > 0) throw new SwarmError(`could not fetch blob ${ref.name} (${ref.sha256}) from any of ${peers.length} providers: ${errors.join('; ')}`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    return chunksFrom;
  }

  /** Answer a weights request from blobs verified in this process (never from unverified files),
   *  reading just the requested range from disk. */
  async serveChunk(req: WeightsRequest): Promise<WeightsResponse> {
    const v = this.verified.get(req.sha256);
    if (v === undefined) throw new SwarmError(`blob ${req.sha256} is not held here`);
    const size = (await stat(v.file)).size;
    if (req.offset > size) throw new SwarmError(`offset ${req.offset} is past the end of blob ${req.sha256} (${size} bytes)`);
    const len = Math.min(req.length, CHUNK_BYTES, size - req.offset);
    const fh = await open(v.file, 'r');
    try {
      const buf = new Uint8Array(len);
      for (let off = 0; off < len;) {
        const { bytesRead } = await fh.read(buf, off, len - off, req.offset + off);
        if (bytesRead === 0) throw new SwarmError(`blob ${req.sha256} shrank while it was served`);
        off += bytesRead;
      }
      return { sizeBytes: size, bytes: buf };
    } finally {
      await fh.close();
    }
  }
}
