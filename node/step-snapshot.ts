// The stage state from before the last optimizer update (LoRA tensors + optimizer state), kept so a
// restarted coordinator that never committed that update can roll this volunteer back to the
// committed step. Small snapshots stay in memory; large ones are spilled to a file in the data dir.
import { mkdir, open, rm } from 'node:fs/promises';
import path from 'node:path';
import type { NamedTensor } from '../engine/types.ts';
import { adapterDigest } from '../protocol/adapter-digest.ts';
import { SwarmError } from '../protocol/errors.ts';

export interface SnapshotOptions {
  /** where a snapshot larger than residentBytes is spilled; null keeps every snapshot in memory */
  dir: string | null;
  /** snapshots up to this many bytes (adapter + optimizer state) stay in memory */
  residentBytes: number;
}

let fileSeq = 0;

export class StepSnapshot {
  /** optimizer steps applied when the snapshot was taken */
  readonly step: number;
  readonly sizeBytes: number;
  private adapter: Float32Array[] | null;
  private optimizer: Uint8Array | null;
  /** spilled: adapter tensors in param order, then the optimizer bytes */
  private readonly file: string | null;
  private readonly adapterBytes: number;
  private digestCache: string | null = null;

  private constructor(step: number, adapter: Float32Array[] | null, optimizer: Uint8Array | null, file: string | null, adapterBytes: number, optimizerBytes: number) {
    this.step = step;
    this.adapter = adapter;
    this.optimizer = optimizer;
    this.file = file;
    this.adapterBytes = adapterBytes;
    this.sizeBytes = adapterBytes + optimizerBytes;
  }

  get spilled(): boolean { return this.file !== null; }

  /** Copy the params and keep the optimizer bytes (from ShardOptimizer.saveState) as of `step`. */
  static async take(step: number, params: readonly NamedTensor[], optimizer: Uint8Array, o: SnapshotOptions): Promise<StepSnapshot> {
    const adapterBytes = params.reduce((a, p) => a + p.data.byteLength, 0);
    if (o.dir === null || adapterBytes + optimizer.length <= o.residentBytes) {
      return new StepSnapshot(step, params.map((p) => p.data.slice()), optimizer, null, adapterBytes, optimizer.length);
    }
    await mkdir(o.dir, { recursive: true });
    const file = path.join(o.dir, `stage-step${step}-${process.pid}-${fileSeq++}.snapshot`);
    const fh = await open(file, 'w');
    try {
      let pos = 0;
      for (const p of params) {
        await fh.write(new Uint8Array(p.data.buffer, p.data.byteOffset, p.data.byteLength), 0, p.data.byteLength, pos);
        pos += p.data.byteLength;
      }
      await fh.write(optimizer, 0, optimizer.length, pos);
    } finally {
      await fh.close();
    }
    return new StepSnapshot(step, null, null, file, adapterBytes, optimizer.length);
  }

  private async readFile(): Promise<Uint8Array> {
    const fh = await open(this.file!, 'r');
    try {
      const buf = new Uint8Array(this.sizeBytes);
      let off = 0;
      while (off < buf.length) {
        const { bytesRead } = await fh.read(buf, off, buf.length - off, off);
        if (bytesRead === 0) throw new SwarmError(`step snapshot ${this.file} is truncated: ${off} of ${buf.length} bytes`);
        off += bytesRead;
      }
      return buf;
    } finally {
      await fh.close();
    }
  }

  private async tensors(params: readonly NamedTensor[]): Promise<{ adapter: Float32Array[]; optimizer: Uint8Array }> {
    if (this.file === null) return { adapter: this.adapter!, optimizer: this.optimizer! };
    const buf = await this.readFile();
    const adapter: Float32Array[] = [];
    let off = 0;
    for (const p of params) {
      adapter.push(new Float32Array(buf.buffer, off, p.data.length)); // offsets are multiples of 4
      off += p.data.byteLength;
    }
    return { adapter, optimizer: buf.subarray(this.adapterBytes) };
  }

  /** sha256 of the snapshot's adapter (names and shapes from the stage's params) */
  async digest(params: readonly NamedTensor[]): Promise<string> {
    if (this.digestCache === null) {
      const { adapter } = await this.tensors(params);
      this.digestCache = adapterDigest(params.map((p, i) => ({ name: p.name, shape: p.shape, data: adapter[i]! })));
    }
    return this.digestCache;
  }

  /** Write the snapshot's LoRA tensors back into `params`; returns the optimizer state to load. */
  async restoreInto(params: readonly NamedTensor[]): Promise<Uint8Array> {
    const { adapter, optimizer } = await this.tensors(params);
    if (adapter.length !== params.length) throw new SwarmError(`step snapshot has ${adapter.length} tensors, the stage ${params.length}`);
    params.forEach((p, i) => {
      if (adapter[i]!.length !== p.data.length) throw new SwarmError(`step snapshot: ${p.name} has ${adapter[i]!.length} elements, the stage ${p.data.length}`);
      p.data.set(adapter[i]!);
    });
    return optimizer;
  }

  async dispose(): Promise<void> {
    this.adapter = null;
    this.optimizer = null;
    if (this.file !== null) await rm(this.file, { force: true });
  }
}
