// The coordinator's durable run state in LevelDB: run meta, committed steps with their adapter and
// data cursor (written in one atomic batch before a step is announced), optimizer checkpoints.
import type { BanRecord } from './bans.ts';
import type { LoraConfig } from '../engine/types.ts';
import type { RunFingerprint } from './identity.ts';
import { Level } from 'level';

export interface StepRecord {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSecond: number;
  timeMs: number;
  /** position in the data stream after this step (micro-batches consumed) */
  cursor: number;
}

export interface RunMeta {
  runId: string;
  model: string;
  totalSteps: number;
  createdMs: number;
  /** the resolved training config, snake_case as in run.json */
  config: Record<string, unknown>;
  numStages: number;
  stages: Array<{ layerStart: number; layerEnd: number }>;
  /** what defines the run (coordinator/identity.ts); absent in stores written before it existed */
  fingerprint?: RunFingerprint;
  /** the run's own LoRA config (flags or --init-adapter's), what its adapters are written with */
  lora?: LoraConfig;
}

const pad = (n: number) => String(n).padStart(10, '0');

export class RunStore {
  private readonly db: Level<string, Uint8Array>;

  private constructor(db: Level<string, Uint8Array>) {
    this.db = db;
  }

  static async open(dir: string): Promise<RunStore> {
    const db = new Level<string, Uint8Array>(dir, { valueEncoding: 'view' });
    await db.open();
    return new RunStore(db);
  }

  async close(): Promise<void> {
    await this.db.close();
  }

  private async getJson<T>(key: string): Promise<T | null> {
    const v = await this.db.get(key);
    return v === undefined ? null : JSON.parse(Buffer.from(v).toString('utf8')) as T;
  }

  private json(v: unknown): Uint8Array {
    return new Uint8Array(Buffer.from(JSON.stringify(v), 'utf8'));
  }

  getMeta(): Promise<RunMeta | null> { return this.getJson<RunMeta>('meta'); }
  async putMeta(m: RunMeta): Promise<void> { await this.db.put('meta', this.json(m)); }
  /** bans with backoff, by peer id (coordinator/bans.ts), so a restarted coordinator keeps them */
  getBans(): Promise<Record<string, BanRecord> | null> { return this.getJson<Record<string, BanRecord>>('bans'); }
  async putBans(b: Record<string, BanRecord>): Promise<void> { await this.db.put('bans', this.json(b)); }

  /** the latest committed step record, null before the first commit */
  latest(): Promise<StepRecord | null> { return this.getJson<StepRecord>('latest'); }

  /** Commit a step: its record, the full adapter (shard-format bytes) and the cursor, atomically. */
  async commitStep(rec: StepRecord, adapterBytes: Uint8Array, optimizerStates: Uint8Array[] | null = null,
    /** earlier checkpoints to delete in the same batch (the coordinator's every-step checkpoints
     *  keep only the latest one between save_steps checkpoints) */
    pruneCheckpoints: Array<{ step: number; stages: number }> = []): Promise<void> {
    const ops: Array<{ type: 'put'; key: string; value: Uint8Array } | { type: 'del'; key: string }> = [
      { type: 'put', key: `adapter:${pad(rec.step)}`, value: adapterBytes },
      { type: 'put', key: `history:${pad(rec.step)}`, value: this.json(rec) },
      { type: 'put', key: 'latest', value: this.json(rec) },
    ];
    if (optimizerStates !== null) {
      optimizerStates.forEach((b, s) => ops.push({ type: 'put', key: `optim:${pad(rec.step)}:${pad(s)}`, value: b }));
      ops.push({ type: 'put', key: `ckpt:${pad(rec.step)}`, value: this.json({ stages: optimizerStates.length }) });
    }
    for (const c of pruneCheckpoints) {
      if (c.step === rec.step) continue;
      ops.push({ type: 'del', key: `ckpt:${pad(c.step)}` });
      for (let s = 0; s < c.stages; s++) ops.push({ type: 'del', key: `optim:${pad(c.step)}:${pad(s)}` });
    }
    // sync: LevelDB fsyncs its log before the batch resolves, so a step announced after this await
    // survives a power loss, not only a process crash (the default write stops at the OS page cache)
    await this.db.batch(ops, { sync: true });
  }

