// Shard blob container: a deterministic safetensors-layout file holding a stage's frozen NF4 linears
// and float tensors (or a stage's LoRA tensors), content-addressed by its sha256.
//
// An NF4 linear "<name>" is stored as "<name>" U8 [ceil(n/2), 1] (bitsandbytes packing) plus
// "<name>.absmax" F32 [ceil(n/blocksize)]; its [rows, cols, blocksize] are in the header metadata
// "swarmtune.nf4" (JSON). Float tensors are F32. The bytes depend only on the tensors, so every
// coordinator that quantizes the same model produces the same hashes.
import type { NF4Weight } from '../engine/backend.ts';
import type { LlamaConfig } from '../engine/types.ts';
import { IntegrityError, SchemaError } from './errors.ts';

export interface ShardTensors {
  nf4: Map<string, NF4Weight>;
  float: Map<string, { shape: number[]; data: Float32Array }>;
}

interface Entry { dtype: 'U8' | 'F32'; shape: number[]; bytes: Uint8Array }

export function encodeShard(t: ShardTensors): Uint8Array {
  const entries = new Map<string, Entry>();
  const nf4Meta: Record<string, [number, number, number]> = {};
  for (const [name, w] of t.nf4) {
    entries.set(name, { dtype: 'U8', shape: [w.packed.length, 1], bytes: w.packed });
    entries.set(`${name}.absmax`, { dtype: 'F32', shape: [w.absmax.length], bytes: new Uint8Array(w.absmax.buffer, w.absmax.byteOffset, w.absmax.byteLength) });
    nf4Meta[name] = [w.rows, w.cols, w.blocksize];
  }
  for (const [name, f] of t.float) {
    entries.set(name, { dtype: 'F32', shape: f.shape, bytes: new Uint8Array(f.data.buffer, f.data.byteOffset, f.data.byteLength) });
  }
  // safetensors order: descending alignment (F32 before U8), then name, so the F32 data stays 4-aligned
  const names = [...entries.keys()].sort((a, b) => {
    const da = entries.get(a)!.dtype === 'F32' ? 0 : 1;
    const db = entries.get(b)!.dtype === 'F32' ? 0 : 1;
    return da - db || (a < b ? -1 : a > b ? 1 : 0);
  });
  const header: Record<string, unknown> = {};
  const sortedMeta: Record<string, [number, number, number]> = {};
  for (const k of Object.keys(nf4Meta).sort()) sortedMeta[k] = nf4Meta[k]!;
  header.__metadata__ = { format: 'pt', 'swarmtune.nf4': JSON.stringify(sortedMeta) };
  let off = 0;
  for (const n of names) {
    const e = entries.get(n)!;
    header[n] = { dtype: e.dtype, shape: e.shape, data_offsets: [off, off + e.bytes.length] };
    off += e.bytes.length;
  }
  let hjson = JSON.stringify(header);
  while ((8 + Buffer.byteLength(hjson)) % 8 !== 0) hjson += ' ';
  const hbytes = Buffer.from(hjson, 'utf8');
  const out = new Uint8Array(8 + hbytes.length + off);
  new DataView(out.buffer).setBigUint64(0, BigInt(hbytes.length), true);
  out.set(hbytes, 8);
  let p = 8 + hbytes.length;
  for (const n of names) { const e = entries.get(n)!; out.set(e.bytes, p); p += e.bytes.length; }
  return out;
}

/** Parse a shard blob. The caller has already checked its sha256; the layout is validated anyway
 *  because a bug upstream must fail here with a clear message rather than in a kernel. */
export function decodeShard(blob: Uint8Array, what: string): ShardTensors {
  if (blob.length < 8) throw new IntegrityError(`${what}: shard blob of ${blob.length} bytes is too short`);
  const hlen = Number(new DataView(blob.buffer, blob.byteOffset, 8).getBigUint64(0, true));
  if (hlen > 100_000_000 || 8 + hlen > blob.length) throw new IntegrityError(`${what}: bad header length ${hlen}`);
  let header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] } | Record<string, string>>;
  try {
    header = JSON.parse(Buffer.from(blob.subarray(8, 8 + hlen)).toString('utf8'));
  } catch (e) {
    throw new IntegrityError(`${what}: header is not JSON (${(e as Error).message})`);
  }
  const base = 8 + hlen;
  const meta = (header.__metadata__ ?? {}) as Record<string, string>;
  const nf4Meta = JSON.parse(meta['swarmtune.nf4'] ?? '{}') as Record<string, [number, number, number]>;
  const raw = new Map<string, { dtype: string; shape: number[]; bytes: Uint8Array }>();
  for (const [name, e] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const ent = e as { dtype: string; shape: number[]; data_offsets: [number, number] };
    const [a, b] = ent.data_offsets;
    if (!(a >= 0 && b >= a && base + b <= blob.length)) throw new IntegrityError(`${what}: tensor ${name} has bad offsets [${a}, ${b}]`);
    // copy so typed-array views are aligned and own their buffer (a Node Buffer's slice is a view)
    const copy = new Uint8Array(b - a);
    copy.set(blob.subarray(base + a, base + b));
    raw.set(name, { dtype: ent.dtype, shape: ent.shape, bytes: copy });
  }
  const out: ShardTensors = { nf4: new Map(), float: new Map() };
  for (const [name, [rows, cols, blocksize]] of Object.entries(nf4Meta)) {
    const p = raw.get(name);
    const am = raw.get(`${name}.absmax`);
    if (p === undefined || am === undefined) throw new IntegrityError(`${what}: NF4 tensor ${name} lacks its packed codes or absmax`);
    const n = rows * cols;
    if (p.bytes.length !== Math.ceil(n / 2) || am.bytes.length !== 4 * Math.ceil(n / blocksize)) {
      throw new IntegrityError(`${what}: NF4 tensor ${name} [${rows}, ${cols}] blocksize ${blocksize} has ${p.bytes.length} code bytes and ${am.bytes.length / 4} absmax`);
    }
    out.nf4.set(name, { packed: p.bytes, absmax: new Float32Array(am.bytes.buffer), rows, cols, blocksize });
    raw.delete(name);
    raw.delete(`${name}.absmax`);
  }
  for (const [name, r] of raw) {
    if (r.dtype !== 'F32') throw new SchemaError(`${what}: tensor ${name} has dtype ${r.dtype}, shards hold only F32 and NF4`);
    const n = r.shape.reduce((x, y) => x * y, 1);
    if (r.bytes.length !== 4 * n) throw new IntegrityError(`${what}: tensor ${name} shape [${r.shape}] needs ${4 * n} bytes, got ${r.bytes.length}`);
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
  const nf4: string[] = [];
  const optionalFloat: string[] = [];
  const float = [`model.layers.${l}.input_layernorm.weight`, `model.layers.${l}.post_attention_layernorm.weight`];
  for (const m of ['q_proj', 'k_proj', 'v_proj', 'o_proj']) {
    nf4.push(`model.layers.${l}.self_attn.${m}.weight`);
    optionalFloat.push(`model.layers.${l}.self_attn.${m}.bias`);
  }
  for (const m of ['gate_proj', 'up_proj', 'down_proj']) {
    nf4.push(`model.layers.${l}.mlp.${m}.weight`);
    optionalFloat.push(`model.layers.${l}.mlp.${m}.bias`);
  }
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
  if (m === null) throw new SchemaError(`unknown shard blob name "${blobName}"`);
  return { kind: 'layer', layer: Number(m[1]) };
}
