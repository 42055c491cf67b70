// Shard blobs: a stage's frozen NF4 linears and float tensors (or a stage's LoRA tensors) as one safetensors
// file in memory, content-addressed by its sha256, so the bytes depend only on the tensors.
//
// An NF4 linear "<name>" is stored as "<name>" U8 [ceil(n/2), 1] (bitsandbytes packing) plus its constants,
// in the form it is held: "<name>.absmax" F32 [nBlocks]; or, double-quantized (bitsandbytes' names), "<name>.absmax"
// U8 [nBlocks] codes, "<name>.nested_absmax" F32 [ceil(nBlocks/nestedBlocksize)] and "<name>.nested_quant_map"
// F32 [256]. The header metadata "swarmtune.nf4" (JSON) maps each name to [rows, cols, blocksize], plus
// [nestedBlocksize, offset] when double-quantized (blobs written before double quantization carry the 3-entry form
// and stay readable). Float tensors are F32. Every coordinator that quantizes the same model the same way
// produces the same bytes, hence the same hashes.
import type { NF4Weight } from './nf4.ts';
import { checkNF4Absmax, internDoubleQuant, isDoubleQuant } from './nf4.ts';
import type { LlamaConfig } from '../types.ts';
import { baseModuleName } from '../model/lora.ts';
import { layerFloatName, layerFloatTensors, linearModules } from '../model/arch.ts';
import { parseSafetensorsBytes } from './safetensors/header.ts';
import { SafetensorsFile } from './safetensors/read.ts';
import { encodeSafetensors, writeSafetensors } from './safetensors/write.ts';
import type { TensorData } from './safetensors/write.ts';

/** A shard blob that is valid safetensors but not a shard: an NF4 tensor without its parts, a dtype
 *  shards never hold, an unknown blob name. */
export class ShardError extends Error {
  override readonly name = 'ShardError';
}

export interface ShardTensors {
  nf4: Map<string, NF4Weight>;
  float: Map<string, { shape: number[]; data: Float32Array }>;
}

const NF4_META_KEY = 'swarmtune.nf4';
/** [rows, cols, blocksize] (float32 absmax) or [rows, cols, blocksize, nestedBlocksize, offset] (double quant) */
type NF4Meta = [number, number, number] | [number, number, number, number, number];

/** The safetensors tensors and metadata a shard is written as (one layout for memory and file). */
function shardLayout(t: ShardTensors): { tensors: TensorData[]; metadata: Record<string, string> } {
  const tensors: TensorData[] = [];
  const nf4Meta: Record<string, NF4Meta> = {};
  for (const [name, w] of t.nf4) {
    tensors.push({ name, dtype: 'U8', shape: [w.packed.length, 1], data: w.packed });
    const a = w.absmax;
    if (isDoubleQuant(a)) {
      tensors.push({ name: `${name}.absmax`, dtype: 'U8', shape: [a.codes.length], data: a.codes });
      tensors.push({ name: `${name}.nested_absmax`, dtype: 'F32', shape: [a.nestedAbsmax.length], data: a.nestedAbsmax });
      tensors.push({ name: `${name}.nested_quant_map`, dtype: 'F32', shape: [a.code.length], data: a.code });
      nf4Meta[name] = [w.rows, w.cols, w.blocksize, a.nestedBlocksize, a.offset];
    } else {
      tensors.push({ name: `${name}.absmax`, dtype: 'F32', shape: [a.length], data: a });
      nf4Meta[name] = [w.rows, w.cols, w.blocksize];
    }
  }
  for (const [name, f] of t.float) tensors.push({ name, dtype: 'F32', shape: f.shape, data: f.data });
  const sortedMeta: Record<string, NF4Meta> = {};
  for (const k of Object.keys(nf4Meta).sort()) sortedMeta[k] = nf4Meta[k]!;
  return { tensors, metadata: { format: 'pt', [NF4_META_KEY]: JSON.stringify(sortedMeta) } };
}

export function encodeShard(t: ShardTensors): Uint8Array {
  const { tensors, metadata } = shardLayout(t);
  return encodeSafetensors(tensors, metadata, 'shard');
}

/** Write a shard straight to a file, tensor by tensor (the same bytes as encodeShard): a shard over 2 GiB
 *  is never assembled in one buffer. */
export async function writeShardFile(t: ShardTensors, file: string): Promise<void> {
  const { tensors, metadata } = shardLayout(t);
  await writeSafetensors(file, tensors, metadata);
}

/** Parse a shard blob held in memory. The caller has already checked its sha256; the layout is validated anyway
 *  (SafetensorsError, ShardError) because a bug upstream must fail here with a clear message rather
 *  than in a kernel. */
export function decodeShard(blob: Uint8Array, what: string): ShardTensors {
  const { metadata, tensors, dataStart } = parseSafetensorsBytes(blob, what);
  const raw: RawTensors = new Map();
  // copied so typed-array views are aligned and own their buffer (a Node Buffer's slice is a view)
  for (const t of tensors) raw.set(t.name, { dtype: t.dtype, shape: t.shape, bytes: new Uint8Array(blob.subarray(dataStart + t.dataOffsets[0], dataStart + t.dataOffsets[1])) });
  return shardFromRaw(metadata, raw, what);
}

