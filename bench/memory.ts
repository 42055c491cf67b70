// Memory of a loaded stage: the bytes its NF4 base weights hold per parameter, with and without bitsandbytes double
// quantization, against the theory (4 bits + 8 per 64 weights + 32 per 64·256 weights, or 4 + 32 per 64) and against
// `plan`'s figures (engine/train/plan.ts), plus the process's ArrayBuffer bytes and RSS against plan's estimate.
//
//   node bench/memory.ts [--quick]          # prints one JSON object (bench/run.ts --only memory runs it)
//
// Each configuration loads the whole model as one stage on the native backend in a child process of its own
// (`--child`), so its RSS and ArrayBuffer figures are its own: a full-precision model dir quantized on load with
// bnb_4bit_use_double_quant on and off, and the `swarmtune quantize` output of it (a prequantized bitsandbytes
// checkpoint with double quantization, kept in its stored form).
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { NativeBackend } from '../engine/backends/native.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { isDoubleQuant, nf4ConstantsBytes, type NF4Weight } from '../engine/formats/nf4.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { quantizeModelDir } from '../engine/tasks/quantize.ts';
import { loadStage } from '../engine/model/load.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import { tinyWeights, TINY_TEXT_FILES } from '../engine/tiny/index.ts';
import { stageMemoryBytes } from '../engine/train/plan.ts';
import { LORA_TARGETS } from '../engine/types.ts';
import type { LoraConfig, WeightSource } from '../engine/types.ts';
import { NODE, ROOT, runJsonScript } from './procs.ts';

/** Linears dominate (≈ 93% of the parameters) so the figures are about NF4; vocab small on purpose. */
export const MEMORY_MODEL = { layers: 4, hidden: 1024, heads: 16, kvHeads: 8, headDim: 64, intermediate: 2816, vocab: 1024 };
const QUICK_MODEL = { ...MEMORY_MODEL, layers: 2 };
const LORA: LoraConfig = { r: 16, loraAlpha: 16, loraDropout: 0, targetModules: [...LORA_TARGETS], useRslora: false, initLoraWeights: true };
const round = (x: number, d = 4) => Number(x.toFixed(d));
const MiB = 2 ** 20;

/** A BF16 model dir of the shape (tiny tokenizer, weights from the tiny model's generator). */
async function writeModelDir(dir: string, shape: typeof MEMORY_MODEL): Promise<string> {
  const stamp = path.join(dir, '.memory-model');
  if (existsSync(stamp) && (await readFile(stamp, 'utf8')) === JSON.stringify(shape)) return dir;
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  for (const name of TINY_TEXT_FILES) {
    const text = await readFile(path.join(TINY_DATA_DIR, name), 'utf8');
    if (name !== 'config.json') { await writeFile(path.join(dir, name), text); continue; }
    const cfg = JSON.parse(text) as Record<string, unknown>;
    Object.assign(cfg, {
      hidden_size: shape.hidden, intermediate_size: shape.intermediate, num_hidden_layers: shape.layers, num_attention_heads: shape.heads,
      num_key_value_heads: shape.kvHeads, head_dim: shape.headDim, vocab_size: shape.vocab, torch_dtype: 'bfloat16',
    });
    await writeFile(path.join(dir, name), JSON.stringify(cfg, null, 2));
  }
  const cfg = JSON.parse(await readFile(path.join(dir, 'config.json'), 'utf8'));
  await writeSafetensors(path.join(dir, 'model.safetensors'), tinyWeights(cfg, 11).map((t) => ({ ...t, dtype: 'BF16' as const })), { format: 'pt' });
  await writeFile(stamp, JSON.stringify(shape));
  return dir;
}

function gc(): void {
  const g = (globalThis as { gc?: () => void }).gc;
  if (!g) throw new Error('bench/memory.ts --child needs node --expose-gc');
  for (let i = 0; i < 3; i++) g();
}

