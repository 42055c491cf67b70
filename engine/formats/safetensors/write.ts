// safetensors writing: the header layout of safetensors' own writer, files written at once or streamed tensor by
// tensor, sharded checkpoints with their index, a spooling writer for sizes known only late, and in-memory files.
import { open, mkdir, writeFile, rm } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { join, dirname, basename } from 'node:path';
import { DTYPE_ORDER, MAX_HEADER_BYTES, SafetensorsError, byteSizeOf, isDtype } from './header.ts';
import type { Dtype, TensorInfo } from './header.ts';
import { encodeFromFloat32 } from './convert.ts';
import { IO_CHUNK_BYTES, readAt } from './read.ts';

export interface TensorSpec {
  name: string;
  dtype: Dtype;
  shape: number[];
}

export interface TensorData extends TensorSpec {
  /** raw little-endian bytes, or float32 values encoded to `dtype` */
  data: Uint8Array | Float32Array;
}

/** Header bytes (JSON padded with spaces to a multiple of 8) and per-tensor offsets, with tensors
 *  sorted by descending dtype order, then name — as safetensors' own writer lays them out. */
export function layoutSafetensors(specs: readonly TensorSpec[], metadata?: Record<string, string> | null, source = 'safetensors writer'): {
  header: Uint8Array; order: TensorInfo[]; totalBytes: number;
} {
  const seen = new Set<string>();
  for (const s of specs) {
    if (s.name === '__metadata__') throw new SafetensorsError(`${source}: "__metadata__" is reserved and cannot name a tensor`);
    if (seen.has(s.name)) throw new SafetensorsError(`${source}: duplicate tensor name ${JSON.stringify(s.name)}`);
    if (!isDtype(s.dtype)) throw new SafetensorsError(`${source}: tensor ${JSON.stringify(s.name)}: unknown dtype ${JSON.stringify(s.dtype)}`);
    if (!s.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new SafetensorsError(`${source}: tensor ${JSON.stringify(s.name)}: bad shape ${JSON.stringify(s.shape)}`);
    seen.add(s.name);
  }
  const sorted = [...specs].sort((a, b) =>
    (DTYPE_ORDER.get(b.dtype)! - DTYPE_ORDER.get(a.dtype)!) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const order: TensorInfo[] = [];
  let cursor = 0;
  const parts: string[] = [];
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new SafetensorsError(`${source}: metadata[${JSON.stringify(k)}] must be a string`);
    }
    const keys = Object.keys(metadata).sort();
    parts.push(`"__metadata__":{${keys.map((k) => `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`).join(',')}}`);
  }
  for (const s of sorted) {
    const size = byteSizeOf(s.dtype, s.shape, `${source}: tensor ${JSON.stringify(s.name)}: `);
    const info: TensorInfo = { name: s.name, dtype: s.dtype, shape: [...s.shape], dataOffsets: [cursor, cursor + size] };
    order.push(info);
    parts.push(`${JSON.stringify(s.name)}:{"dtype":"${s.dtype}","shape":[${s.shape.join(',')}],"data_offsets":[${cursor},${cursor + size}]}`);
    cursor += size;
  }
  let json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) {
    const padded = new Uint8Array(json.length + pad).fill(0x20);
    padded.set(json);
    json = padded;
  }
  if (json.length > MAX_HEADER_BYTES) throw new SafetensorsError(`${source}: header would be ${json.length} bytes, over the ${MAX_HEADER_BYTES}-byte limit`);
  const header = new Uint8Array(8 + json.length);
  new DataView(header.buffer).setBigUint64(0, BigInt(json.length), true);
  header.set(json, 8);
  return { header, order, totalBytes: cursor };
}

/** A tensor's bytes as the file stores them: raw bytes as given, float32 values encoded to its dtype. */
function bytesOf(dtype: Dtype, data: Uint8Array | Float32Array): Uint8Array {
  if (!(data instanceof Float32Array)) return data;
  return dtype === 'F32' ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : encodeFromFloat32(dtype, data);
}

/** A whole safetensors file in memory, laid out as the writers lay out files (content-addressed blobs hash
 *  these bytes, so the layout must never depend on anything but the tensors and the metadata). */