/** Parse a shard blob from its file, each tensor read by range into its own buffer: the blob is never
 *  held whole, so a blob over 2 GiB (an 8B or 70B embedding in F32) decodes with no buffer larger than
 *  its largest tensor, and the peak memory is the tensors, not tensors plus blob. */
export async function decodeShardFile(file: string, what: string): Promise<ShardTensors> {
  const f = await SafetensorsFile.open(file);
  try {
    const raw: RawTensors = new Map();
    for (const name of f.names()) {
      const t = f.info(name);
      raw.set(name, { dtype: t.dtype, shape: t.shape, bytes: await f.readRaw(name) });
    }
    return shardFromRaw(f.metadata, raw, what);
  } finally {
    await f.close();
  }
}

/** A float tensor of a shard file left on disk (engine/types.ts FloatReader): read by element range. */
export interface LazyFloatTensor { shape: number[]; elements: number; read(start: number, out: Float32Array): Promise<void> }

/** decodeShardFile, except that F32 tensors of at least `lazyBytes` (an embedding, an lm_head) are not read:
 *  they come back in `lazy`, read by range on demand from the still open file (the loader streams them
 *  into bf16, so a 2.1 GB float32 embedding never sits in memory beside its 1 GB bf16 form). `close()`
 *  when the stage has loaded. Layout checks as decodeShardFile (a lazy tensor is F32, not an NF4 part). */
export async function openShardFile(file: string, what: string, lazyBytes: number): Promise<{ tensors: ShardTensors; lazy: Map<string, LazyFloatTensor>; close(): Promise<void> }> {
  const f = await SafetensorsFile.open(file);
  try {
    let meta: unknown = null;
    try { meta = JSON.parse(f.metadata?.[NF4_META_KEY] ?? '{}'); } catch { /* shardFromRaw names it */ }
    const nf4Names = new Set<string>();
    if (meta !== null && typeof meta === 'object') for (const n of Object.keys(meta)) for (const x of ['', '.absmax', '.nested_absmax', '.nested_quant_map']) nf4Names.add(n + x);
    const raw: RawTensors = new Map();
    const lazy = new Map<string, LazyFloatTensor>();
    for (const name of f.names()) {
      const t = f.info(name);
      const bytes = t.dataOffsets[1] - t.dataOffsets[0];
      if (t.dtype === 'F32' && bytes >= lazyBytes && !nf4Names.has(name)) {
        const elements = bytes / 4;
        const at = f.dataStart + t.dataOffsets[0];
        lazy.set(name, {
          shape: t.shape, elements,
          read: async (start, out) => {
            if (!(Number.isInteger(start) && start >= 0 && start + out.length <= elements)) throw new RangeError(`${what}: ${name} has ${elements} values, read of ${out.length} from ${start}`);
            await f.readInto(new Uint8Array(out.buffer, out.byteOffset, out.byteLength), at + 4 * start);
          },
        });
      } else raw.set(name, { dtype: t.dtype, shape: t.shape, bytes: await f.readRaw(name) });
    }
    return { tensors: shardFromRaw(f.metadata, raw, what), lazy, close: () => f.close() };
  } catch (e) {
    await f.close();
    throw e;
  }
}

/** decodeShard with the tensor copies made in slices of `sliceBytes` that yield to the event loop between
 *  them: an 8B model's embedding blob is 2.1 GB, seconds of copying (page faults included) that would
 *  otherwise stop a volunteer's heartbeats while its stage loads. */
export async function decodeShardAsync(blob: Uint8Array, what: string, opts: { signal?: AbortSignal; sliceBytes?: number } = {}): Promise<ShardTensors> {
  const { metadata, tensors, dataStart } = parseSafetensorsBytes(blob, what);
  const slice = opts.sliceBytes ?? 32 << 20;
  const raw: RawTensors = new Map();
  for (const t of tensors) {
    const src = blob.subarray(dataStart + t.dataOffsets[0], dataStart + t.dataOffsets[1]);
    const bytes = new Uint8Array(src.length);
    for (let a = 0; a < src.length; a += slice) {
      bytes.set(src.subarray(a, Math.min(src.length, a + slice)), a);
      if (src.length > slice) { await new Promise<void>((r) => setImmediate(r)); opts.signal?.throwIfAborted(); }
    }
    raw.set(t.name, { dtype: t.dtype, shape: t.shape, bytes });
  }
  return shardFromRaw(metadata, raw, what);
}

type RawTensors = Map<string, { dtype: string; shape: number[]; bytes: Uint8Array }>;

