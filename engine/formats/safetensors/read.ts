// safetensors reading: one file opened lazily (header at open, each tensor read from disk on demand) and
// transformers' sharded checkpoints (model.safetensors.index.json).
import { open, readFile } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { join, dirname } from 'node:path';
import { existsSync } from 'node:fs';
import { SafetensorsError, headerLength, parseSafetensorsHeader } from './header.ts';
import type { ParsedHeader, TensorInfo } from './header.ts';
import { decodeToFloat32 } from './convert.ts';

/** A set of named tensors readable on demand (one file or a sharded checkpoint). */
export interface TensorSource {
  names(): string[];
  has(name: string): boolean;
  info(name: string): TensorInfo;
  /** raw little-endian bytes, exactly data_offsets long */
  readRaw(name: string): Promise<Uint8Array>;
  /** decoded to float32 (float and integer dtypes) */
  readFloat32(name: string): Promise<Float32Array>;
  /** __metadata__ of the (first) file */
  readonly metadata: Record<string, string> | null;
  close(): Promise<void>;
}

/** fs read() and write() take at most 2 GiB per call */
export const IO_CHUNK_BYTES = 1 << 30;

/** `length` bytes from `position` of an open file (several reads when over IO_CHUNK_BYTES). */
export async function readAt(fh: FileHandle, position: number, length: number, path: string): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(out, done, Math.min(IO_CHUNK_BYTES, length - done), position + done);
    if (bytesRead === 0) throw new SafetensorsError(`${path}: unexpected end of file at byte ${position + done} (wanted ${length} bytes from ${position})`);
    done += bytesRead;
  }
  return out;
}

export class SafetensorsFile implements TensorSource {
  readonly path: string;
  readonly metadata: Record<string, string> | null;
  /** offset of the byte buffer in the file (8 + header length) */
  readonly dataStart: number;
  private readonly byName: Map<string, TensorInfo>;
  private fh: FileHandle | null;

  private constructor(path: string, fh: FileHandle, dataStart: number, header: ParsedHeader) {
    this.path = path;
    this.fh = fh;
    this.dataStart = dataStart;
    this.metadata = header.metadata;
    this.byName = new Map(header.tensors.map((t) => [t.name, t]));
  }

  /** Reads and validates only the header. */
  static async open(path: string): Promise<SafetensorsFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      throw new SafetensorsError(`${path}: cannot open: ${(e as Error).message}`);
    }
    try {
      const size = (await fh.stat()).size;
      const n = headerLength(size < 8 ? new Uint8Array(0) : await readAt(fh, 0, 8, path), size, path);
      const headerBytes = await readAt(fh, 8, n, path);
      const header = parseSafetensorsHeader(headerBytes, size - 8 - n, path);
      return new SafetensorsFile(path, fh, 8 + n, header);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  names(): string[] { return [...this.byName.keys()]; }
  has(name: string): boolean { return this.byName.has(name); }
  info(name: string): TensorInfo {
    const t = this.byName.get(name);
    if (!t) throw new SafetensorsError(`${this.path}: no tensor named ${JSON.stringify(name)}`);
    return t;
  }

  async readRaw(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    if (!this.fh) throw new SafetensorsError(`${this.path}: file is closed (reading ${JSON.stringify(name)})`);
    return readAt(this.fh, this.dataStart + t.dataOffsets[0], t.dataOffsets[1] - t.dataOffsets[0], this.path);
  }

  /** out.length bytes from absolute file offset `position` into out (a range of a tensor read in place). */
  async readInto(out: Uint8Array, position: number): Promise<void> {
    if (!this.fh) throw new SafetensorsError(`${this.path}: file is closed (reading ${out.length} bytes at ${position})`);
    for (let done = 0; done < out.length;) {
      const { bytesRead } = await this.fh.read(out, done, Math.min(IO_CHUNK_BYTES, out.length - done), position + done);
      if (bytesRead === 0) throw new SafetensorsError(`${this.path}: unexpected end of file at byte ${position + done} (wanted ${out.length} bytes from ${position})`);
      done += bytesRead;
    }
  }

  async readFloat32(name: string): Promise<Float32Array> {
    const t = this.info(name);
    return decodeToFloat32(t.dtype, await this.readRaw(name), `${this.path}: tensor ${JSON.stringify(name)}`);
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = null;
    if (fh) await fh.close();
  }
}

