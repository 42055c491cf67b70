// safetensors reader (lazy: header only at open, tensors read from disk on demand), sharded index, streaming writer.
import { open, readFile, mkdir, writeFile, rm } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { join, dirname, basename } from 'node:path';
import { existsSync } from 'node:fs';

/** Every dtype of safetensors' tensor.rs Dtype, in enum order (= ascending alignment; the writer sorts
 *  tensors by this order descending, then by name). */
export const DTYPES = [
  'BOOL', 'F4', 'F6_E2M3', 'F6_E3M2', 'U8', 'I8', 'F8_E5M2', 'F8_E4M3', 'F8_E8M0', 'F8_E4M3FNUZ', 'F8_E5M2FNUZ',
  'I16', 'U16', 'F16', 'BF16', 'I32', 'U32', 'F32', 'C64', 'F64', 'I64', 'U64',
] as const;
export type Dtype = typeof DTYPES[number];

export const DTYPE_BITS: Readonly<Record<Dtype, number>> = {
  BOOL: 8, F4: 4, F6_E2M3: 6, F6_E3M2: 6, U8: 8, I8: 8, F8_E5M2: 8, F8_E4M3: 8, F8_E8M0: 8,
  F8_E4M3FNUZ: 8, F8_E5M2FNUZ: 8, I16: 16, U16: 16, F16: 16, BF16: 16, I32: 32, U32: 32, F32: 32,
  C64: 64, F64: 64, I64: 64, U64: 64,
};
const DTYPE_ORDER = new Map<string, number>(DTYPES.map((d, i) => [d, i]));

export function isDtype(s: unknown): s is Dtype {
  return typeof s === 'string' && DTYPE_ORDER.has(s);
}

export const MAX_HEADER_BYTES = 100_000_000;

/** Raised for any malformed safetensors file or index; the message names the file and the tensor. */
export class SafetensorsError extends Error {
  override readonly name = 'SafetensorsError';
}

export interface TensorInfo {
  name: string;
  dtype: Dtype;
  shape: number[];
  /** [begin, end) relative to the start of the byte buffer (after the header) */
  dataOffsets: [number, number];
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** Byte size of a tensor; throws when numel * bits is not a whole number of bytes. */
export function byteSizeOf(dtype: Dtype, shape: readonly number[], where = ''): number {
  const numel = numelOf(shape);
  if (!Number.isSafeInteger(numel * 64)) throw new SafetensorsError(`${where}shape [${shape.join(', ')}] has too many elements`);
  const bits = numel * DTYPE_BITS[dtype];
  if (bits % 8 !== 0) throw new SafetensorsError(`${where}dtype ${dtype} shape [${shape.join(', ')}] is ${bits} bits, not a whole number of bytes`);
  return bits / 8;
}

/** Keys of the top-level JSON object in source order, to detect duplicates that JSON.parse would hide. */
function topLevelKeys(text: string, where: string): string[] {
  const keys: string[] = [];
  let depth = 0;
  let i = 0;
  let expectKey = false;
  while (i < text.length) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      if (j >= text.length) throw new SafetensorsError(`${where}: header JSON has an unterminated string`);
      if (depth === 1 && expectKey) {
        keys.push(JSON.parse(text.slice(i, j + 1)) as string);
        expectKey = false;
      }
      i = j + 1;
      continue;
    }
    if (c === '{' || c === '[') { depth++; if (depth === 1 && c === '{') expectKey = true; }
    else if (c === '}' || c === ']') depth--;
    else if (c === ',' && depth === 1) expectKey = true;
    i++;
  }
  return keys;
}

export interface ParsedHeader {
  metadata: Record<string, string> | null;
  /** in order of data offsets */
  tensors: TensorInfo[];
}

/** Validate a header exactly as safetensors does. `headerBytes` is the N bytes after the 8-byte length;
 *  `bufferBytes` = file size - 8 - N. */
