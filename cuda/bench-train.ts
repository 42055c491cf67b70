// GPU training benchmark: QLoRA forward+backward+paged AdamW on a ~1.1B-parameter Llama-shaped random model, through the CUDA backend.
//
// Usage: node cuda/bench-train.ts [--out report.json] [--layers 22] [--batch 4] [--seq 512] [--steps 3] [--budget-s 300]
// The model is generated on the fly (TinyLlama-1.1B shapes: hidden 2048, 22 layers, 32/4 heads,
// intermediate 5632, vocab 32000) with seeded random NF4 weights, so nothing is downloaded.
// NF4 base weights stay resident on the device after their first use (weight cache). The stage computes
// on tensorsOf(backend), the backend's device-resident tensors: activations stay in device memory between
// ops and cross to the host only at the stage boundary, for the LoRA parameters and their gradients, and
// for the loss state. The report says whether that happened (`deviceResident`, from the tensor counters),
// and where a step goes (`ops`: ops per step, inline launches vs worker ops, launch seconds vs wait seconds).
// Also measured: NF4 dequantization GB/s and fused NF4 GEMM TFLOP/s on device-resident data
// (Llama-3-8B MLP shape 14336x4096), set against the probe's copy bandwidth and bf16 GEMM TFLOP/s.
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { loadCudaBackend, cudaUnavailableReason, probeCuda } from './index.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { loadStage } from '../engine/model/load.ts';
import { LORA_TARGETS } from '../engine/types.ts';
import { Rng } from '../engine/model/rng.ts';

const { values } = parseArgs({
  options: {
    out: { type: 'string' }, layers: { type: 'string', default: '22' }, batch: { type: 'string', default: '4' },
    seq: { type: 'string', default: '512' }, steps: { type: 'string', default: '3' }, 'budget-s': { type: 'string', default: '300' },
  },
});
const layers = Number(values.layers), B = Number(values.batch), S = Number(values.seq), steps = Number(values.steps);
const budgetMs = Number(values['budget-s']) * 1000;
const t0 = performance.now();

const report: Record<string, unknown> = { benchmark: 'qlora-train-1b', batch: B, seqLen: S, layers };
const probe = await probeCuda();
report.device = probe ?? { unavailable: cudaUnavailableReason() };
const backend = await loadCudaBackend();
if (!backend) {
  report.error = `no CUDA backend: ${cudaUnavailableReason()}`;
  finish(1);
}

const cfg = tinyLlamaConfig({
  vocabSize: 32000, hiddenSize: 2048, intermediateSize: 5632, numHiddenLayers: layers, numAttentionHeads: 32,
  numKeyValueHeads: 4, headDim: 64, maxPositionEmbeddings: 4096,
});
const C = cfg.hiddenSize, I = cfg.intermediateSize, KVD = cfg.numKeyValueHeads * cfg.headDim;
const perLayer = 2 * C * C + 2 * C * KVD + 3 * C * I + 2 * C;
report.parameters = layers * perLayer + 2 * cfg.vocabSize * C + C;

// Kernel figures first: they take seconds and must not be lost to the training budget.
try {
  const nf4 = await backend!.benchNF4({ M: 2048, rows: 14336, cols: 4096, blocksize: 64, iters: 10 });
  report.nf4 = {
    shape: [14336, 4096], blocksize: 64, gemmM: 2048, ...nf4,
    dequantFractionOfProbeBandwidth: probe ? nf4.dequantGBs / probe.memoryBandwidthGBs : null,
  };
} catch (e) {
  report.nf4 = { error: (e as Error).message };
}

let tStage = performance.now();
const source = randomWeightSource(cfg, 1);
const lora = { r: 16, loraAlpha: 16, loraDropout: 0, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true as const };
const stage = await loadStage(source, backend!, { layerStart: 0, layerEnd: layers, lora, seed: 1 });
report.modelBuildSeconds = (performance.now() - tStage) / 1000;
report.trainableParameters = stage.params.reduce((a, p) => a + p.data.length, 0);