  /** The latest step with a complete optimizer checkpoint (adapter + every stage's state), or null. */
  async latestCheckpoint(): Promise<{ step: number; stages: number } | null> {
    let last: { step: number; stages: number } | null = null;
    for await (const [k, v] of this.db.iterator({ gte: 'ckpt:', lt: 'ckpt;' })) {
      last = { step: Number(k.slice('ckpt:'.length)), stages: (JSON.parse(Buffer.from(v).toString('utf8')) as { stages: number }).stages };
    }
    return last;
  }

  /** The initial adapter (step 0) is stored the same way so pulls and restarts before step 1 work. */
  async putInitialAdapter(adapterBytes: Uint8Array): Promise<void> {
    await this.db.put(`adapter:${pad(0)}`, adapterBytes, { sync: true });
  }

  async adapter(step: number): Promise<Uint8Array | null> {
    return (await this.db.get(`adapter:${pad(step)}`)) ?? null;
  }

  /** Delete the adapters and optimizer checkpoints of `steps` in one batch (the step records stay, so
   *  `status` keeps the loss curve). The latest committed step and the latest optimizer checkpoint are
   *  never deleted: a restart resumes from them. The deleted key range is compacted so the bytes leave
   *  the disk now rather than at LevelDB's next compaction. Returns the steps whose adapter was deleted. */
  async pruneSteps(steps: readonly number[]): Promise<number[]> {
    const latest = (await this.latest())?.step ?? 0;
    const ckpt = await this.latestCheckpoint();
    const ops: Array<{ type: 'del'; key: string }> = [];
    const pruned: number[] = [];
    for (const step of steps) {
      if (step === latest) continue;
      if ((await this.db.get(`adapter:${pad(step)}`)) !== undefined) pruned.push(step);
      ops.push({ type: 'del', key: `adapter:${pad(step)}` });
      if (ckpt !== null && ckpt.step === step) continue;
      const c = await this.getJson<{ stages: number }>(`ckpt:${pad(step)}`);
      if (c === null) continue;
      ops.push({ type: 'del', key: `ckpt:${pad(step)}` });
      for (let s = 0; s < c.stages; s++) ops.push({ type: 'del', key: `optim:${pad(step)}:${pad(s)}` });
    }
    if (ops.length === 0) return [];
    await this.db.batch(ops);
    const lo = Math.min(...steps), hi = Math.max(...steps);
    // `level` is classic-level on Node, which compacts ranges; its type declares only the abstract API
    const db = this.db as unknown as { compactRange?: (start: string, end: string) => Promise<void> };
    if (db.compactRange !== undefined) {
      for (const prefix of ['adapter', 'ckpt', 'optim']) await db.compactRange.call(this.db, `${prefix}:${pad(lo)}`, `${prefix}:${pad(hi)}\xff`);
    }
    return pruned;
  }

  /** whether `step` was ever committed (its record stays after its adapter is pruned) */
  async wasCommitted(step: number): Promise<boolean> {
    return (await this.db.get(`history:${pad(step)}`)) !== undefined;
  }

  async history(): Promise<StepRecord[]> {
    const out: StepRecord[] = [];
    for await (const [, v] of this.db.iterator({ gte: 'history:', lt: 'history;' })) out.push(JSON.parse(Buffer.from(v).toString('utf8')));
    return out;
  }

  async committedSteps(): Promise<number[]> {
    const out: number[] = [];
    for await (const k of this.db.keys({ gte: 'adapter:', lt: 'adapter;' })) out.push(Number(k.slice('adapter:'.length)));
    return out;
  }

  /** Optimizer state of one stage at a checkpointed step (opaque bytes from the stage's replica). */
  async optimizerState(step: number, stageIndex: number): Promise<Uint8Array | null> {
    return (await this.db.get(`optim:${pad(step)}:${pad(stageIndex)}`)) ?? null;
  }
}