export function encodeSafetensors(tensors: readonly TensorData[], metadata?: Record<string, string> | null, source = 'safetensors encoder'): Uint8Array {
  const { header, order, totalBytes } = layoutSafetensors(tensors, metadata, source);
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const out = new Uint8Array(header.length + totalBytes);
  out.set(header);
  for (const info of order) {
    const bytes = bytesOf(info.dtype, byName.get(info.name)!.data);
    const size = info.dataOffsets[1] - info.dataOffsets[0];
    if (bytes.byteLength !== size) {
      throw new SafetensorsError(`${source}: tensor ${JSON.stringify(info.name)} (${info.dtype} [${info.shape.join(', ')}]) needs ${size} bytes, got ${bytes.byteLength}`);
    }
    out.set(bytes, header.length + info.dataOffsets[0]);
  }
  return out;
}

/** Streaming writer: the header (all offsets) is written at create; tensor bytes are then written in
 *  any order at their offsets, so a producer never holds more than one tensor. close() checks all arrived. */
export class SafetensorsWriter {
  readonly path: string;
  private fh: FileHandle | null;
  private readonly dataStart: number;
  private readonly byName: Map<string, TensorInfo>;
  private readonly written = new Set<string>();

  private constructor(path: string, fh: FileHandle, dataStart: number, order: TensorInfo[]) {
    this.path = path;
    this.fh = fh;
    this.dataStart = dataStart;
    this.byName = new Map(order.map((t) => [t.name, t]));
  }

  static async create(path: string, specs: readonly TensorSpec[], metadata?: Record<string, string> | null): Promise<SafetensorsWriter> {
    const { header, order, totalBytes } = layoutSafetensors(specs, metadata, path);
    await mkdir(dirname(path), { recursive: true });
    const fh = await open(path, 'w');
    try {
      await fh.write(header, 0, header.length, 0);
      await fh.truncate(header.length + totalBytes);
    } catch (e) {
      await fh.close();
      throw e;
    }
    return new SafetensorsWriter(path, fh, header.length, order);
  }

  has(name: string): boolean { return this.byName.has(name); }

  async write(name: string, data: Uint8Array | Float32Array): Promise<void> {
    const t = this.byName.get(name);
    if (!t) throw new SafetensorsError(`${this.path}: tensor ${JSON.stringify(name)} was not declared when the file was created`);
    if (this.written.has(name)) throw new SafetensorsError(`${this.path}: tensor ${JSON.stringify(name)} written twice`);
    if (!this.fh) throw new SafetensorsError(`${this.path}: writer is closed (writing ${JSON.stringify(name)})`);
    let bytes: Uint8Array;
    if (data instanceof Float32Array) {
      if (t.dtype !== 'F32') throw new SafetensorsError(`${this.path}: tensor ${JSON.stringify(name)} is ${t.dtype}; encode it (encodeFromFloat32) before writing`);
      bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    } else {
      bytes = data;
    }
    const size = t.dataOffsets[1] - t.dataOffsets[0];
    if (bytes.byteLength !== size) {
      throw new SafetensorsError(`${this.path}: tensor ${JSON.stringify(name)} (${t.dtype} [${t.shape.join(', ')}]) needs ${size} bytes, got ${bytes.byteLength}`);
    }
    let done = 0;
    while (done < size) {
      const { bytesWritten } = await this.fh.write(bytes, done, Math.min(IO_CHUNK_BYTES, size - done), this.dataStart + t.dataOffsets[0] + done);
      done += bytesWritten;
    }
    this.written.add(name);
  }

  /** Closes the file; throws naming the tensors never written (the file is then incomplete). */
  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    if (fh) await fh.close();
    const missing = [...this.byName.keys()].filter((n) => !this.written.has(n));
    if (missing.length) throw new SafetensorsError(`${this.path}: closed with ${missing.length} tensor(s) never written: ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', ...' : ''}`);
  }
}

/** Write one file at once from in-memory tensors (adapters, tests). Float32Array data is encoded to the
 *  tensor's dtype (F32/F16/BF16/F64/ints). */
