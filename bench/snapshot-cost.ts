// Cost of the per-step rollback snapshot a volunteer takes before each optimizer update
// (node/step-snapshot.ts): optimizer saveState + LoRA copy, in memory or spilled to disk, and the
// restore (rollback). Usage: node bench/snapshot-cost.ts [M params per stage ...] (default 1 4 16).
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createShardOptimizer } from '../node/optimizer.ts';
import { StepSnapshot } from '../node/step-snapshot.ts';
import type { NamedTensor } from '../engine/types.ts';

const sizes = process.argv.slice(2).map(Number).filter((x) => x > 0);
const dir = await mkdtemp(path.join(os.tmpdir(), 'snapshot-cost-'));
const rows: Array<Record<string, unknown>> = [];
try {
  for (const m of sizes.length > 0 ? sizes : [1, 4, 16]) {
    for (const optim of ['adamw_torch', 'paged_adamw_8bit'] as const) {
      const n = Math.round(m * 1e6), per = 65536;
      const params: NamedTensor[] = Array.from({ length: Math.ceil(n / per) }, (_, i) => ({ name: `p${i}`, shape: [per], data: new Float32Array(per).fill(0.01) }));
      const opt = await createShardOptimizer({ optim, adamBeta1: 0.9, adamBeta2: 0.999, adamEpsilon: 1e-8, weightDecay: 0, residentBytes: 0 }, params, { spillDir: dir, state: null });
      await opt.step(params.map((p) => new Float32Array(p.data.length).fill(1e-3)), 1e-3);
      for (const spilled of [false, true]) {
        const best = { save: Infinity, take: Infinity, restore: Infinity };
        let bytes = 0;
        for (let r = 0; r < 3; r++) {
          let t = performance.now();
          const state = await opt.saveState();
          best.save = Math.min(best.save, performance.now() - t);
          t = performance.now();
          const snap = await StepSnapshot.take(1, params, state, { dir, residentBytes: spilled ? 0 : Infinity });
          best.take = Math.min(best.take, performance.now() - t);
          bytes = snap.sizeBytes;
          t = performance.now();
          await opt.loadState(await snap.restoreInto(params));
          best.restore = Math.min(best.restore, performance.now() - t);
          await snap.dispose();
        }
        rows.push({ params_M: m, optim, spilled, snapshot_MiB: +(bytes / 2 ** 20).toFixed(1), save_ms: +best.save.toFixed(1), snapshot_ms: +best.take.toFixed(1), per_step_ms: +(best.save + best.take).toFixed(1), rollback_ms: +best.restore.toFixed(1) });
      }
    }
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
console.log(JSON.stringify(rows, null, 1));
