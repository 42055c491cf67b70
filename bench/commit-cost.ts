// What a durable step commit costs the coordinator: RunStore.commitStep (one LevelDB batch written with
// sync: true, so it is on disk before the step is announced) against the same batch unsynced, per
// adapter size, on the disk under os.tmpdir() (or --dir). Median and max of `reps` commits each.
//   node bench/commit-cost.ts [--dir D] [--reps N] [KiB of adapter ...]   (default 64 1024 16384)
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Level } from 'level';
import { RunStore } from '../coordinator/store.ts';

export interface CommitCostOptions { dir?: string; reps?: number; adapterKiB?: number[] }

const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]!; };
const r3 = (x: number) => Number(x.toFixed(3));

export async function benchCommitCost(o: CommitCostOptions = {}): Promise<Record<string, unknown>> {
  const reps = o.reps ?? 20;
  const root = await mkdtemp(path.join(o.dir ?? os.tmpdir(), 'swarmtune-commit-'));
  const runs: Array<Record<string, unknown>> = [];
  try {
    for (const kib of o.adapterKiB ?? [64, 1024, 16384]) {
      const adapter = new Uint8Array(kib * 1024);
      for (let i = 0; i < adapter.length; i += 4096) adapter[i] = i & 0xff;
      const store = await RunStore.open(path.join(root, `synced-${kib}`));
      const synced: number[] = [];
      for (let s = 1; s <= reps; s++) {
        const rec = { step: s, loss: 1, lr: 1e-3, gradNorm: 1, tokens: 1, tokensPerSecond: 1, timeMs: 1, cursor: s };
        const t = performance.now();
        await store.commitStep(rec, adapter);
        synced.push(performance.now() - t);
      }
      await store.close();
      // the same three puts, unsynced: the figure before durability was added
      const db = new Level<string, Uint8Array>(path.join(root, `unsynced-${kib}`), { valueEncoding: 'view' });
      await db.open();
      const unsynced: number[] = [];
      for (let s = 1; s <= reps; s++) {
        const rec = new Uint8Array(Buffer.from(JSON.stringify({ step: s })));
        const key = String(s).padStart(10, '0');
        const t = performance.now();
        await db.batch([{ type: 'put', key: `adapter:${key}`, value: adapter }, { type: 'put', key: `history:${key}`, value: rec }, { type: 'put', key: 'latest', value: rec }]);
        unsynced.push(performance.now() - t);
      }
      await db.close();
      runs.push({
        adapter_kib: kib, reps,
        synced_ms_median: r3(median(synced)), synced_ms_max: r3(Math.max(...synced)),
        unsynced_ms_median: r3(median(unsynced)), unsynced_ms_max: r3(Math.max(...unsynced)),
        sync_cost_ms_median: r3(median(synced) - median(unsynced)),
      });
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }
  return { dir: o.dir ?? os.tmpdir(), runs };
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  const opt = (name: string) => { const i = argv.indexOf(name); if (i < 0) return undefined; const v = argv[i + 1]; argv.splice(i, 2); return v; };
  const dir = opt('--dir');
  const reps = opt('--reps');
  const sizes = argv.map(Number);
  if (sizes.some((x) => !Number.isInteger(x) || x <= 0)) { process.stderr.write(`commit-cost: sizes must be positive whole KiB, got ${argv.join(' ')}\n`); process.exit(2); }
  const r = await benchCommitCost({ dir, reps: reps === undefined ? undefined : Number(reps), adapterKiB: sizes.length > 0 ? sizes : undefined });
  process.stdout.write(JSON.stringify(r, null, 2) + '\n');
}
