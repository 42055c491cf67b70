// WeightSource over decoded shard blobs (what a volunteer's stage loads its frozen base from).
import type { NF4Weight } from '../engine/formats/nf4.ts';
import type { FloatReader, LlamaConfig, WeightSource } from '../engine/types.ts';
import type { LazyFloatTensor, ShardTensors } from '../engine/formats/shard.ts';

export class BlobWeightSource implements WeightSource {
  readonly config: LlamaConfig;
  private readonly nf4 = new Map<string, NF4Weight>();
  private readonly float = new Map<string, Float32Array>();
  private readonly lazy = new Map<string, LazyFloatTensor>();

  /** `lazy`: float tensors left in their shard files (engine/formats/shard.ts openShardFile) */
  constructor(config: LlamaConfig, shards: ShardTensors[], lazy: ReadonlyMap<string, LazyFloatTensor>[] = []) {
    this.config = config;
    for (const s of shards) {
      for (const [k, v] of s.nf4) this.nf4.set(k, v);
      for (const [k, v] of s.float) this.float.set(k, v.data);
    }
    for (const m of lazy) for (const [k, v] of m) this.lazy.set(k, v);
  }

  has(name: string): boolean {
    return this.nf4.has(name) || this.float.has(name) || this.lazy.has(name);
  }

  floatReader(name: string): FloatReader | null {
    return this.lazy.get(name) ?? null;
  }

  async getFloat(name: string): Promise<Float32Array> {
    const l = this.lazy.get(name);
    if (l !== undefined) { const out = new Float32Array(l.elements); await l.read(0, out); return out; }
    const t = this.float.get(name);
    if (t === undefined) throw new Error(`shard weights: no float tensor ${name}${this.nf4.has(name) ? ' (it is stored as NF4)' : ''}`);
    return t;
  }

  async getNF4(name: string): Promise<NF4Weight> {
    const t = this.nf4.get(name);
    if (t === undefined) throw new Error(`shard weights: no NF4 tensor ${name}`);
    return t;
  }

  /** Drop references once the stage has loaded, so the blob copies can be collected. */
  clear(): void {
    this.nf4.clear();
    this.float.clear();
    this.lazy.clear();
  }
}