export async function writeSafetensors(path: string, tensors: readonly TensorData[], metadata?: Record<string, string> | null): Promise<void> {
  const w = await SafetensorsWriter.create(path, tensors, metadata);
  try {
    for (const t of tensors) {
      await w.write(t.name, bytesOf(t.dtype, t.data));
    }
  } finally {
    await w.close();
  }
}

/** Writes <baseName>.safetensors, or <baseName>-0000i-of-0000n.safetensors plus <baseName>.safetensors.index.json
 *  (transformers' layout) when the total exceeds maxShardBytes. Tensors are assigned to shards greedily in the
 *  given order, keeping tensors with the same group key (e.g. one bnb module's parts) in one shard. */
export class ShardedSafetensorsWriter {
  private readonly writers: SafetensorsWriter[];
  /** the data files, then the index file when sharded */
  readonly fileNames: string[];
  private readonly route: Map<string, SafetensorsWriter>;
  private readonly indexPath: string | null;
  private readonly indexJson: string | null;

  private constructor(writers: SafetensorsWriter[], route: Map<string, SafetensorsWriter>, indexPath: string | null, indexJson: string | null) {
    this.writers = writers;
    this.fileNames = writers.map((w) => basename(w.path));
    if (indexPath) this.fileNames.push(basename(indexPath));
    this.route = route;
    this.indexPath = indexPath;
    this.indexJson = indexJson;
  }

  static async create(dir: string, specs: readonly TensorSpec[], opts: {
    metadata?: Record<string, string> | null; maxShardBytes?: number; baseName?: string; groupOf?: (name: string) => string;
  } = {}): Promise<ShardedSafetensorsWriter> {
    const maxShardBytes = opts.maxShardBytes ?? 5e9;
    const baseName = opts.baseName ?? 'model';
    const groupOf = opts.groupOf ?? ((n: string) => n);
    const groups = new Map<string, TensorSpec[]>();
    for (const s of specs) {
      const g = groupOf(s.name);
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g)!.push(s);
    }
    const shards: TensorSpec[][] = [[]];
    let shardBytes = 0;
    let totalBytes = 0;
    for (const members of groups.values()) {
      const bytes = members.reduce((a, s) => a + byteSizeOf(s.dtype, s.shape, `${dir}: tensor ${JSON.stringify(s.name)}: `), 0);
      if (shardBytes > 0 && shardBytes + bytes > maxShardBytes) { shards.push([]); shardBytes = 0; }
      shards[shards.length - 1].push(...members);
      shardBytes += bytes;
      totalBytes += bytes;
    }
    await mkdir(dir, { recursive: true });
    const writers: SafetensorsWriter[] = [];
    const route = new Map<string, SafetensorsWriter>();
    const weightMap: Record<string, string> = {};
    try {
      for (let i = 0; i < shards.length; i++) {
        const file = shards.length === 1 ? `${baseName}.safetensors`
          : `${baseName}-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`;
        const w = await SafetensorsWriter.create(join(dir, file), shards[i], opts.metadata);
        writers.push(w);
        for (const s of shards[i]) { route.set(s.name, w); weightMap[s.name] = file; }
      }
    } catch (e) {
      for (const w of writers) await w.close().catch(() => undefined);
      throw e;
    }
    if (shards.length === 1) return new ShardedSafetensorsWriter(writers, route, null, null);
    const sortedMap: Record<string, string> = {};
    for (const k of Object.keys(weightMap).sort()) sortedMap[k] = weightMap[k];
    const indexJson = JSON.stringify({ metadata: { total_size: totalBytes }, weight_map: sortedMap }, null, 2) + '\n';
    return new ShardedSafetensorsWriter(writers, route, join(dir, `${baseName}.safetensors.index.json`), indexJson);
  }

  get shardCount(): number { return this.writers.length; }

  write(name: string, data: Uint8Array | Float32Array): Promise<void> {
    const w = this.route.get(name);
    if (!w) throw new SafetensorsError(`sharded writer: tensor ${JSON.stringify(name)} was not declared`);
    return w.write(name, data);
  }

  async close(): Promise<void> {
    const errors: unknown[] = [];
    for (const w of this.writers) await w.close().catch((e: unknown) => errors.push(e));
    if (errors.length) throw errors[0];
    if (this.indexPath && this.indexJson) await writeFile(this.indexPath, this.indexJson);
  }
}

