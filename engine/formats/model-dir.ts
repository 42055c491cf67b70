// Opens a HF model directory (full precision or bitsandbytes 4-bit) as config + WeightSource + tokenizer.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { LlamaConfig, WeightSource } from '../types.ts';
import type { NF4Weight } from './nf4.ts';
import { readConfig, configNotes } from './config.ts';
import { numelOf } from './safetensors/header.ts';
import { isFloatDecodable } from './safetensors/convert.ts';
import { openSafetensorsDir } from './safetensors/read.ts';
import type { TensorSource } from './safetensors/read.ts';
import { quantizeNF4, dequantizeNF4 } from './nf4.ts';
import { isBnbQuantized, readBnbNF4 } from './bnb.ts';
import { Tokenizer } from './tokenizer.ts';

export class ModelDirError extends Error {
  override readonly name = 'ModelDirError';
}

export interface ModelDir {
  dir: string;
  config: LlamaConfig;
  weights: WeightSource;
  tokenizer: Tokenizer | null;
  /** true when the linear weights are stored bitsandbytes NF4 */
  prequantized: boolean;
  /** things the engine handles approximately (e.g. Mistral's sliding_window), to show the user */
  notes: string[];
  close(): Promise<void>;
}

/** WeightSource over safetensors: bnb-quantized linears are read as NF4 directly; full-precision ones are
 *  quantized on the fly (blocksize 64). getFloat decodes BF16/F16/F32, or dequantizes an NF4 weight. */
export class SafetensorsWeightSource implements WeightSource {
  readonly config: LlamaConfig;
  readonly tensors: TensorSource;
  readonly source: string;
  readonly blocksize: number;

  constructor(config: LlamaConfig, tensors: TensorSource, source: string, blocksize = 64) {
    this.config = config;
    this.tensors = tensors;
    this.source = source;
    this.blocksize = blocksize;
  }

  has(name: string): boolean { return this.tensors.has(name); }

  async getFloat(name: string): Promise<Float32Array> {
    if (!this.tensors.has(name)) throw new ModelDirError(`${this.source}: no tensor ${name}`);
    if (isBnbQuantized(this.tensors, name)) return dequantizeNF4(await readBnbNF4(this.tensors, name));
    const info = this.tensors.info(name);
    if (!isFloatDecodable(info.dtype) || info.dtype === 'U8') {
      throw new ModelDirError(`${this.source}: tensor ${name} has dtype ${info.dtype}, which is not a full-precision weight`);
    }
    return this.tensors.readFloat32(name);
  }

  async getNF4(name: string): Promise<NF4Weight> {
    if (!this.tensors.has(name)) throw new ModelDirError(`${this.source}: no tensor ${name}`);
    if (isBnbQuantized(this.tensors, name)) return readBnbNF4(this.tensors, name);
    const info = this.tensors.info(name);
    if (info.shape.length !== 2) throw new ModelDirError(`${this.source}: tensor ${name} has shape [${info.shape.join(', ')}]; only 2-D linear weights are quantized`);
    const [rows, cols] = info.shape;
    const data = await this.getFloat(name);
    if (data.length !== numelOf(info.shape)) throw new ModelDirError(`${this.source}: tensor ${name} decoded to ${data.length} values, expected ${rows * cols}`);
    return quantizeNF4(data, rows, cols, this.blocksize);
  }
}

/** Open config.json, the weights (model.safetensors or a sharded index) and the tokenizer (optional). */
export async function openModelDir(dir: string): Promise<ModelDir> {
  if (!existsSync(dir)) throw new ModelDirError(`${dir}: model directory does not exist`);
  if (!existsSync(join(dir, 'config.json'))) throw new ModelDirError(`${dir}: no config.json (is this a Hugging Face model directory?)`);
  const config = await readConfig(dir);
  const tensors = await openSafetensorsDir(dir);
  if (!tensors) {
    const pickles = existsSync(join(dir, 'pytorch_model.bin')) || existsSync(join(dir, 'pytorch_model.bin.index.json'));
    throw new ModelDirError(`${dir}: no model.safetensors or model.safetensors.index.json${pickles ? ' (pytorch_model.bin pickles are never loaded; convert the checkpoint to safetensors)' : ''}`);
  }
  try {
    const embed = 'model.embed_tokens.weight';
    if (!tensors.has(embed)) throw new ModelDirError(`${dir}: weights have no ${embed}; not a Llama-family checkpoint`);
    const shape = tensors.info(embed).shape;
    if (shape.length !== 2 || shape[0] !== config.vocabSize || shape[1] !== config.hiddenSize) {
      throw new ModelDirError(`${dir}: ${embed} has shape [${shape.join(', ')}], config.json says [vocab_size=${config.vocabSize}, hidden_size=${config.hiddenSize}]`);
    }
    const q0 = 'model.layers.0.self_attn.q_proj.weight';
    const prequantized = tensors.has(q0) && isBnbQuantized(tensors, q0);
    const tokenizer = await Tokenizer.fromDir(dir);
    return {
      dir, config, tokenizer, prequantized, notes: configNotes(config),
      weights: new SafetensorsWeightSource(config, tensors, dir),
      close: () => tensors.close(),
    };
  } catch (e) {
    await tensors.close();
    throw e;
  }
}