/** The shard's NF4 linears and float tensors from its raw tensors (each in its own aligned buffer). */
function shardFromRaw(metadata: Record<string, string> | null, raw: RawTensors, what: string): ShardTensors {
  let nf4Meta: Record<string, unknown>;
  try {
    nf4Meta = JSON.parse(metadata?.[NF4_META_KEY] ?? '{}') as Record<string, unknown>;
  } catch (e) {
    throw new ShardError(`${what}: metadata "${NF4_META_KEY}" is not JSON (${(e as Error).message})`);
  }
  if (typeof nf4Meta !== 'object' || nf4Meta === null || Array.isArray(nf4Meta)) throw new ShardError(`${what}: metadata "${NF4_META_KEY}" must be a JSON object`);
  const out: ShardTensors = { nf4: new Map(), float: new Map() };
  const take = (name: string, dtype: string, what2: string): Uint8Array => {
    const r = raw.get(name);
    if (r === undefined) throw new ShardError(`${what}: NF4 tensor ${what2} lacks ${name}`);
    if (r.dtype !== dtype) throw new ShardError(`${what}: ${name} has dtype ${r.dtype}, expected ${dtype}`);
    raw.delete(name);
    return r.bytes;
  };
  for (const [name, m] of Object.entries(nf4Meta)) {
    if (!Array.isArray(m) || (m.length !== 3 && m.length !== 5) || !m.every((v) => typeof v === 'number' && Number.isFinite(v))) {
      throw new ShardError(`${what}: metadata "${NF4_META_KEY}" of ${name} must be [rows, cols, blocksize] or [rows, cols, blocksize, nestedBlocksize, offset], got ${JSON.stringify(m)}`);
    }
    const [rows, cols, blocksize] = m as number[];
    if (!raw.has(name) || !raw.has(`${name}.absmax`)) throw new ShardError(`${what}: NF4 tensor ${name} lacks its packed codes or absmax`);
    const packed = take(name, 'U8', name);
    const n = rows * cols;
    let w: NF4Weight;
    if (m.length === 3) {
      const am = take(`${name}.absmax`, 'F32', name);
      w = { packed, absmax: new Float32Array(am.buffer), rows, cols, blocksize };
    } else {
      const codes = take(`${name}.absmax`, 'U8', name);
      const nested = take(`${name}.nested_absmax`, 'F32', name);
      const code = take(`${name}.nested_quant_map`, 'F32', name);
      w = { packed, rows, cols, blocksize,
        absmax: internDoubleQuant({ codes, nestedAbsmax: new Float32Array(nested.buffer), code: new Float32Array(code.buffer), nestedBlocksize: m[3] as number, offset: m[4] as number }) };
    }
    try {
      if (!Number.isSafeInteger(n) || rows <= 0 || cols <= 0 || packed.length !== Math.ceil(n / 2)) {
        throw new Error(`${packed.length} code bytes`);
      }
      checkNF4Absmax(w, 'constants');
    } catch (e) {
      throw new ShardError(`${what}: NF4 tensor ${name} [${rows}, ${cols}] blocksize ${blocksize}: ${(e as Error).message}`);
    }
    out.nf4.set(name, w);
  }
  for (const [name, r] of raw) {
    if (r.dtype !== 'F32') throw new ShardError(`${what}: tensor ${name} has dtype ${r.dtype}, shards hold only F32 and NF4`);
    out.float.set(name, { shape: r.shape, data: new Float32Array(r.bytes.buffer) });
  }
  return out;
}

export type ShardKind = { kind: 'layer'; layer: number } | { kind: 'embed' } | { kind: 'head' };

/** Candidate HF tensor names of one shard blob (a layer, the embeddings, or the head = final norm +
 *  lm_head); biases are candidates too and are included only when the model has them. */
export function shardTensorNames(config: LlamaConfig, shard: ShardKind): { nf4: string[]; float: string[]; optionalFloat: string[] } {
  if (shard.kind === 'embed') return { nf4: [], float: ['model.embed_tokens.weight'], optionalFloat: [] };
  if (shard.kind === 'head') {
    return { nf4: [], float: config.tieWordEmbeddings ? ['model.norm.weight'] : ['model.norm.weight', 'lm_head.weight'], optionalFloat: [] };
  }
  const l = shard.layer;
  const float = layerFloatTensors(config).map((t) => layerFloatName(l, t));
  const nf4 = linearModules(config).map((m) => `${baseModuleName(l, m)}.weight`);
  const optionalFloat = linearModules(config).map((m) => `${baseModuleName(l, m)}.bias`);
  return { nf4, float, optionalFloat };
}

/** Shards a stage [layerStart, layerEnd) needs, by blob name ("embed", "layer.N", "head"). */
export function stageShardNames(config: LlamaConfig, layerStart: number, layerEnd: number): string[] {
  const names: string[] = [];
  const isLast = layerEnd === config.numHiddenLayers;
  if (layerStart === 0 || (isLast && config.tieWordEmbeddings)) names.push('embed');
  for (let l = layerStart; l < layerEnd; l++) names.push(`layer.${l}`);
  if (isLast) names.push('head');
  return names;
}

export function shardKindOf(blobName: string): ShardKind {
  if (blobName === 'embed') return { kind: 'embed' };
  if (blobName === 'head') return { kind: 'head' };
  const m = /^layer\.(\d+)$/.exec(blobName);
  if (m === null) throw new ShardError(`unknown shard blob name "${blobName}"`);
  return { kind: 'layer', layer: Number(m[1]) };
}