/** One configuration, in this (child) process: load the whole model as a stage, then measure. */
async function child(modelDir: string, doubleQuant: boolean): Promise<Record<string, unknown>> {
  gc();
  const before = process.memoryUsage();
  const md = await openModelDir(modelDir, { doubleQuant });
  const held: NF4Weight[] = [];
  const src: WeightSource = {
    config: md.config, has: (n) => md.weights.has(n), getFloat: (n) => md.weights.getFloat(n),
    getNF4: async (n) => { const w = await md.weights.getNF4(n); held.push(w); return w; },
  };
  const backend = new NativeBackend({ threads: 1 });
  const cfg = md.config;
  const stage = await loadStage(src, backend, { layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: LORA });
  await md.close();
  gc();
  const after = process.memoryUsage();
  // what the stage's NF4 weights hold: packed codes, constants (a map shared between weights counted once)
  let params = 0, packed = 0, constants = 0;
  const maps = new Set<Float32Array>();
  for (const w of held) {
    params += w.rows * w.cols;
    packed += w.packed.byteLength;
    if (isDoubleQuant(w.absmax)) {
      if (!maps.has(w.absmax.code)) constants += w.absmax.code.byteLength;
      maps.add(w.absmax.code);
      constants += nf4ConstantsBytes(w) - w.absmax.code.byteLength;
    } else constants += nf4ConstantsBytes(w);
  }
  const dq = held.every((w) => isDoubleQuant(w.absmax));
  if (!dq && held.some((w) => isDoubleQuant(w.absmax))) throw new Error('mixed NF4 forms in one stage');
  const bs = held[0]!.blocksize;
  const theory = dq ? 4 + 8 / bs + 32 / (bs * 256) : 4 + 32 / bs;
  // plan's estimate of what a loaded stage holds (no activations yet): embeddings and lm_head of a BF16 checkpoint
  // stay bf16 (engine/model/vocab-matrix.ts), norms and LoRA weights are float32 (plan counts them so)
  const plan = stageMemoryBytes(cfg, { layerStart: 0, layerEnd: cfg.numHiddenLayers, lora: LORA, microBatch: 1, seqLen: 1, optim: 'adamw_torch', doubleQuant: dq, floatBytes: 2 });
  const planHeld = plan.nf4WeightsBytes + plan.quantConstantsBytes + plan.embeddingsBytes + plan.lmHeadBytes + plan.normsBytes + plan.loraWeightsBytes;
  // the device layout (stc_nf4_resident_bytes), when the CUDA addon is built here (pure arithmetic: no GPU needed)
  let gpuBits: number | null = null;
  try {
    const { loadCudaAddon } = await import('../cuda/native.ts');
    const addon = loadCudaAddon();
    if (addon) {
      let b = 0;
      for (const w of held) b += addon.nf4ResidentBytes(w.rows, w.cols, w.blocksize, isDoubleQuant(w.absmax) ? w.absmax.nestedBlocksize : 0);
      gpuBits = round(8 * b / params);
    }
  } catch { /* no CUDA addon: the figure is left out */ }
  const r = {
    double_quant: dq, prequantized: md.prequantized, linear_params: params, linears: held.length,
    nf4_packed_bytes: packed, nf4_constants_bytes: constants,
    bits_per_param: round(8 * (packed + constants) / params), theory_bits_per_param: round(theory),
    constants_bits_per_param: round(8 * constants / params), theory_constants_bits_per_param: round(theory - 4),
    gpu_resident_bits_per_param: gpuBits,
    plan_nf4_bytes: plan.nf4WeightsBytes + plan.quantConstantsBytes, plan_over_held_nf4: round((plan.nf4WeightsBytes + plan.quantConstantsBytes) / (packed + constants)),
    plan_loaded_stage_mib: round(planHeld / MiB, 1),
    array_buffers_mib: round((after.arrayBuffers - before.arrayBuffers) / MiB, 1),
    rss_mib: round((after.rss - before.rss) / MiB, 1),
    baseline_rss_mib: round(before.rss / MiB, 1),
    peak_rss_mib: round(process.resourceUsage().maxRSS / 1024, 1),
    rss_over_plan: round((after.rss - before.rss) / planHeld, 3),
    array_buffers_over_plan: round((after.arrayBuffers - before.arrayBuffers) / planHeld, 3),
  };
  stage.dispose();
  backend.dispose();
  return r;
}

export async function benchMemory(opts: { quick?: boolean; log?: (s: string) => void } = {}): Promise<Record<string, unknown>> {
  const shape = opts.quick ? QUICK_MODEL : MEMORY_MODEL;
  const log = opts.log ?? (() => {});
  const base = path.join(os.tmpdir(), 'swarmtune-bench-fixtures', `memory-${shape.layers}`);
  log(`memory: model dir ${base} (BF16, ${shape.layers} layers, hidden ${shape.hidden})`);
  const full = await writeModelDir(path.join(base, 'bf16'), shape);
  const pre = path.join(base, 'nf4-dq');
  if (!existsSync(path.join(pre, 'config.json'))) {
    log('memory: swarmtune quantize (double quant) of it');
    await quantizeModelDir(full, pre, { doubleQuant: true });
  }
  const runs: Record<string, unknown>[] = [];
  for (const [label, dir, dq] of [['full precision, quantized on load, double quant', full, true], ['full precision, quantized on load, no double quant', full, false],
    ['prequantized bitsandbytes checkpoint (double quant)', pre, true]] as const) {
    log(`memory: ${label}`);
    const r = await runJsonScript(NODE, ['--expose-gc', path.join(ROOT, 'bench', 'memory.ts'), '--child', `--model=${dir}`, `--dq=${dq ? 1 : 0}`], `bench/memory.ts --child (${label})`);
    runs.push({ config: label, ...r });
  }
  const on = runs[0]!, off = runs[1]!;
  return {
    shape, lora_r: LORA.r, runs,
    saved_bits_per_param: round(Number(off.bits_per_param) - Number(on.bits_per_param)),
    paper_saving_bits_per_param: round(32 / 64 - 8 / 64 - 32 / (64 * 256)),
  };
}

if (import.meta.main) {
  const arg = (k: string) => process.argv.find((a) => a.startsWith(`--${k}=`))?.slice(k.length + 3);
  if (process.argv.includes('--child')) console.log(JSON.stringify(await child(arg('model')!, arg('dq') === '1')));
  else console.log(JSON.stringify(await benchMemory({ quick: process.argv.includes('--quick'), log: (s) => process.stderr.write(`[bench] ${s}\n`) }), null, 2));
}
