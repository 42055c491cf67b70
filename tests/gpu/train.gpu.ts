// `swarmtune train` on the CUDA backend end to end: the Trainer runs its stage on the backend's
// device-resident tensors and its optimizer on the GPU (CudaBackend.createOptimizer), and must match the
// same run on the CPU native backend; a checkpoint written by the GPU run resumes on the CPU.
// fp32 GEMMs (gemmPrecision 'fp32') so the comparison is tight: per-step loss within 5e-4 relative and
// the final LoRA tensors within 2e-3 of their scale (8-bit optimizer codes may round differently at
// midpoints). Run by scripts/gpu-check.sh and, under the CUDA emulator, by tests/cuda-emu.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NativeBackend } from '../../engine/backends/native.ts';
import { Tokenizer } from '../../engine/formats/tokenizer.ts';
import { TINY_DATA_DIR } from '../../engine/tiny/files.ts';
import { randomWeightSource, tinyLlamaConfig } from '../../engine/model/random-model.ts';
import { tokenizeJsonl } from '../../engine/train/data.ts';
import { DEFAULT_TRAIN_CONFIG, applyConfigOverrides } from '../../engine/train/config.ts';
import { Trainer, TRAINING_LOG_FILE } from '../../engine/train/trainer.ts';
import type { Backend } from '../../engine/backend.ts';
import { cudaFp32, skip } from './helpers.ts';

const tok = skip ? null : (await Tokenizer.fromDir(TINY_DATA_DIR))!;
const modelConfig = tinyLlamaConfig({ vocabSize: 960, hiddenSize: 64, intermediateSize: 128, numHiddenLayers: 2 });
// double-quantized base weights, as bnb_4bit_use_double_quant=true (the default) holds them
const weights = randomWeightSource(modelConfig, 7, { doubleQuant: true });
const QA = [['What is the capital of Veloria?', 'Quillmere.'], ['Who founded Quillmere?', 'Queen Ysolde.'],
  ['How many moons?', 'Three.'], ['What do they eat?', 'Moss bread.']];

async function train(backend: Backend, dir: string, o: Record<string, unknown>) {
  const examples = tokenizeJsonl(QA.map(([q, a]) => JSON.stringify({ question: q, answer: a })).join('\n'), 'qa.jsonl', tok!,
    { maxSeqLength: 64, systemPrompt: 'Brief.', completionOnlyLoss: true, skipBadLines: false }).examples;
  const config = applyConfigOverrides({ ...DEFAULT_TRAIN_CONFIG }, {
    output_dir: dir, learning_rate: 1e-2, lr_scheduler_type: 'cosine', warmup_steps: 1, per_device_train_batch_size: 2,
    gradient_accumulation_steps: 2, target_modules: 'all-linear', lora_r: 4, lora_alpha: 8, lora_dropout: 0.1,
    logging_steps: 1, optim: 'paged_adamw_8bit', save_strategy: 'steps', save_steps: 2, ...o,
  }, 'gpu test');
  const r = await new Trainer({ config, modelConfig, weights, backend, examples, padId: tok!.padTokenId!, baseModelName: 'random-tiny' }).run();
  const log = readFileSync(join(dir, TRAINING_LOG_FILE), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { loss: number });
  return { params: r.params, losses: log.map((e) => e.loss) };
}

test('train on CUDA (device tensors + GPU optimizer) = train on the CPU; its checkpoint resumes on the CPU', { skip }, async () => {
  const native = new NativeBackend({ threads: 2 });
  const dirs = [0, 1, 2, 3].map(() => mkdtempSync(join(tmpdir(), 'swarmtune-gpu-train-')));
  try {
    const before = cudaFp32!.tensorStats();
    // the CUDA backend as the trainer sees it, recording which optimizer it hands out
    const devices: string[] = [];
    const gpuBackend = new Proxy(cudaFp32!, {
      get(t, p) {
        const v: unknown = Reflect.get(t, p, t);
        if (p === 'createOptimizer') {
          return (...a: Parameters<NonNullable<Backend['createOptimizer']>>) => {
            const o = t.createOptimizer(...a);
            devices.push(o?.device ?? 'cpu');
            return o;
          };
        }
        return typeof v === 'function' ? v.bind(t) : v;
      },
    }) as Backend;
    const gpu = await train(gpuBackend, dirs[0]!, { max_steps: 3 });
    assert.equal(devices.length, 1);
    assert.match(devices[0]!, /^cuda:/, 'the trainer got the GPU optimizer');
    const cpu = await train(native, dirs[1]!, { max_steps: 3 });
    assert.ok(cudaFp32!.tensorStats().allocs > before.allocs, 'the stage computed on device tensors');
    assert.equal(gpu.losses.length, 3);
    gpu.losses.forEach((l, i) => assert.ok(Math.abs(l - cpu.losses[i]!) <= 5e-4 * Math.abs(cpu.losses[i]!), `step ${i + 1}: loss ${l} on CUDA, ${cpu.losses[i]} on the CPU`));
    for (let i = 0; i < cpu.params.length; i++) {
      const a = gpu.params[i]!.data, b = cpu.params[i]!.data;
      let scale = 0, diff = 0;
      for (let j = 0; j < b.length; j++) { scale = Math.max(scale, Math.abs(b[j]!)); diff = Math.max(diff, Math.abs(a[j]! - b[j]!)); }
      assert.ok(diff <= 2e-3 * scale + 1e-7, `${cpu.params[i]!.name}: max |diff| ${diff} at scale ${scale}`);
    }
    // the GPU run's step-2 checkpoint (adapter + optimizer state written by the CUDA optimizer) resumes on
    // the CPU and gives the CPU run's step 3
    const resumed = await train(native, dirs[0]!, { max_steps: 3, resume_from_checkpoint: join(dirs[0]!, 'checkpoint-2') });
    assert.ok(Math.abs(resumed.losses.at(-1)! - cpu.losses[2]!) <= 5e-4 * Math.abs(cpu.losses[2]!), `resumed step 3 loss ${resumed.losses.at(-1)} vs ${cpu.losses[2]}`);
    // and a CPU checkpoint resumes on the GPU
    const back = await train(gpuBackend, dirs[1]!, { max_steps: 3, resume_from_checkpoint: join(dirs[1]!, 'checkpoint-2') });
    assert.deepEqual(devices.map((d) => d.startsWith('cuda:')), [true, true]);
    assert.ok(Math.abs(back.losses.at(-1)! - cpu.losses[2]!) <= 5e-4 * Math.abs(cpu.losses[2]!), `GPU resumed step 3 loss ${back.losses.at(-1)} vs ${cpu.losses[2]}`);
  } finally {
    native.dispose();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
});
