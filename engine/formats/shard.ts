// Shard blobs: a stage's frozen NF4 linears and float tensors (or a stage's LoRA tensors) as one safetensors
// file in memory, content-addressed by its sha256, so the bytes depend only on the tensors.
//
// An NF4 linear "<name>" is stored as "<name>" U8 [ceil(n/2), 1] (bitsandbytes packing) plus
// "<name>.absmax" F32 [ceil(n/blocksize)]; its [rows, cols, blocksize] are in the header metadata
// "swarmtune.nf4" (JSON). Float tensors are F32. Every coordinator that quantizes the same model
// produces the same bytes, hence the same hashes.
import type { NF4Weight } from './nf4.ts';
import type { LlamaConfig } from '../types.ts';
import { LORA_TARGETS } from '../types.ts';
import { baseModuleName } from '../model/lora.ts';
import { layerFloatName, layerFloatTensors } from '../model/arch.ts';
import { parseSafetensorsBytes } from './safetensors/header.ts';
import { encodeSafetensors } from './safetensors/write.ts';
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

export function encodeShard(t: ShardTensors): Uint8Array {
  const tensors: TensorData[] = [];
  const nf4Meta: Record<string, [number, number, number]> = {};
  for (const [name, w] of t.nf4) {
    tensors.push({ name, dtype: 'U8', shape: [w.packed.length, 1], data: w.packed });
    tensors.push({ name: `${name}.absmax`, dtype: 'F32', shape: [w.absmax.length], data: w.absmax });
    nf4Meta[name] = [w.rows, w.cols, w.blocksize];
  }
  for (const [name, f] of t.float) tensors.push({ name, dtype: 'F32', shape: f.shape, data: f.data });
  const sortedMeta: Record<string, [number, number, number]> = {};
  for (const k of Object.keys(nf4Meta).sort()) sortedMeta[k] = nf4Meta[k]!;
  return encodeSafetensors(tensors, { format: 'pt', [NF4_META_KEY]: JSON.stringify(sortedMeta) }, 'shard');
}

/** Parse a shard blob. The caller has already checked its sha256; the layout is validated anyway
 *  (SafetensorsError, ShardError) because a bug upstream must fail here with a clear message rather
 *  than in a kernel. */
export function decodeShard(blob: Uint8Array, what: string): ShardTensors {
  const { metadata, tensors, dataStart } = parseSafetensorsBytes(blob, what);
  let nf4Meta: Record<string, [number, number, number]>;
  try {
    nf4Meta = JSON.parse(metadata?.[NF4_META_KEY] ?? '{}') as Record<string, [number, number, number]>;
  } catch (e) {
    throw new ShardError(`${what}: metadata "${NF4_META_KEY}" is not JSON (${(e as Error).message})`);
  }
  const raw = new Map<string, { dtype: string; shape: number[]; bytes: Uint8Array }>();
  for (const t of tensors) {
    // copied so typed-array views are aligned and own their buffer (a Node Buffer's slice is a view)
    const bytes = new Uint8Array(blob.subarray(dataStart + t.dataOffsets[0], dataStart + t.dataOffsets[1]));
    raw.set(t.name, { dtype: t.dtype, shape: t.shape, bytes });
  }
  const out: ShardTensors = { nf4: new Map(), float: new Map() };
  for (const [name, [rows, cols, blocksize]] of Object.entries(nf4Meta)) {
    const p = raw.get(name);
    const am = raw.get(`${name}.absmax`);
    if (p === undefined || am === undefined) throw new ShardError(`${what}: NF4 tensor ${name} lacks its packed codes or absmax`);
    const n = rows * cols;
    if (p.dtype !== 'U8' || am.dtype !== 'F32' || p.bytes.length !== Math.ceil(n / 2) || am.bytes.length !== 4 * Math.ceil(n / blocksize)) {
      throw new ShardError(`${what}: NF4 tensor ${name} [${rows}, ${cols}] blocksize ${blocksize} has ${p.bytes.length} ${p.dtype} code bytes and ${am.bytes.length / 4} ${am.dtype} absmax`);
    }
    out.nf4.set(name, { packed: p.bytes, absmax: new Float32Array(am.bytes.buffer), rows, cols, blocksize });
    raw.delete(name);
    raw.delete(`${name}.absmax`);
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
  const nf4 = LORA_TARGETS.map((m) => `${baseModuleName(l, m)}.weight`);
  const optionalFloat = LORA_TARGETS.map((m) => `${baseModuleName(l, m)}.bias`);
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