/** Writer for producers that learn tensor sizes only as they go (e.g. a bnb quant state's JSON length
 *  depends on its offset's digits): tensors are appended to a spool file as they come, then finish()
 *  lays out the final file(s) in safetensors order and copies each tensor once. Memory stays at one tensor. */
export class SpoolingSafetensorsWriter {
  readonly dir: string;
  private readonly spoolPath: string;
  private fh: FileHandle | null;
  private readonly entries: Array<TensorSpec & { spoolOffset: number; bytes: number }> = [];
  private readonly names = new Set<string>();
  private spoolBytes = 0;
  private readonly opts: { metadata?: Record<string, string> | null; maxShardBytes: number; baseName: string; groupOf: (name: string) => string };

  private constructor(dir: string, spoolPath: string, fh: FileHandle, opts: SpoolingSafetensorsWriter['opts']) {
    this.dir = dir;
    this.spoolPath = spoolPath;
    this.fh = fh;
    this.opts = opts;
  }

  static async create(dir: string, opts: {
    metadata?: Record<string, string> | null; maxShardBytes?: number; baseName?: string; groupOf?: (name: string) => string;
  } = {}): Promise<SpoolingSafetensorsWriter> {
    await mkdir(dir, { recursive: true });
    const baseName = opts.baseName ?? 'model';
    const spoolPath = join(dir, `.${baseName}.safetensors.spool`);
    const fh = await open(spoolPath, 'w+');
    return new SpoolingSafetensorsWriter(dir, spoolPath, fh, {
      metadata: opts.metadata, maxShardBytes: opts.maxShardBytes ?? 5e9, baseName, groupOf: opts.groupOf ?? ((n) => n),
    });
  }

  async add(name: string, dtype: Dtype, shape: number[], data: Uint8Array | Float32Array): Promise<void> {
    if (!this.fh) throw new SafetensorsError(`${this.dir}: writer already finished (adding ${JSON.stringify(name)})`);
    if (this.names.has(name)) throw new SafetensorsError(`${this.dir}: duplicate tensor name ${JSON.stringify(name)}`);
    if (!isDtype(dtype)) throw new SafetensorsError(`${this.dir}: tensor ${JSON.stringify(name)}: unknown dtype ${JSON.stringify(dtype)}`);
    const size = byteSizeOf(dtype, shape, `${this.dir}: tensor ${JSON.stringify(name)}: `);
    const bytes = bytesOf(dtype, data);
    if (bytes.byteLength !== size) throw new SafetensorsError(`${this.dir}: tensor ${JSON.stringify(name)} (${dtype} [${shape.join(', ')}]) needs ${size} bytes, got ${bytes.byteLength}`);
    let done = 0;
    while (done < size) {
      const { bytesWritten } = await this.fh.write(bytes, done, Math.min(IO_CHUNK_BYTES, size - done), this.spoolBytes + done);
      done += bytesWritten;
    }
    this.entries.push({ name, dtype, shape: [...shape], spoolOffset: this.spoolBytes, bytes: size });
    this.names.add(name);
    this.spoolBytes += size;
  }

  /** Writes the final file(s) (+ index when sharded) and removes the spool. Returns the file names. */
  async finish(): Promise<string[]> {
    const spool = this.fh;
    if (!spool) throw new SafetensorsError(`${this.dir}: writer already finished`);
    this.fh = null;
    try {
      const w = await ShardedSafetensorsWriter.create(this.dir, this.entries, {
        metadata: this.opts.metadata, maxShardBytes: this.opts.maxShardBytes, baseName: this.opts.baseName, groupOf: this.opts.groupOf,
      });
      for (const e of this.entries) await w.write(e.name, await readAt(spool, e.spoolOffset, e.bytes, this.spoolPath));
      await w.close();
      return w.fileNames;
    } finally {
      await spool.close();
      await rm(this.spoolPath, { force: true });
    }
  }

  /** Drop everything written so far (on error). */
  async abort(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    if (fh) await fh.close();
    await rm(this.spoolPath, { force: true });
  }
}
