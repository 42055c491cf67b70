// Forward+backward throughput of the issue-2 bench model on the native backend (prints one JSON object
// when run directly; bench/run.ts runs it in a child process so its peak RSS is its own).
//
// The model: 8 layers, hidden 512, GQA 8 query / 4 key-value heads (head_dim 64), intermediate 1408,
// vocab 8192, NF4 base (random codes, blocksize 64), LoRA r=16 alpha 16 on all 7 targets, gradient
// checkpointing per layer, batch 4 x 256 tokens. One "step" = forward + backward of that micro-batch
// into the LoRA gradients (no optimizer update, as the PyTorch baseline bench/torch_baseline.py).
import { NativeBackend, defaultThreadCount } from '../engine/backends/native.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import type { LlamaConfig, LoraConfig } from '../engine/types.ts';

export const BENCH_MODEL = { layers: 8, hidden: 512, heads: 8, kvHeads: 4, headDim: 64, intermediate: 1408, vocab: 8192, batch: 4, seqLen: 256, loraR: 16 } as const;

export function benchModelConfig(): LlamaConfig {
  const m = BENCH_MODEL;
  return tinyLlamaConfig({
    hiddenSize: m.hidden, intermediateSize: m.intermediate, numHiddenLayers: m.layers, numAttentionHeads: m.heads,
    numKeyValueHeads: m.kvHeads, headDim: m.headDim, vocabSize: m.vocab, maxPositionEmbeddings: 2048,
  });
}

/** A Llama config as an HF config.json object (what a coordinator sends its volunteers). */
export function hfConfigOf(c: LlamaConfig): Record<string, unknown> {
  return {
    model_type: 'llama', vocab_size: c.vocabSize, hidden_size: c.hiddenSize, intermediate_size: c.intermediateSize,
    num_hidden_layers: c.numHiddenLayers, num_attention_heads: c.numAttentionHeads, num_key_value_heads: c.numKeyValueHeads,
    head_dim: c.headDim, rms_norm_eps: c.rmsNormEps, rope_theta: c.ropeTheta, max_position_embeddings: c.maxPositionEmbeddings,
    tie_word_embeddings: c.tieWordEmbeddings,
  };
}

export const BENCH_LORA: LoraConfig = {
  r: BENCH_MODEL.loraR, loraAlpha: 16, loraDropout: 0, useRslora: false, initLoraWeights: true,
  targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
};

const median = (xs: number[]) => { const v = [...xs].sort((a, b) => a - b); const m = v.length >> 1; return v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2; };

export async function benchModel(opts: { steps?: number; warmup?: number; threads?: number; checkpointing?: boolean } = {}): Promise<Record<string, unknown>> {
  const steps = opts.steps ?? 5, warmup = opts.warmup ?? 1;
  const threads = opts.threads ?? defaultThreadCount();
  const cfg = benchModelConfig();
  const be = new NativeBackend({ threads });
  try {
    const stage = await loadStage(randomWeightSource(cfg, 1), be, {
      layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: BENCH_LORA, seed: 1, gradientCheckpointing: opts.checkpointing ?? true,
    });
    const { batch: B, seqLen: S } = BENCH_MODEL;
    const T = B * S;
    const ids = new Int32Array(T), labels = new Int32Array(T);
    let s = 12345;
    for (let i = 0; i < T; i++) { s = (s * 1103515245 + 12345) >>> 0; ids[i] = s % cfg.vocabSize; }
    for (let i = 0; i < T; i++) labels[i] = (i % S) === S - 1 ? -100 : ids[i + 1]!;
    const grads = stage.newGrads();
    const fwdMs: number[] = [], bwdMs: number[] = [], stepMs: number[] = [];
    let loss = 0;
    for (let k = 0; k < warmup + steps; k++) {
      const t0 = performance.now();
      const r = await stage.forward({ key: `b${k}`, batch: B, seqLen: S, ids, labels, dropoutSeed: 0 }, { train: true });
      const t1 = performance.now();
      await stage.backward(`b${k}`, grads, { lossScale: 1 / (r.tokens ?? 1) });
      const t2 = performance.now();
      loss = (r.lossSum ?? 0) / (r.tokens ?? 1);
      if (k >= warmup) { fwdMs.push(t1 - t0); bwdMs.push(t2 - t1); stepMs.push(t2 - t0); }
    }
    let trainable = 0;
    for (const p of stage.params) trainable += p.data.length;
    stage.dispose();
    const med = median(stepMs);
    return {
      shape: { ...BENCH_MODEL },
      backend: `native (${threads} threads)`,
      gradient_checkpointing: opts.checkpointing ?? true,
      trainable_params: trainable,
      warmup_steps: warmup, measured_steps: steps,
      step_ms_median: round(med), step_ms_min: round(Math.min(...stepMs)), step_ms_all: stepMs.map((x) => round(x)),
      forward_ms_median: round(median(fwdMs)), backward_ms_median: round(median(bwdMs)),
      tokens_per_s: round(T / (med / 1000)),
      tokens_per_s_best: round(T / (Math.min(...stepMs) / 1000)),
      loss_first_step: round(loss, 4),
      peak_rss_mib: round(process.resourceUsage().maxRSS / 1024),
    };
  } finally {
    be.dispose();
  }
}

function round(x: number, d = 1): number { return Number(x.toFixed(d)); }

if (import.meta.main) {
  const arg = (k: string) => process.argv.find((a) => a.startsWith(`--${k}=`))?.slice(k.length + 3);
  const r = await benchModel({
    steps: arg('steps') !== undefined ? Number(arg('steps')) : undefined,
    warmup: arg('warmup') !== undefined ? Number(arg('warmup')) : undefined,
    threads: arg('threads') !== undefined ? Number(arg('threads')) : undefined,
  });
  console.log(JSON.stringify(r));
}
