// safetensors header: the dtype table, the 8-byte length and the JSON header validated exactly as safetensors does.
// Both the file reader (read.ts) and in-memory blobs (engine/formats/shard.ts) parse through here.

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
/** dtype -> position in DTYPES (the writer's sort key) */
export const DTYPE_ORDER = new Map<string, number>(DTYPES.map((d, i) => [d, i]));

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

/** The header length N from a file's first 8 bytes (little-endian u64), checked against the size limit and
 *  against `fileBytes`, the whole file's size (first8 is not read when the file is shorter than 8 bytes). */
export function headerLength(first8: Uint8Array, fileBytes: number, source: string): number {
  if (fileBytes < 8) throw new SafetensorsError(`${source}: file is ${fileBytes} bytes, too short for the 8-byte header length`);
  const n64 = new DataView(first8.buffer, first8.byteOffset, 8).getBigUint64(0, true);
  if (n64 > BigInt(MAX_HEADER_BYTES)) throw new SafetensorsError(`${source}: header length ${n64} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  const n = Number(n64);
  if (8 + n > fileBytes) throw new SafetensorsError(`${source}: header length ${n} runs past the end of the ${fileBytes}-byte file`);
  return n;
}

/** A whole safetensors file held in memory: its header, and where its byte buffer starts (8 + N). */
export function parseSafetensorsBytes(bytes: Uint8Array, source: string): ParsedHeader & { dataStart: number } {
  const n = headerLength(bytes.subarray(0, 8), bytes.length, source);
  return { ...parseSafetensorsHeader(bytes.subarray(8, 8 + n), bytes.length - 8 - n, source), dataStart: 8 + n };
}