/** A checkpoint split over several files by model.safetensors.index.json {"weight_map": {name: file}}. */
export class ShardedSafetensors implements TensorSource {
  readonly indexPath: string;
  readonly metadata: Record<string, string> | null;
  private readonly files: Map<string, SafetensorsFile>;
  private readonly weightMap: Map<string, string>;

  private constructor(indexPath: string, files: Map<string, SafetensorsFile>, weightMap: Map<string, string>) {
    this.indexPath = indexPath;
    this.files = files;
    this.weightMap = weightMap;
    this.metadata = files.values().next().value?.metadata ?? null;
  }

  /** Opens every shard's header and checks the index against them (each mapped tensor is in its shard,
   *  each shard tensor is in the index). */
  static async open(indexPath: string): Promise<ShardedSafetensors> {
    let idx: unknown;
    try {
      idx = JSON.parse(await readFile(indexPath, 'utf8'));
    } catch (e) {
      throw new SafetensorsError(`${indexPath}: cannot read index: ${(e as Error).message}`);
    }
    const wm = (idx as { weight_map?: unknown } | null)?.weight_map;
    if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) throw new SafetensorsError(`${indexPath}: missing "weight_map" object`);
    const weightMap = new Map<string, string>();
    for (const [name, file] of Object.entries(wm)) {
      if (typeof file !== 'string' || file.includes('/') || file.includes('\\') || file.startsWith('.')) {
        throw new SafetensorsError(`${indexPath}: weight_map[${JSON.stringify(name)}] must be a file name in the same directory, got ${JSON.stringify(file)}`);
      }
      weightMap.set(name, file);
    }
    const dir = dirname(indexPath);
    const files = new Map<string, SafetensorsFile>();
    try {
      for (const file of new Set(weightMap.values())) files.set(file, await SafetensorsFile.open(join(dir, file)));
      for (const [name, file] of weightMap) {
        if (!files.get(file)!.has(name)) throw new SafetensorsError(`${indexPath}: weight_map puts ${JSON.stringify(name)} in ${file}, which has no such tensor`);
      }
      for (const [file, sf] of files) {
        for (const name of sf.names()) {
          if (weightMap.get(name) !== file) throw new SafetensorsError(`${join(dir, file)}: tensor ${JSON.stringify(name)} is not mapped to this file by ${indexPath}`);
        }
      }
    } catch (e) {
      for (const f of files.values()) await f.close();
      throw e;
    }
    return new ShardedSafetensors(indexPath, files, weightMap);
  }

  private file(name: string): SafetensorsFile {
    const f = this.weightMap.get(name);
    if (f === undefined) throw new SafetensorsError(`${this.indexPath}: no tensor named ${JSON.stringify(name)}`);
    return this.files.get(f)!;
  }
  names(): string[] { return [...this.weightMap.keys()]; }
  has(name: string): boolean { return this.weightMap.has(name); }
  info(name: string): TensorInfo { return this.file(name).info(name); }
  readRaw(name: string): Promise<Uint8Array> { return this.file(name).readRaw(name); }
  readFloat32(name: string): Promise<Float32Array> { return this.file(name).readFloat32(name); }
  async close(): Promise<void> { for (const f of this.files.values()) await f.close(); }
}

/** Open a model dir's weights: <baseName>.safetensors.index.json if present, else <baseName>.safetensors.
 *  Returns null when neither exists. */
export async function openSafetensorsDir(dir: string, baseName = 'model'): Promise<TensorSource | null> {
  const index = join(dir, `${baseName}.safetensors.index.json`);
  if (existsSync(index)) return ShardedSafetensors.open(index);
  const single = join(dir, `${baseName}.safetensors`);
  if (existsSync(single)) return SafetensorsFile.open(single);
  return null;
}
