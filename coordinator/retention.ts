// What a launch keeps on disk, as `swarmtune train` does: checkpoint-N dirs in --output-dir every save_steps
// (at most save_total_limit), and in the coordinator's store only the latest step and the checkpoints kept.
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { writeAdapter } from '../engine/formats/peft.ts';
import { listCheckpoints } from '../engine/train/trainer.ts';
import { checkpointsToDelete } from '../engine/train/evaluation.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import type { LoraConfig, NamedTensor } from '../engine/types.ts';
import type { RunStore } from './store.ts';

export const TRAINING_ARGS_FILE = 'training_args.json';

export interface RetentionInit {
  store: RunStore;
  train: Pick<TrainConfig, 'save_strategy' | 'save_steps' | 'save_total_limit'>;
  totalSteps: number;
  stepsPerEpoch: number;
  outputDir: string;
  lora: LoraConfig;
  baseModel: string;
  /** training_args.json's content */
  trainingArgs: Record<string, unknown>;
  /** the committed adapter, in stage order */
  adapter: () => NamedTensor[];
  /** delete the assignment blobs of steps before this one; resolves with how many went */
  pruneBlobsBefore: (step: number) => Promise<number>;
  log: (msg: string) => void;
  /** a checkpoint dir save_total_limit must not delete (load_best_model_at_end's best, as HF keeps it) */
  protect?: () => string | null;
}

/** A PEFT adapter dir plus training_args.json, written under a temporary name and renamed last, so a
 *  crash mid-write never leaves a dir that looks complete. */
export async function writeAdapterDir(dir: string, o: { lora: LoraConfig; baseModel: string; tensors: NamedTensor[]; trainingArgs: Record<string, unknown> }): Promise<void> {
  const tmp = `${dir}.tmp-${process.pid}`;
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp, { recursive: true });
  await writeAdapter(tmp, { lora: o.lora, baseModel: o.baseModel, tensors: o.tensors });
  await writeFile(path.join(tmp, TRAINING_ARGS_FILE), JSON.stringify(o.trainingArgs, null, 2) + '\n');
  await rm(dir, { recursive: true, force: true });
  await rename(tmp, dir);
}

export class Retention {
  private readonly o: RetentionInit;

  constructor(o: RetentionInit) {
    this.o = o;
  }

  /** Whether step `step` gets a checkpoint-N dir (train's rule: every save_steps, or each epoch's end,
   *  and the last step unless save_strategy is "no"). */
  isCheckpoint(step: number): boolean {
    const t = this.o.train;
    if (t.save_strategy === 'no' || step <= 0) return false;
    if (step === this.o.totalSteps) return true;
    return t.save_strategy === 'steps' ? step % t.save_steps === 0 : step % this.o.stepsPerEpoch === 0;
  }

  /** The steps whose adapter the store keeps once `latest` is committed: the latest and the last
   *  save_total_limit checkpoint steps; null = every step (no save_total_limit). */
  keptSteps(latest: number): Set<number> | null {
    const limit = this.o.train.save_total_limit;
    if (limit === null) return null;
    const kept = new Set<number>([latest]);
    for (let s = latest, n = 0; s > 0 && n < limit; s--) if (this.isCheckpoint(s)) { kept.add(s); n++; }
    return kept;
  }

  /** After step `step` is committed: its checkpoint dir, then what falls beyond the limit. */
  async afterCommit(step: number): Promise<void> {
    const { outputDir, store } = this.o;
    if (this.isCheckpoint(step)) {
      await writeAdapterDir(path.join(outputDir, `checkpoint-${step}`), { lora: this.o.lora, baseModel: this.o.baseModel, tensors: this.o.adapter(), trainingArgs: this.o.trainingArgs });
      const limit = this.o.train.save_total_limit;
      if (limit !== null) {
        const all = listCheckpoints(outputDir);
        for (const old of checkpointsToDelete(all, limit, this.o.protect?.() ?? null)) await rm(old, { recursive: true, force: true });
      }
    }
    await this.o.pruneBlobsBefore(step);
    const kept = this.keptSteps(step);
    if (kept === null) return;
    const drop = (await store.committedSteps()).filter((s) => !kept.has(s));
    if (drop.length > 0) await store.pruneSteps(drop);
  }
}
