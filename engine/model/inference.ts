// Opening a model dir (+ optional PEFT adapter) as one whole-model stage for eval and generate, and picking a backend.
import type { Backend } from '../backend.ts';
import type { LoraConfig, NamedTensor, Stage } from '../types.ts';
import type { Decodable } from './decode.ts';
import { loadStage } from './load.ts';
import { loadAdapterInto } from './adapter.ts';
import { openModelDir } from '../formats/model-dir.ts';
import { readAdapter } from '../formats/peft.ts';
import type { Tokenizer } from '../formats/tokenizer.ts';

/** --device values: auto/cpu = native C++ backend, ref = float64 reference (slow), cuda[:N] */
export async function backendForDevice(device: string): Promise<Backend> {
  let kind: string;
  if (device === 'auto' || device === 'cpu' || device === 'ref') kind = device;
  else if (/^cuda(:\d+)?$/.test(device)) kind = device; // cuda:N selects GPU N
  else throw new RangeError(`--device must be auto, cpu, ref or cuda[:N], got "${device}"`);
  // loaded lazily so `--device ref` never needs the native addon
  const mod = await import(new URL('../backends/index.ts', import.meta.url).href) as { createBackend(kind: string): Promise<Backend> };
  return mod.createBackend(kind);
}

/** LoRA config for running a base model without an adapter: no targets, so no params. */
export const NO_LORA: LoraConfig = { r: 1, loraAlpha: 1, loraDropout: 0, targetModules: [], useRslora: false, initLoraWeights: true };

export interface InferenceModel {
  /** eval runs its forward, generate decodes through it */
  stage: Stage & Decodable;
  tokenizer: Tokenizer | null;
  config: Stage['config'];
  close(): Promise<void>;
}

/** Open a HF / bitsandbytes model dir (and optionally a PEFT adapter dir) as one whole-model stage. */
export async function openForInference(modelDir: string, adapterDir: string | undefined, backend: Backend): Promise<InferenceModel> {
  const md = await openModelDir(modelDir);
  try {
    let lora = NO_LORA;
    let tensors: NamedTensor[] = [];
    if (adapterDir) {
      const a = await readAdapter(adapterDir, { config: md.config });
      lora = { ...a.lora, loraDropout: 0 };
      tensors = a.tensors;
    }
    const stage = await loadStage(md.weights, backend, { layerStart: 0, layerEnd: md.config.numHiddenLayers, lora });
    if (adapterDir) loadAdapterInto(stage, tensors, adapterDir);
    return {
      stage, tokenizer: md.tokenizer, config: md.config,
      async close() { stage.dispose(); await md.close(); },
    };
  } catch (e) {
    await md.close();
    throw e;
  }
}