export function parseSafetensorsHeader(headerBytes: Uint8Array, bufferBytes: number, source: string): ParsedHeader {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    throw new SafetensorsError(`${source}: header is not valid UTF-8`);
  }
  if (!text.startsWith('{')) throw new SafetensorsError(`${source}: header JSON must start with '{', got ${JSON.stringify(text.slice(0, 16))}`);
  let obj: unknown;
  try {
    obj = JSON.parse(text);
  } catch (e) {
    throw new SafetensorsError(`${source}: header is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) throw new SafetensorsError(`${source}: header must be a JSON object`);
  const seen = new Set<string>();
  for (const k of topLevelKeys(text, source)) {
    if (seen.has(k)) throw new SafetensorsError(`${source}: duplicate key ${JSON.stringify(k)} in header`);
    seen.add(k);
  }
  const rec = obj as Record<string, unknown>;
  let metadata: Record<string, string> | null = null;
  const tensors: TensorInfo[] = [];
  for (const [name, v] of Object.entries(rec)) {
    if (name === '__metadata__') {
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new SafetensorsError(`${source}: __metadata__ must be an object of string to string`);
      for (const [mk, mv] of Object.entries(v)) {
        if (typeof mv !== 'string') throw new SafetensorsError(`${source}: __metadata__[${JSON.stringify(mk)}] must be a string, got ${JSON.stringify(mv)}`);
      }
      metadata = v as Record<string, string>;
      continue;
    }
    const where = `${source}: tensor ${JSON.stringify(name)}`;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new SafetensorsError(`${where}: entry must be an object with dtype, shape, data_offsets`);
    // extra fields are ignored, as safetensors' own (serde) reader does
    const e = v as Record<string, unknown>;
    if (!isDtype(e.dtype)) throw new SafetensorsError(`${where}: unknown dtype ${JSON.stringify(e.dtype)} (expected one of ${DTYPES.join(', ')})`);
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`${where}: shape must be a list of non-negative integers, got ${JSON.stringify(e.shape)}`);
    }
    const off = e.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`${where}: data_offsets must be [begin, end] non-negative integers, got ${JSON.stringify(off)}`);
    }
    tensors.push({ name, dtype: e.dtype, shape: e.shape as number[], dataOffsets: [off[0] as number, off[1] as number] });
  }
  tensors.sort((a, b) => a.dataOffsets[0] - b.dataOffsets[0] || a.dataOffsets[1] - b.dataOffsets[1]);
  let cursor = 0;
  for (const t of tensors) {
    const where = `${source}: tensor ${JSON.stringify(t.name)}`;
    const [s, e] = t.dataOffsets;
    if (s !== cursor) {
      throw new SafetensorsError(s > cursor
        ? `${where}: data_offsets [${s}, ${e}] leave a hole: the previous tensor ends at ${cursor}`
        : `${where}: data_offsets [${s}, ${e}] overlap the previous tensor which ends at ${cursor}`);
    }
    if (e < s) throw new SafetensorsError(`${where}: data_offsets end ${e} < begin ${s}`);
    const size = byteSizeOf(t.dtype, t.shape, `${where}: `);
    if (e - s !== size) {
      throw new SafetensorsError(`${where}: data_offsets [${s}, ${e}] span ${e - s} bytes, but ${t.dtype} [${t.shape.join(', ')}] needs ${size}`);
    }
    cursor = e;
  }
  if (cursor !== bufferBytes) {
    throw new SafetensorsError(`${source}: tensors cover ${cursor} bytes of data but the file holds ${bufferBytes} bytes after the header`);
  }
  return { metadata, tensors };
}

// ---------------------------------------------------------------------------------------------
// decoding / encoding

function makeF8Lut(expBits: number, manBits: number, bias: number, kind: 'fn' | 'ieee' | 'fnuz'): Float32Array {
  const lut = new Float32Array(256);
  const expMax = (1 << expBits) - 1;
  for (let b = 0; b < 256; b++) {
    const sign = b & 0x80 ? -1 : 1;
    const e = (b >> manBits) & expMax;
    const m = b & ((1 << manBits) - 1);
    let v: number;
    if (kind === 'fnuz' && b === 0x80) v = NaN;
    else if (kind === 'ieee' && e === expMax) v = m === 0 ? sign * Infinity : NaN;
    else if (kind === 'fn' && e === expMax && m === (1 << manBits) - 1) v = NaN;
    else if (e === 0) v = sign * m * 2 ** (1 - bias - manBits);
    else v = sign * (1 + m / (1 << manBits)) * 2 ** (e - bias);
    lut[b] = v;
  }
  return lut;
}
let f8Luts: Partial<Record<Dtype, Float32Array>> | null = null;
function f8Lut(dtype: Dtype): Float32Array | undefined {
  if (!f8Luts) {
    const e8m0 = new Float32Array(256);
    for (let b = 0; b < 256; b++) e8m0[b] = b === 255 ? NaN : 2 ** (b - 127);
    f8Luts = {
      F8_E4M3: makeF8Lut(4, 3, 7, 'fn'),
      F8_E5M2: makeF8Lut(5, 2, 15, 'ieee'),
      F8_E4M3FNUZ: makeF8Lut(4, 3, 8, 'fnuz'),
      F8_E5M2FNUZ: makeF8Lut(5, 2, 16, 'fnuz'),
      F8_E8M0: e8m0,
    };
  }
  return f8Luts[dtype];
}

export function f16BitsToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

let f16Lut: Float32Array | null = null;

/** Dtypes readFloat32 can decode. */
export function isFloatDecodable(dtype: Dtype): boolean {
  return !['F4', 'F6_E2M3', 'F6_E3M2', 'C64'].includes(dtype);
}

/** Decode little-endian raw bytes of a tensor to float32. */
export function decodeToFloat32(dtype: Dtype, raw: Uint8Array, where = 'tensor'): Float32Array {
  const bytes = dtype === 'BOOL' || DTYPE_BITS[dtype] === 8 ? raw : alignedCopy(raw);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = (raw.byteLength * 8) / DTYPE_BITS[dtype];
  switch (dtype) {
    case 'F32': {
      const view = new Float32Array(bytes.buffer, bytes.byteOffset, n);
      // a freshly read tensor owns its buffer: hand it over instead of copying gigabytes
      return bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength ? view : view.slice();
    }
    case 'BF16': {
      const src = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const out = new Float32Array(n);
      const o32 = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) o32[i] = src[i] << 16;
      return out;
    }
    case 'F16': {
      if (!f16Lut) { f16Lut = new Float32Array(65536); for (let h = 0; h < 65536; h++) f16Lut[h] = f16BitsToFloat(h); }
      const lut = f16Lut;
      const src = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = lut[src[i]];
      return out;
    }
    case 'F64': return Float32Array.from(new Float64Array(bytes.buffer, bytes.byteOffset, n));
    case 'BOOL': return Float32Array.from(bytes, (b) => (b ? 1 : 0));
    case 'U8': return Float32Array.from(bytes);
    case 'I8': return Float32Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, n));
    case 'I16': return Float32Array.from(new Int16Array(bytes.buffer, bytes.byteOffset, n));
    case 'U16': return Float32Array.from(new Uint16Array(bytes.buffer, bytes.byteOffset, n));
    case 'I32': return Float32Array.from(new Int32Array(bytes.buffer, bytes.byteOffset, n));
    case 'U32': return Float32Array.from(new Uint32Array(bytes.buffer, bytes.byteOffset, n));
    case 'I64': { const out = new Float32Array(n); for (let i = 0; i < n; i++) out[i] = Number(dv.getBigInt64(i * 8, true)); return out; }
    case 'U64': { const out = new Float32Array(n); for (let i = 0; i < n; i++) out[i] = Number(dv.getBigUint64(i * 8, true)); return out; }
    default: {
      const lut = f8Lut(dtype);
      if (lut) { const out = new Float32Array(n); for (let i = 0; i < n; i++) out[i] = lut[bytes[i]]; return out; }
      throw new SafetensorsError(`${where}: dtype ${dtype} cannot be decoded to float32; read its raw bytes instead`);
    }
  }
}

/** Typed-array views need an element-aligned offset; copy only when the bytes are misaligned. */
function alignedCopy(raw: Uint8Array): Uint8Array {
  return raw.byteOffset % 8 === 0 ? raw : raw.slice();
}

/** float32 → bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN. */
export function floatToBf16Bits(x: number): number {
  const u = floatBits(x);
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}
const convF32 = new Float32Array(1);
const convU32 = new Uint32Array(convF32.buffer);
function floatBits(x: number): number { convF32[0] = x; return convU32[0]; }

/** float32 → IEEE half bits, round to nearest even, overflow to ±Inf, subnormals kept. */
export function floatToF16Bits(x: number): number {
  const u = floatBits(x);
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let man = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (man ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign; // rounds to zero (even the half-way case rounds to 0)
    man |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = man & ((1 << shift) - 1);
    let h = man >>> shift;
    if (rest > half || (rest === half && (h & 1))) h++;
    return sign | h; // may carry into the smallest normal, which is the right encoding
  }
  let h = (e << 10) | (man >>> 13);
  const rest = man & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h++; // carry may roll into exponent/Inf correctly
  return sign | h;
}

/** Encode float32 values as little-endian bytes of `dtype` (float and integer dtypes). */
export function encodeFromFloat32(dtype: Dtype, data: ArrayLike<number>): Uint8Array {
  const n = data.length;
  switch (dtype) {
    case 'F32': { const a = Float32Array.from(data); return new Uint8Array(a.buffer); }
    case 'F64': { const a = Float64Array.from(data); return new Uint8Array(a.buffer); }
    case 'BF16': { const a = new Uint16Array(n); for (let i = 0; i < n; i++) a[i] = floatToBf16Bits(data[i]); return new Uint8Array(a.buffer); }
    case 'F16': { const a = new Uint16Array(n); for (let i = 0; i < n; i++) a[i] = floatToF16Bits(data[i]); return new Uint8Array(a.buffer); }
    case 'BOOL': return Uint8Array.from(data, (v) => (v ? 1 : 0));
    case 'U8': return Uint8Array.from(data);
    case 'I8': return new Uint8Array(Int8Array.from(data).buffer);
    case 'I16': return new Uint8Array(Int16Array.from(data).buffer);
    case 'U16': return new Uint8Array(Uint16Array.from(data).buffer);
    case 'I32': return new Uint8Array(Int32Array.from(data).buffer);
    case 'U32': return new Uint8Array(Uint32Array.from(data).buffer);
    case 'I64': { const a = new BigInt64Array(n); for (let i = 0; i < n; i++) a[i] = BigInt(Math.trunc(data[i])); return new Uint8Array(a.buffer); }
    case 'U64': { const a = new BigUint64Array(n); for (let i = 0; i < n; i++) a[i] = BigInt(Math.trunc(data[i])); return new Uint8Array(a.buffer); }
    default: throw new SafetensorsError(`cannot encode float values as ${dtype}; pass raw bytes`);
  }
}

// ---------------------------------------------------------------------------------------------
// reading

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

const READ_CHUNK_BYTES = 1 << 30; // fs read() takes at most 2 GiB per call

async function readAt(fh: FileHandle, position: number, length: number, path: string): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(out, done, Math.min(READ_CHUNK_BYTES, length - done), position + done);
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
      if (size < 8) throw new SafetensorsError(`${path}: file is ${size} bytes, too short for the 8-byte header length`);
      const lenBuf = await readAt(fh, 0, 8, path);
      const n64 = new DataView(lenBuf.buffer).getBigUint64(0, true);
      if (n64 > BigInt(MAX_HEADER_BYTES)) throw new SafetensorsError(`${path}: header length ${n64} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
      const n = Number(n64);
      if (8 + n > size) throw new SafetensorsError(`${path}: header length ${n} runs past the end of the ${size}-byte file`);
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

// ---------------------------------------------------------------------------------------------
// writing

export interface TensorSpec {
  name: string;
  dtype: Dtype;
  shape: number[];
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
      const { bytesWritten } = await this.fh.write(bytes, done, Math.min(READ_CHUNK_BYTES, size - done), this.dataStart + t.dataOffsets[0] + done);
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

export interface TensorData extends TensorSpec {
  /** raw little-endian bytes, or float32 values encoded to `dtype` */
  data: Uint8Array | Float32Array;
}

/** Write one file at once from in-memory tensors (adapters, tests). Float32Array data is encoded to the
 *  tensor's dtype (F32/F16/BF16/F64/ints). */
export async function writeSafetensors(path: string, tensors: readonly TensorData[], metadata?: Record<string, string> | null): Promise<void> {
  const w = await SafetensorsWriter.create(path, tensors, metadata);
  try {
    for (const t of tensors) {
      await w.write(t.name, t.data instanceof Float32Array && t.dtype !== 'F32' ? encodeFromFloat32(t.dtype, t.data) : t.data);
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
    const bytes = data instanceof Float32Array
      ? (dtype === 'F32' ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : encodeFromFloat32(dtype, data))
      : data;
    if (bytes.byteLength !== size) throw new SafetensorsError(`${this.dir}: tensor ${JSON.stringify(name)} (${dtype} [${shape.join(', ')}]) needs ${size} bytes, got ${bytes.byteLength}`);
    let done = 0;
    while (done < size) {
      const { bytesWritten } = await this.fh.write(bytes, done, Math.min(READ_CHUNK_BYTES, size - done), this.spoolBytes + done);
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
