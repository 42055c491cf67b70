// The run's content-addressed blobs: the base model quantized once into shard blobs, and references peers fetch them by.
import { readFile, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import type { LlamaConfig, WeightSource } from '../engine/types.ts';
import type { BlobStore } from '../protocol/blobs.ts';
import type { BlobRef } from '../protocol/messages.ts';
import type { SwarmNode } from '../protocol/net.ts';
import { shardKindOf, shardTensorNames, stageShardNames, writeShardFile } from '../engine/formats/shard.ts';
import type { ShardTensors } from '../engine/formats/shard.ts';
import type { StageRange } from './planner.ts';

interface ShardRef { sha256: string; sizeBytes: number }

export interface ShardBlobsInit {
  node: SwarmNode;
  blobs: BlobStore;
  weights: WeightSource;
  llama: LlamaConfig;
  /** providers listed in one reference */
  maxProviders: number;
  log: (msg: string) => void;
}

export class ShardBlobs {
  private readonly refs = new Map<string, ShardRef>();
  /** blobs made for one step's assignments (name ends in .step<N>), by sha256: the newest step using it */
  private readonly stepBlobs = new Map<string, number>();
  private readonly o: ShardBlobsInit;

  constructor(o: ShardBlobsInit) {
    this.o = o;
  }

  /** Quantize the base model once into content-addressed shard blobs and keep their refs. */
  async publish(cache?: { file: string; key: string }): Promise<void> {
    const cfg = this.o.llama;
    const names = ['embed', ...Array.from({ length: cfg.numHiddenLayers }, (_, l) => `layer.${l}`), 'head'];
    if (cache !== undefined) {
      // the same model files were quantized before: re-verify those blobs instead of quantizing again
      try {
        const m = JSON.parse(await readFile(cache.file, 'utf8')) as { key: string; refs: Record<string, ShardRef> };
        if (m.key === cache.key && names.every((n) => m.refs[n] !== undefined)) {
          let ok = true;
          for (const n of names) ok &&= (await this.o.blobs.cachedFile({ name: n, sha256: m.refs[n]!.sha256 })) !== null;
          if (ok) {
            for (const n of names) this.refs.set(n, m.refs[n]!);
            this.o.log(`reusing ${names.length} verified shard blobs quantized earlier from the same model files`);
            return;
          }
        }
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') this.o.log(`ignoring unreadable shard manifest ${cache.file}: ${(e as Error).message}`);
      }
    }
    for (const name of names) {
      const spec = shardTensorNames(cfg, shardKindOf(name));
      const t: ShardTensors = { nf4: new Map(), float: new Map() };
      for (const n of spec.nf4) t.nf4.set(n, await this.o.weights.getNF4(n));
      for (const n of [...spec.float, ...spec.optionalFloat.filter((x) => this.o.weights.has(x))]) {
        const data = await this.o.weights.getFloat(n);
        t.float.set(n, { shape: [data.length], data });
      }
      // written to disk tensor by tensor: a blob over 2 GiB (an 8B or 70B embedding) is never one buffer
      this.refs.set(name, await this.o.blobs.putFile((file) => writeShardFile(t, file)));
    }
    this.o.log(`published ${names.length} shard blobs`);
    if (cache !== undefined) await writeFile(cache.file, JSON.stringify({ key: cache.key, refs: Object.fromEntries(this.refs) }));
  }

  private blobRef(name: string, ref: ShardRef, extraProviders: string[] = []): BlobRef {
    const own = this.o.node.getMultiaddrs().map((m) => m.toString());
    // the coordinator's own addresses always stay listed (the provider of last resort); holders fill the rest
    const holders = extraProviders.slice(0, Math.max(0, this.o.maxProviders - own.length));
    // every chunk's hash, so a fetcher checks chunks from several peers as they arrive (protocol/blobs.ts)
    const chunkSha256 = this.o.blobs.chunkHashes(ref.sha256);
    return {
      name, sha256: ref.sha256, sizeBytes: ref.sizeBytes, providers: [...holders, ...own].slice(0, this.o.maxProviders),
      ...(chunkSha256 !== undefined ? { chunkBytes: this.o.blobs.chunkBytes, chunkSha256 } : {}),
    };
  }

  /** The frozen shard blobs of a stage; `holders` (addresses of peers already serving them) are listed
   *  first, and a joiner fetches chunks from all of them at once. */
  stageBlobs(st: StageRange, holders: string[]): BlobRef[] {
    return stageShardNames(this.o.llama, st.layerStart, st.layerEnd).map((n) => this.blobRef(n, this.refs.get(n)!, holders));
  }

  /** Store bytes (a stage's adapter slice, its optimizer state) as a blob peers fetch from the coordinator. */
  async put(name: string, bytes: Uint8Array): Promise<BlobRef> {
    const sha256 = await this.o.blobs.put(bytes);
    const m = /\.step(\d+)$/.exec(name);
    if (m !== null) this.stepBlobs.set(sha256, Math.max(Number(m[1]), this.stepBlobs.get(sha256) ?? -1));
    return this.blobRef(name, { sha256, sizeBytes: bytes.length });
  }

  /** Sha256 over the shard blobs' sha256s in model order: the quantized weights' content, computed once
   *  when the model is quantized (or its verified blobs reused). */
  contentHash(): string {
    const h = createHash('sha256');
    for (const [name, ref] of this.refs) h.update(`${name}\0${ref.sha256}\0`);
    return h.digest('hex');
  }

  /** Delete the per-step blobs (a stage's adapter slice or optimizer state for an assignment) of steps
   *  before `step`; a blob whose bytes are also a shard blob or a newer step's stays. Returns how many went. */
  async pruneStepBlobs(step: number): Promise<number> {
    const shards = new Set([...this.refs.values()].map((r) => r.sha256));
    let n = 0;
    for (const [sha, newest] of [...this.stepBlobs]) {
      if (newest >= step) continue;
      this.stepBlobs.delete(sha);
      if (shards.has(sha)) continue;
      await this.o.blobs.remove(sha);
      n++;
    }
    return n;
  }
}
