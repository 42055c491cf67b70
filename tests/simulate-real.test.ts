// The simulator predicts a real 4-volunteer swarm's step time within 20%: a coordinator and 4 volunteers
// (2 stages × 2 replicas) run in one process over 127.0.0.1; the run's measured compute per micro-batch and
// LevelDB commit, and the committed loopback link figures, go into a scenario of the same shape (bench/scale-real.ts).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';
import { compareWithReal } from '../bench/scale-real.ts';

test('simulated step time of a real 4-volunteer run (2 stages x 2 replicas) is within 20% of the real one', { timeout: 600_000 }, async () => {
  const llama = tinyLlamaConfig({ hiddenSize: 256, intermediateSize: 688, numHiddenLayers: 4, numAttentionHeads: 4, numKeyValueHeads: 2, headDim: 64, vocabSize: 512 });
  const r = await compareWithReal({ llama, steps: 3, microBatches: 8, batch: 2, seqLen: 64 });
  process.stderr.write(`real ${r.real_step_ms} ms per step, simulated ${r.simulated_step_ms} ms (ratio ${r.ratio}); compute per micro-batch ${r.compute_ms_per_stage.join(' / ')} ms, commit ${r.store_commit_ms} ms, round trip ${r.rtt_ms} ms\n`);
  assert.ok(r.compute_ms_per_stage.every((x) => x > 0));
  // within 20% either way (issue 19)
  assert.ok(r.ratio >= 0.8 && r.ratio <= 1.2, `simulated ${r.simulated_step_ms} ms against a real ${r.real_step_ms} ms per step (ratio ${r.ratio})`);
});
