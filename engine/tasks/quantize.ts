// The quantize task: writes a bitsandbytes-format NF4 checkpoint dir from a full-precision HF model dir.
import { copyFile, readdir, mkdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { readConfig, writeConfig } from '../formats/config.ts';
import { openSafetensorsDir } from '../formats/safetensors/read.ts';
import { checkCheckpointTensors } from '../formats/model-dir.ts';
import { SpoolingSafetensorsWriter } from '../formats/safetensors/write.ts';
import { quantizeNF4, checkBlocksize } from '../formats/nf4.ts';
import { bnbTensors, bnbQuantizationConfig, isQuantizableLinear, isBnbQuantized, torchDtypeName } from '../formats/bnb.ts';

/** Files besides config.json and weights that make the output dir usable on its own. */
const COPY_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json',
  'chat_template.jinja', 'tokenizer.model'];

export interface QuantizeOptions {
  doubleQuant?: boolean;
  blocksize?: number;
  maxShardBytes?: number;
  /** called after each tensor (for progress) */
  onTensor?: (name: string, index: number, total: number) => void;
}

export interface QuantizeResult {
  quantized: number;
  copied: number;
  files: string[];
  inputBytes: number;
  outputBytes: number;
}

/** Quantize every linear weight of model.layers.* to NF4 (one tensor in memory at a time) and copy the
 *  rest (embeddings, norms, lm_head, biases) unchanged in their source dtype. */
export async function quantizeModelDir(modelDir: string, outDir: string, opts: QuantizeOptions = {}): Promise<QuantizeResult> {
  const blocksize = opts.blocksize ?? 64;
  checkBlocksize(blocksize, '--blocksize');
  const doubleQuant = opts.doubleQuant ?? true;
  if (resolve(modelDir) === resolve(outDir)) throw new Error(`--out must differ from --model (${modelDir})`);
  // stale weights from an earlier run (e.g. an index next to a new single file) would shadow the new output
  if (existsSync(outDir)) {
    const stale = (await readdir(outDir)).filter((f) => /^model.*\.safetensors(\.index\.json)?$/.test(f));
    if (stale.length) throw new Error(`--out ${outDir} already holds a checkpoint (${stale.join(', ')}); choose a new directory or remove them`);
  }
  const config = await readConfig(modelDir);
  const src = await openSafetensorsDir(modelDir);
  if (!src) throw new Error(`${modelDir}: no model.safetensors or model.safetensors.index.json`);
  // quantized forms other than bitsandbytes NF4, and non-float weights, are refused before --out is made
  checkCheckpointTensors(config, src, modelDir);
  const writer = await SpoolingSafetensorsWriter.create(outDir, {
    metadata: { format: 'pt' },
    maxShardBytes: opts.maxShardBytes,
    // keep a quantized module's parts in one shard
    groupOf: (n) => n.replace(/\.weight\..*$/, '.weight'),
  });
  let quantized = 0, copied = 0, inputBytes = 0, outputBytes = 0;
  try {
    const names = src.names().sort();
    for (let i = 0; i < names.length; i++) {
      const name = names[i];
      const info = src.info(name);
      inputBytes += info.dataOffsets[1] - info.dataOffsets[0];
      if (isBnbQuantized(src, name)) throw new Error(`${modelDir}: ${name} is already bitsandbytes-quantized`);
      if (isQuantizableLinear(name, info.shape)) {
        const [rows, cols] = info.shape;
        const W = quantizeNF4(await src.readFloat32(name), rows, cols, blocksize);
        for (const t of bnbTensors(name, W, { doubleQuant, dtype: torchDtypeName(info.dtype) })) {
          await writer.add(t.name, t.dtype, t.shape, t.data);
          outputBytes += t.data.byteLength;
        }
        quantized++;
      } else {
        const raw = await src.readRaw(name);
        await writer.add(name, info.dtype, info.shape, raw);
        outputBytes += raw.byteLength;
        copied++;
      }
      opts.onTensor?.(name, i, names.length);
    }
    if (quantized === 0) throw new Error(`${modelDir}: found no model.layers.N.{self_attn,mlp}.*_proj.weight linear weights to quantize`);
  } catch (e) {
    await writer.abort();
    await src.close();
    throw e;
  }
  await src.close();
  const files = await writer.finish();
  // transformers >= 4.56 writes "dtype" where older versions wrote "torch_dtype"
  const srcDtype = config.raw.torch_dtype ?? config.raw.dtype;
  const computeDtype = typeof srcDtype === 'string' && srcDtype !== 'float32' ? srcDtype : 'bfloat16';
  await writeConfig(outDir, config, { quantization_config: bnbQuantizationConfig({ doubleQuant, computeDtype }) });
  await mkdir(outDir, { recursive: true });
  const present = new Set(await readdir(modelDir));
  for (const f of COPY_FILES) if (present.has(f)) await copyFile(join(modelDir, f), join(outDir, f));
  return { quantized, copied, files, inputBytes, outputBytes };
}
