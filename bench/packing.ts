// Packing (TRL packing=True, bfd + padding-free; engine/train/packing.ts) against padded micro-batches on a
// dataset of mixed lengths: the same examples, one epoch each way, forward + backward of every micro-batch into
// the LoRA gradients on the native backend (no optimizer update). Prints one JSON object when run directly;
// bench/run.ts runs it in a child process.
//
// The model: the issue-2 bench model shape shrunk to 4 layers (hidden 512, GQA 8/4 heads, intermediate 1408,
// vocab 8192, NF4 base, LoRA r=16 on all 7 targets, gradient checkpointing). The data: example lengths drawn
// log-uniformly in [16, max_seq_length] (seeded), max_seq_length 512, per_device_train_batch_size 4 for both.
import { NativeBackend, defaultThreadCount } from '../engine/backends/native.ts';
import { randomWeightSource } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { Rng } from '../engine/model/rng.ts';
import { DataLoader } from '../engine/train/data.ts';
import type { TokenizedExample } from '../engine/train/data.ts';
import { packExamples } from '../engine/train/packing.ts';
import { accumulateStep } from '../engine/train/trainer.ts';
import { BENCH_LORA, benchModelConfig } from './model.ts';

export function mixedLengthExamples(n: number, maxLen: number, V: number, seed = 7): TokenizedExample[] {
  const rng = new Rng(seed);
  const out: TokenizedExample[] = [];
  for (let e = 0; e < n; e++) {
    const u = rng.nextU32() / 2 ** 32;
    const len = Math.max(2, Math.min(maxLen, Math.round(16 * (maxLen / 16) ** u)));
    const ids = Int32Array.from({ length: len }, () => rng.nextU32() % V);
    const labels = new Int32Array(len).fill(-100);
    for (let i = 0; i + 1 < len; i++) labels[i] = ids[i + 1]!;
    out.push({ ids, labels, labelTokens: len - 1, line: e + 1 });
  }
  return out;
}

export async function benchPacking(opts: { examples?: number; maxLen?: number; batch?: number; threads?: number } = {}): Promise<Record<string, unknown>> {
  const n = opts.examples ?? 64, maxLen = opts.maxLen ?? 512, batch = opts.batch ?? 4;
  const cfg = { ...benchModelConfig(), numHiddenLayers: 4 };
  const be = new NativeBackend({ threads: opts.threads ?? defaultThreadCount() });
  try {
    const stage = await loadStage(randomWeightSource(cfg, 1), be, { layerStart: 0, layerEnd: 4, lora: BENCH_LORA, seed: 1 });
    const examples = mixedLengthExamples(n, maxLen, cfg.vocabSize);
    const realTokens = examples.reduce((s, e) => s + e.ids.length, 0);
    const run = async (packing: boolean) => {
      const rows = packing ? packExamples(examples, maxLen) : examples;
      const loader = new DataLoader(rows, { batchSize: batch, accumulation: 1, seed: 0, shuffle: false, padId: 0 });
      let positions = 0, lossSum = 0, labelTokens = 0;
      const t0 = performance.now();
      for (let k = 0; k < loader.microBatchesPerEpoch; k++) {
        const mb = loader.microBatch(0, k);
        positions += mb.batch * mb.seqLen;
        const r = await accumulateStep(stage, [mb], { seed: 0, step: k });
        lossSum += r.lossSum;
        labelTokens += r.labelTokens;
      }
      const seconds = (performance.now() - t0) / 1000;
      return {
        packing, rows: rows.length, micro_batches: loader.microBatchesPerEpoch, token_positions: positions,
        padding_fraction: Number((1 - realTokens / positions).toFixed(4)), seconds: Number(seconds.toFixed(2)),
        tokens_per_s: Number((realTokens / seconds).toFixed(1)), mean_token_loss: Number((lossSum / labelTokens).toFixed(6)),
      };
    };
    const padded = await run(false);
    const packed = await run(true);
    stage.dispose();
    return {
      model: { layers: 4, hidden: cfg.hiddenSize, intermediate: cfg.intermediateSize, vocab: cfg.vocabSize, lora_r: BENCH_LORA.r },
      data: { examples: n, real_tokens: realTokens, max_seq_length: maxLen, per_device_train_batch_size: batch, lengths: 'log-uniform in [16, max_seq_length]' },
      threads: be.threads, padded, packed, speedup: Number((packed.tokens_per_s / padded.tokens_per_s).toFixed(3)),
    };
  } finally {
    be.dispose();
  }
}

if (import.meta.main) {
  const quick = process.argv.includes('--quick');
  process.stdout.write(JSON.stringify(await benchPacking(quick ? { examples: 16, maxLen: 256 } : {})) + '\n');
}
