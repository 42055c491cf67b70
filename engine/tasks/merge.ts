// The merge task: fold a PEFT LoRA adapter into its base model — W' = dequant(NF4(W)) + scaling·B·A — and
// write a plain HF model dir (safetensors + config + tokenizer files) that eval/generate and transformers load.
//
// Why merge into the NF4-dequantized base and not the original float weights: QLoRA trained the adapter
// against the quantized base, so base+adapter outputs are reproduced exactly only by that weight.
import { copyFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Backend } from '../backend.ts';
import { createBackend } from '../backends/registry.ts';
import type { BackendKind } from '../backends/registry.ts';
import type { LlamaConfig, LoraTarget, NamedTensor, WeightSource } from '../types.ts';
import { openModelDir } from '../formats/model-dir.ts';
import { readAdapter } from '../formats/peft.ts';
import { ShardedSafetensorsWriter } from '../formats/safetensors/write.ts';
import { encodeFromFloat32 } from '../formats/safetensors/convert.ts';
import type { TensorSpec } from '../formats/safetensors/write.ts';
import { writeConfig } from '../formats/config.ts';
import { baseModuleName, loraParamName, loraScaling } from '../model/lora.ts';
import { linearShape } from '../model/lora.ts';
import { layerFloatName, layerFloatTensors, linearModules } from '../model/arch.ts';

export class MergeError extends Error {
  override readonly name = 'MergeError';
}

export const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model', 'generation_config.json'] as const;

export interface MergeOptions {
  model: string;
  adapter: string;
  out: string;
  dtype?: 'bf16' | 'f32';
  device?: string;
  /** injected backend (tests); otherwise from device */
  backend?: Backend;
  /** largest safetensors shard (default 5 GB, as transformers) */
  maxShardBytes?: number;
  onProgress?: (done: number, total: number, name: string) => void;
}

/** The tensors of a merged Llama, in HF names with their shapes; linears are [out, in]. */
export function mergedTensorSpecs(cfg: LlamaConfig, src: WeightSource, dtype: 'BF16' | 'F32'): TensorSpec[] {
  const C = cfg.hiddenSize, V = cfg.vocabSize;
  const specs: TensorSpec[] = [{ name: 'model.embed_tokens.weight', dtype, shape: [V, C] }];
  for (let l = 0; l < cfg.numHiddenLayers; l++) {
    for (const n of layerFloatTensors(cfg)) specs.push({ name: layerFloatName(l, n), dtype, shape: [n.length] });
    for (const t of linearModules(cfg)) {
      const [out, inF] = linearShape(cfg, t);
      const base = baseModuleName(l, t);
      specs.push({ name: `${base}.weight`, dtype, shape: [out, inF] });
      if (src.has(`${base}.bias`)) specs.push({ name: `${base}.bias`, dtype, shape: [out] });
    }
  }
  specs.push({ name: 'model.norm.weight', dtype, shape: [C] });
  if (!cfg.tieWordEmbeddings) specs.push({ name: 'lm_head.weight', dtype, shape: [V, C] });
  return specs;
}

const LINEAR_RE = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+_proj)\.weight$/;

/** Merge and write; returns the written file names. */
export async function mergeAdapter(o: MergeOptions): Promise<string[]> {
  const dtype = o.dtype ?? 'bf16';
  if (dtype !== 'bf16' && dtype !== 'f32') throw new MergeError(`--dtype must be bf16 or f32, got ${dtype as string}`);
  if (resolve(o.out) === resolve(o.model)) throw new MergeError(`--out ${o.out} is the base model dir; write the merged model somewhere else`);
  const md = await openModelDir(o.model);
  const backend = o.backend ?? await createBackend((o.device ?? 'auto') as BackendKind);
  try {
    const cfg = md.config;
    const adapter = await readAdapter(o.adapter, { config: cfg });
    const scaling = loraScaling(adapter.lora);
    const byName = new Map<string, NamedTensor>(adapter.tensors.map((t) => [t.name, t]));
    const r = adapter.lora.r;
    const stDtype = dtype === 'bf16' ? 'BF16' : 'F32';
    const specs = mergedTensorSpecs(cfg, md.weights, stDtype);
    const w = await ShardedSafetensorsWriter.create(o.out, specs, { metadata: { format: 'pt' }, maxShardBytes: o.maxShardBytes });
    let used = 0;
    try {
      for (let i = 0; i < specs.length; i++) {
        const s = specs[i];
        const m = LINEAR_RE.exec(s.name);
        let data: Float32Array;
        if (m) {
          const layer = Number(m[1]), module = m[2] as LoraTarget;
          const W = await md.weights.getNF4(s.name);
          data = new Float32Array(W.rows * W.cols);
          await backend.dequantNF4(W, data);
          const A = byName.get(loraParamName(layer, module, 'A'));
          const B = byName.get(loraParamName(layer, module, 'B'));
          if ((A === undefined) !== (B === undefined)) throw new MergeError(`${o.adapter}: ${s.name} has only one of lora_A / lora_B`);
          if (A && B) {
            // W[out, in] += scaling · B[out, r] · A[r, in]
            await backend.gemm(false, false, W.rows, W.cols, r, scaling, B.data, A.data, 1, data);
            used += 2;
          }
        } else {
          data = await md.weights.getFloat(s.name);
        }
        await w.write(s.name, stDtype === 'F32' ? data : encodeFromFloat32(stDtype, data));
        o.onProgress?.(i + 1, specs.length, s.name);
      }
    } catch (e) {
      // the writer complains about unwritten tensors on close; the first error is the one to report
      await w.close().catch(() => undefined);
      throw e;
    }
    await w.close();
    if (used !== adapter.tensors.length) {
      throw new MergeError(`${o.adapter}: ${adapter.tensors.length - used} adapter tensors matched no linear of ${o.model}`);
    }
    const raw: Record<string, unknown> = { ...cfg.raw, torch_dtype: dtype === 'bf16' ? 'bfloat16' : 'float32' };
    delete raw.quantization_config;
    await writeConfig(o.out, raw);
    const files = [...w.fileNames, 'config.json'];
    for (const f of TOKENIZER_FILES) {
      if (existsSync(join(o.model, f))) {
        await copyFile(join(o.model, f), join(o.out, f));
        files.push(f);
      }
    }
    return files;
  } finally {
    if (!o.backend) backend.dispose();
    await md.close();
  }
}