const opt = backend!.createPagedAdamW({ bits: 8, deviceBudgetBytes: 64 * 2 ** 20 });
const ids = stage.params.map((p) => opt.add(p.data.length));
const rng = new Rng(7, 1);
const stepTimes: number[] = [];
// where a step's time goes (from the last timed step): ops launched inline on the JS thread and the time spent
// launching them, ops on libuv workers, and the host's waits on the device (downloads, host-array ops)
let opFigures: Record<string, number> | null = null;
let lastLoss = NaN;
for (let step = 0; step <= steps; step++) {
  if (performance.now() - t0 > budgetMs) {
    report.stoppedEarly = `time budget of ${budgetMs / 1000}s reached after ${step} steps`;
    break;
  }
  const tokens = Int32Array.from({ length: B * S }, () => rng.nextU32() % cfg.vocabSize);
  const labels = Int32Array.from({ length: B * S }, (_, i) => ((i + 1) % S === 0 ? -100 : tokens[i + 1]));
  const ts = performance.now();
  const ops0 = backend!.opStats();
  const grads = stage.newGrads();
  const fwd = await stage.forward({ key: `s${step}`, batch: B, seqLen: S, ids: tokens, labels }, { train: true });
  await stage.backward(`s${step}`, grads, { lossScale: 1 / (fwd.tokens ?? 1) });
  for (let i = 0; i < ids.length; i++) {
    await opt.step(ids[i], stage.params[i].data, grads[i], { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, step: step + 1 });
  }
  const dt = (performance.now() - ts) / 1000;
  const ops1 = backend!.opStats();
  opFigures = {
    opsPerStep: ops1.inlineOps - ops0.inlineOps + ops1.workerOps - ops0.workerOps,
    inlineOpsPerStep: ops1.inlineOps - ops0.inlineOps,
    workerOpsPerStep: ops1.workerOps - ops0.workerOps,
    launchSecondsPerStep: (ops1.inlineNs - ops0.inlineNs) / 1e9,
    waitsPerStep: ops1.waits - ops0.waits,
    waitSecondsPerStep: (ops1.waitNs - ops0.waitNs) / 1e9,
    stepSeconds: dt,
  };
  lastLoss = (fwd.lossSum ?? NaN) / (fwd.tokens ?? 1);
  if (step > 0) stepTimes.push(dt);  // step 0 warms up the pool and the kernels
  console.error(`bench: step ${step} ${dt.toFixed(2)} s loss ${lastLoss.toFixed(4)}`);
}
const mean = stepTimes.reduce((a, b) => a + b, 0) / Math.max(1, stepTimes.length);
report.timedSteps = stepTimes.length;
report.secondsPerStep = stepTimes.length ? mean : null;
report.tokensPerSecond = stepTimes.length ? (B * S) / mean : null;
report.lastLoss = lastLoss;
report.ops = opFigures;
report.devicePoolPeakBytes = backend!.memoryStats().peakPoolBytes;
report.pagedOptimizer = opt.stats();
report.weightCache = backend!.weightCacheStats();
// device-resident when the stage allocated its activations as device tensors (tensorsOf(backend))
const tensorStats = backend!.tensorStats();
report.deviceResident = tensorStats.allocs > 0;
report.deviceTensors = tensorStats;
// library allocations at their peak: activation pool + resident NF4 weights + optimizer staging slots
// (an upper bound: the pool and weight peaks need not coincide; the CUDA context itself is excluded)
report.peakDeviceBytes = report.devicePoolPeakBytes as number + backend!.weightCacheStats().libraryBytes + opt.stats().deviceBytes;
report.hostRssBytes = process.memoryUsage().rss;
finish(0);

function finish(code: number): never {
  report.totalSeconds = (performance.now() - t0) / 1000;
  const json = JSON.stringify(report, null, 2);
  if (values.out) writeFileSync(values.out, json + '\n');
  console.log(json);
  process.exit(code);
}
