// The coordinator's disk per committed step (issue 14): the same commits (adapter + record each step, an
// optimizer checkpoint every save_steps) into a RunStore without and with save_total_limit, pruned by the
// launch's own Retention after each commit; bytes on disk of the LevelDB dir, measured with stat.
// Run: node_modules/.bin/node bench/store-cost.ts [--steps=N] [--adapter-mib=X,Y] → one JSON line.
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import { randomFillSync } from 'node:crypto';
import path from 'node:path';
import { RunStore } from '../coordinator/store.ts';
import { Retention } from '../coordinator/retention.ts';

const arg = (name: string, def: string) => process.argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3) ?? def;
const STEPS = Number(arg('steps', '40'));
const SIZES = arg('adapter-mib', '1,8').split(',').map(Number);
const SAVE_STEPS = 10, LIMIT = 2;

async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, f.name);
    n += f.isDirectory() ? await dirBytes(p) : (await stat(p)).blocks * 512;
  }
  return n;
}

const root = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-store-cost-'));
const out: Array<Record<string, unknown>> = [];
try {
  for (const mib of SIZES) {
    const row: Record<string, unknown> = { adapter_mib: mib, steps: STEPS, save_steps: SAVE_STEPS };
    for (const limit of [null, LIMIT] as const) {
      const dir = path.join(root, `${mib}-${limit ?? 'all'}`);
      const store = await RunStore.open(path.join(dir, 'db'));
      const retention = new Retention({
        store, train: { save_strategy: 'steps', save_steps: SAVE_STEPS, save_total_limit: limit }, totalSteps: STEPS, stepsPerEpoch: STEPS,
        outputDir: path.join(dir, 'out'), lora: { r: 8, loraAlpha: 8, loraDropout: 0, targetModules: ['q_proj'], useRslora: false, initLoraWeights: true },
        baseModel: 'bench', trainingArgs: {}, adapter: () => [], pruneBlobsBefore: async () => 0, log: () => {},
      });
      const bytes = new Uint8Array(Math.round(mib * 2 ** 20));
      const pruneMs: number[] = [];
      await store.putInitialAdapter(randomFillSync(bytes));
      for (let step = 1; step <= STEPS; step++) {
        // float32 LoRA weights do not compress: random bytes stand for them (LevelDB's snappy would shrink zeros)
        randomFillSync(bytes);
        // 32-bit AdamW state: m and v, twice the adapter's bytes
        const ckpt = step % SAVE_STEPS === 0 ? [randomFillSync(new Uint8Array(bytes.length * 2))] : null;
        await store.commitStep({ step, loss: 0, lr: 0, gradNorm: 0, tokens: 0, tokensPerSecond: 0, timeMs: Date.now(), cursor: step }, bytes, ckpt);
        // what Retention.afterCommit does to the store (its checkpoint-N dirs are the output dir's, not measured here)
        const t = performance.now();
        const kept = retention.keptSteps(step);
        if (kept !== null) {
          const drop = (await store.committedSteps()).filter((s) => !kept.has(s));
          if (drop.length > 0) await store.pruneSteps(drop);
        }
        pruneMs.push(performance.now() - t);
      }
      const kept = await store.committedSteps();
      await store.close();
      const onDisk = await dirBytes(path.join(dir, 'db'));
      pruneMs.sort((a, b) => a - b);
      row[limit === null ? 'no_limit' : `save_total_limit_${limit}`] = {
        bytes_on_disk: onDisk, bytes_per_committed_step: Math.round(onDisk / STEPS), steps_kept: kept,
        prune_ms_median: Number(pruneMs[pruneMs.length >> 1]!.toFixed(2)),
      };
    }
    out.push(row);
  }
} finally {
  await rm(root, { recursive: true, force: true });
}
console.log(JSON.stringify({ store_cost: out }));
