// Content-addressed blob store: sha256-verified local cache, chunked fetch from providers, serving.
import { mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { BLOB_TIMEOUT_MS } from './constants.ts';
import { readChunks } from './pager.ts';
import { IntegrityError, SwarmError } from './errors.ts';
import type { BlobRef, WeightsRequest, WeightsResponse } from './messages.ts';
import { request, parseMultiaddr } from './net.ts';
import type { SwarmNode } from './net.ts';
import { sha256Hex } from './hash.ts';

export type BlobEvent =
  | { kind: 'cache-hit'; sha256: string; name: string; sizeBytes: number }
  | { kind: 'fetched'; sha256: string; name: string; sizeBytes: number; from: string }
  | { kind: 'corrupt-cache'; sha256: string; name: string; got: string }
  | { kind: 'provider-failed'; sha256: string; name: string; from: string; error: string };

export class BlobStore {
  readonly dir: string;
  /** blobs verified in this process: served to others without rehashing */
  private readonly verified = new Map<string, string>();
  onEvent: (e: BlobEvent) => void = () => {};
  /** a private run's join token, sent with every weights request this store makes */
  token: string | null = null;

  constructor(dataDir: string) {
    this.dir = path.join(dataDir, 'blobs');
  }

  private file(sha: string): string {
    if (!/^[0-9a-f]{64}$/.test(sha)) throw new IntegrityError(`not a sha256: ${sha}`);
    return path.join(this.dir, sha);
  }

  /** Store bytes under their own hash (the coordinator publishing shards). */
  async put(bytes: Uint8Array): Promise<string> {
    const sha = sha256Hex(bytes);
    await mkdir(this.dir, { recursive: true });
    const f = this.file(sha);
    const tmp = `${f}.tmp-${process.pid}`;
    await writeFile(tmp, bytes);
    await rename(tmp, f);
    this.verified.set(sha, f);
    return sha;
  }

  /** Drop a blob from the cache (no longer served from here); a missing one is no error. */
  async remove(sha: string): Promise<void> {
    const f = this.file(sha);
    this.verified.delete(sha);
    await rm(f, { force: true });
  }

  /** Read a blob from the local cache if it is there and hashes right; a corrupt copy is deleted. */
  async readCached(ref: Pick<BlobRef, 'sha256' | 'name'>): Promise<Uint8Array | null> {
    const f = this.file(ref.sha256);
    let bytes: Uint8Array;
    try {
      bytes = new Uint8Array(await readFile(f));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
    const got = sha256Hex(bytes);
    if (got !== ref.sha256) {
      this.verified.delete(ref.sha256);
      this.onEvent({ kind: 'corrupt-cache', sha256: ref.sha256, name: ref.name, got });
      await rm(f, { force: true });
      return null;
    }
    this.verified.set(ref.sha256, f);
    return bytes;
  }

  /** The blob's bytes: from the verified cache, else fetched chunk by chunk from the first provider
   *  that delivers content with the right hash. */
  async get(node: SwarmNode, ref: BlobRef, opts: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    const cached = await this.readCached(ref);
    if (cached !== null) {
      this.onEvent({ kind: 'cache-hit', sha256: ref.sha256, name: ref.name, sizeBytes: cached.length });
      return cached;
    }
    const errors: string[] = [];
    for (const provider of ref.providers) {
      try {
        const bytes = await this.fetchFrom(node, provider, ref, opts.signal);
        const got = sha256Hex(bytes);
        if (got !== ref.sha256) throw new IntegrityError(`blob ${ref.name} from ${provider} hashes to ${got}, expected ${ref.sha256}`);
        await this.put(bytes);
        this.onEvent({ kind: 'fetched', sha256: ref.sha256, name: ref.name, sizeBytes: bytes.length, from: provider });
        return bytes;
      } catch (e) {
        // a fetch given up on (the volunteer is leaving) is not a provider's failure: stop here
        if (opts.signal?.aborted === true) throw opts.signal.reason ?? e;
        const msg = `${(e as Error).name}: ${(e as Error).message}`;
        errors.push(`${provider}: ${msg}`);
        this.onEvent({ kind: 'provider-failed', sha256: ref.sha256, name: ref.name, from: provider, error: msg });
      }
    }
    throw new SwarmError(`could not fetch blob ${ref.name} (${ref.sha256}) from any of ${ref.providers.length} providers: ${errors.join('; ')}`);
  }

  private async fetchFrom(node: SwarmNode, provider: string, ref: BlobRef, signal?: AbortSignal): Promise<Uint8Array> {
    const target = parseMultiaddr(provider);
    const token = this.token !== null ? { token: this.token } : {};
    try {
      return await readChunks((offset, length, sig) => request(node, target, 'weights', { sha256: ref.sha256, offset, length, ...token }, { timeoutMs: BLOB_TIMEOUT_MS, signal: sig }),
        `blob ${ref.name}`, { expectedBytes: ref.sizeBytes, signal });
    } catch (e) {
      // a provider that sends the wrong size or a bad chunk is an integrity failure, as a wrong hash is
      if ((e as Error).name === 'SwarmError') throw new IntegrityError((e as Error).message);
      throw e;
    }
  }

  /** Answer a weights request from blobs verified in this process (never from unverified files). */
  async serveChunk(req: WeightsRequest): Promise<WeightsResponse> {
    const f = this.verified.get(req.sha256);
    if (f === undefined) throw new SwarmError(`blob ${req.sha256} is not held here`);
    const size = (await stat(f)).size;
    if (req.offset > size) throw new SwarmError(`offset ${req.offset} is past the end of blob ${req.sha256} (${size} bytes)`);
    const len = Math.min(req.length, size - req.offset);
    const fh = await open(f, 'r');
    try {
      const buf = new Uint8Array(len);
      await fh.read(buf, 0, len, req.offset);
      return { sizeBytes: size, bytes: buf };
    } finally {
      await fh.close();
    }
  }
}
