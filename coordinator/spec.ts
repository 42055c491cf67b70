// The run spec's bindings to the trainer: its data pipeline (the same micro-batches `swarmtune train`
// sees) and its memory model (what a stage needs on a peer).
import { DataLoader, dataOptionsOf, epochOrder, loadDataset, planSteps } from '../engine/train/data.ts';
import type { MicroBatch } from '../engine/train/step-plan.ts';
import { packExamples } from '../engine/train/packing.ts';
import type { SftTokenizer } from '../engine/train/data.ts';
import { stageMemoryBytes } from '../engine/train/plan.ts';
import type { TrainConfig } from '../engine/train/config.ts';
import type { LlamaConfig, LoraConfig } from '../engine/types.ts';
import type { ModelDir } from '../engine/formats/model-dir.ts';
import type { RunData } from './run.ts';
import type { StageMemoryFn } from './planner.ts';
import { inFlightPerPeer } from './routes.ts';

/** The run's data pipeline and what the organizer is told about it at start. */
export interface RunDataInfo extends RunData {
  examples: number;
  skipped: number;
  truncated: number;
  stepsPerEpoch: number;
  microBatchesPerStep: number;
}

export async function buildRunData(train: TrainConfig, model: ModelDir): Promise<RunDataInfo> {
  if (train.data === null) throw new Error('launch: --data FILE is required');
  if (model.tokenizer === null) throw new Error(`launch: ${model.dir} has no tokenizer.json; the coordinator tokenizes the data`);
  const tok: SftTokenizer = model.tokenizer;
  const ds = loadDataset(train.data, tok, dataOptionsOf(train));
  const padId = tok.padTokenId ?? tok.eosTokenId ?? 0;
  const examples = train.packing ? packExamples(ds.examples, train.max_seq_length) : ds.examples;
  const loader = new DataLoader(examples, {
    batchSize: train.per_device_train_batch_size, accumulation: train.gradient_accumulation_steps,
    seed: train.seed, shuffle: train.shuffle, padId,
  });
  const plan = planSteps(examples.length, train.per_device_train_batch_size, train.gradient_accumulation_steps, train.num_train_epochs, train.max_steps);
  return {
    examples: ds.examples.length, skipped: ds.skipped.length, truncated: ds.truncated,
    stepsPerEpoch: loader.stepsPerEpoch, microBatchesPerStep: train.gradient_accumulation_steps,
    totalSteps: plan.totalSteps,
    microBatchesForStep: async (step) => withSamples(loader, step, train.packing),
    // micro-batches consumed after `step` optimizer steps, counted across epochs
    cursorAfter: (step) => {
      const c = loader.cursorAt(step);
      return c.epoch * loader.microBatchesPerEpoch + c.microBatch;
    },
  };
}

/** Bytes a stage [a, b) needs on a volunteer under this run's settings. The engine keeps embeddings,
  *  the head and activations in float32 on CPU volunteers, hence floatBytes 4 — except an embedding and
  *  lm_head whose values are all bf16-exact (a BF16 checkpoint: `vocabBytes` 2), held as bf16. A peer holds at most
  *  inFlightPerPeer(accumulation) micro-batches in flight (coordinator/routes.ts PeerSlots, however
  *  many routes share it), each holding its checkpointed layer inputs on the stage until its backward. */
export function stageMemoryFn(config: LlamaConfig, train: TrainConfig, lora: LoraConfig, doubleQuant = train.bnb_4bit_use_double_quant, vocabBytes = 4): StageMemoryFn {
  const inFlightMicroBatches = inFlightPerPeer(train.gradient_accumulation_steps);
  return (layerStart, layerEnd, inFlight = inFlightMicroBatches) => stageMemoryBytes(config, {
    inFlightMicroBatches: inFlight, doubleQuant,
    layerStart, layerEnd, lora: { r: lora.r, targetModules: lora.targetModules },
    microBatch: train.per_device_train_batch_size, seqLen: train.max_seq_length, optim: train.optim,
    gradientCheckpointing: train.gradient_checkpointing, floatBytes: 4, vocabBytes,
  }).totalBytes;
}

/** The step's micro-batches with each row's example index (MicroBatch.samples): what a delta wire codec
 *  keys its references by. Packed rows (several examples per row, regrouped every epoch) carry none. */
export function withSamples(loader: DataLoader, step: number, packing: boolean): MicroBatch[] {
  const mbs = loader.stepMicroBatches(step);
  if (packing) return mbs;
  const { epoch, microBatch } = loader.cursorAt(step);
  const order = epochOrder(loader.examples.length, loader.seed, epoch, loader.shuffle);
  return mbs.map((m, k) => {
    const start = (microBatch + k) * loader.batchSize;
    return { ...m, samples: Array.from(order.subarray(start, start + m.batch)) };
  });
}
