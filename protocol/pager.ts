// The one pager: everything too large for one frame moves as tensor pages (lists) or byte chunks (blobs, state).
import { PAGE_BYTES, PAGE_TENSORS, CHUNK_BYTES } from './constants.ts';
import { SchemaError, SwarmError } from './errors.ts';

/** One page of a list: items [from, from + count) of `total`. */
export interface Page { from: number; count: number }

/** Split a list of items of the given byte sizes into pages of at most `pageBytes` (and at most
 *  `maxCount` items), every page holding at least one item. Both ends use it, so a sender's pages
 *  and a server's answers agree. */
export function planPages(byteSizes: readonly number[], pageBytes = PAGE_BYTES, maxCount = PAGE_TENSORS): Page[] {
  const out: Page[] = [];
  let from = 0;
  while (from < byteSizes.length) {
    let bytes = 0, count = 0;
    while (from + count < byteSizes.length && count < maxCount && (count === 0 || bytes + byteSizes[from + count]! <= pageBytes)) {
      bytes += byteSizes[from + count]!;
      count++;
    }
    out.push({ from, count });
    from += count;
  }
  return out;
}

/** Server side: the page a request for [from, from + count) of `total` items gets — validated, capped
 *  at PAGE_TENSORS items and, given `byteSize`, at PAGE_BYTES (always at least one item). */
export function servePage(total: number, from: number, count: number, what: string, byteSize?: (i: number) => number): Page {
  if (!Number.isInteger(from) || from < 0 || from > total) throw new SchemaError(`${what}: page start ${from} outside [0, ${total}]`);
  if (!Number.isInteger(count) || count < 0) throw new SchemaError(`${what}: page count ${count} is not a non-negative integer`);
  let n = Math.min(count, PAGE_TENSORS, total - from);
  if (byteSize !== undefined) {
    let bytes = 0, k = 0;
    while (k < n && (k === 0 || bytes + byteSize(from + k) <= PAGE_BYTES)) bytes += byteSize(from + k++);
    n = k;
  }
  return { from, count: n };
}

export interface PageReply<T> { total: number; items: readonly T[] }

/** Client side: read a whole list page by page. `fetchPage(from)` asks for items from `from` on; a
 *  reply whose total changes mid-transfer or that makes no progress is an error. */
export async function readPages<T>(fetchPage: (from: number, signal?: AbortSignal) => Promise<PageReply<T>>, what: string, opts: { signal?: AbortSignal } = {}): Promise<T[]> {
  const out: T[] = [];
  let total: number | undefined;
  do {
    opts.signal?.throwIfAborted();
    const res = await fetchPage(out.length, opts.signal);
    if (total !== undefined && res.total !== total) throw new SwarmError(`${what}: the list changed from ${total} to ${res.total} items mid-transfer`);
    total = res.total;
    if (res.items.length === 0 && out.length < total) throw new SwarmError(`${what}: empty page at ${out.length} of ${total}`);
    if (out.length + res.items.length > total) throw new SwarmError(`${what}: page overruns the list's ${total} items`);
    for (const x of res.items) out.push(x);
  } while (out.length < total);
  return out;
}

export interface ChunkReply { sizeBytes: number; bytes: Uint8Array }

/** Server side: bytes [offset, offset + length) of `data` (capped at CHUNK_BYTES), validated. */
export function serveChunk(data: Uint8Array, offset: number, length: number, what: string): ChunkReply {
  if (!Number.isInteger(offset) || offset < 0 || offset > data.length) throw new SchemaError(`${what}: offset ${offset} past the ${data.length} bytes`);
  const len = Math.max(0, Math.min(length, CHUNK_BYTES, data.length - offset));
  return { sizeBytes: data.length, bytes: data.subarray(offset, offset + len) };
}

/** Client side: read a byte range chunk by chunk into one buffer. `expectedBytes`, when known
 *  (a blob's size), is checked against every reply. */
export async function readChunks(fetchChunk: (offset: number, length: number, signal?: AbortSignal) => Promise<ChunkReply>, what: string,
  opts: { expectedBytes?: number; chunkBytes?: number; signal?: AbortSignal } = {}): Promise<Uint8Array> {
  const chunkBytes = opts.chunkBytes ?? CHUNK_BYTES;
  let out: Uint8Array | null = opts.expectedBytes !== undefined ? new Uint8Array(opts.expectedBytes) : null;
  let size = opts.expectedBytes, off = 0;
  do {
    opts.signal?.throwIfAborted();
    const length = Math.max(1, Math.min(chunkBytes, (size ?? Infinity) - off));
    const res = await fetchChunk(off, length, opts.signal);
    if (size !== undefined && res.sizeBytes !== size) throw new SwarmError(`${what}: the sender says ${res.sizeBytes} bytes, expected ${size}`);
    size = res.sizeBytes;
    out ??= new Uint8Array(size);
    if (size === 0) break;
    if (res.bytes.length === 0 || off + res.bytes.length > size) throw new SwarmError(`${what}: bad chunk of ${res.bytes.length} bytes at ${off} of ${size}`);
    out.set(res.bytes, off);
    off += res.bytes.length;
  } while (off < size);
  return out!;
}
