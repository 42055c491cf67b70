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
import { isBnbQuantized, isBnbAuxiliary, readBnbNF4 } from './bnb.ts';
import { UnsupportedQuantizationError, checkFloatWeightDtype, checkQuantizedTensorName } from './quant-config.ts';
import { Tokenizer } from './tokenizer.ts';
import { MODEL_CLASS, layerFloatName, layerFloatTensors, linearModules } from '../model/arch.ts';
import { baseModuleName } from '../model/lora.ts';

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
  /** true when getNF4 gives double-quantized absmax: the stored form of a prequantized checkpoint, else the
   *  doubleQuant option (bnb_4bit_use_double_quant) */
  doubleQuant: boolean;
  /** true when the embedding (and an untied lm_head) are stored BF16: every value is bf16-exact, so a stage
   *  holds them as bf16 (engine/model/vocab-matrix.ts), 2 bytes per value, and the planner counts so */
  vocabBf16: boolean;
  /** things the engine handles approximately (e.g. Mistral's sliding_window), to show the user */
  notes: string[];
  /** checkpoint tensors the model never reads (already reported through the warn callback) */
  unusedTensors: string[];
  close(): Promise<void>;
}

/** WeightSource over safetensors: bnb-quantized linears are read as NF4 directly, in the form they were stored
 *  (double-quantized or float32 absmax); full-precision ones are quantized on the fly (blocksize 64) and, with
 *  `doubleQuant` (bnb_4bit_use_double_quant, default true as in the QLoRA recipe), their absmax double-quantized
 *  as bitsandbytes does. getFloat decodes BF16/F16/F32, or dequantizes an NF4 weight. */
export class SafetensorsWeightSource implements WeightSource {
  readonly config: LlamaConfig;
  readonly tensors: TensorSource;
  readonly source: string;
  readonly blocksize: number;
  readonly doubleQuant: boolean;

  constructor(config: LlamaConfig, tensors: TensorSource, source: string, blocksize = 64, doubleQuant = true) {
    this.config = config;
    this.tensors = tensors;
    this.source = source;
    this.blocksize = blocksize;
    this.doubleQuant = doubleQuant;
  }

  has(name: string): boolean { return this.tensors.has(name); }

  async getFloat(name: string): Promise<Float32Array> {
    if (!this.tensors.has(name)) throw new ModelDirError(`${this.source}: no tensor ${name}`);
    if (isBnbQuantized(this.tensors, name)) return dequantizeNF4(await readBnbNF4(this.tensors, name));
    checkFloatWeightDtype(name, this.tensors.info(name).dtype, this.source);
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
    return quantizeNF4(data, rows, cols, this.blocksize, { doubleQuant: this.doubleQuant });
  }
}


/** The checkpoint tensors the engine reads for `config` (transformers' model keys for the Llama family):
 *  every linear's bias is optional, lm_head only when untied. */
function modelTensorNames(config: LlamaConfig): Set<string> {
  const names = new Set(['model.embed_tokens.weight', 'model.norm.weight']);
  if (!config.tieWordEmbeddings) names.add('lm_head.weight');
  for (let l = 0; l < config.numHiddenLayers; l++) {
    for (const n of layerFloatTensors(config)) names.add(layerFloatName(l, n));
    for (const t of linearModules(config)) {
      const m = baseModuleName(l, t);
      names.add(`${m}.weight`);
      names.add(`${m}.bias`);
    }
  }
  return names;
}

/** Check every tensor before anything is read: refuse the names of quantized formats (LLM.int8 SCB, GPTQ/AWQ
 *  qweight, FP8 scales, FP4 quant states) and model weights stored as codes (I8/U8/I32/F8_*); a bnb NF4 linear
 *  must be packed in U8. Returns the tensors the model never reads (transformers' unexpected keys; like it,
 *  the rotary inv_freq buffers old exports carry and a tied lm_head are not reported). */
export function checkCheckpointTensors(config: LlamaConfig, tensors: TensorSource, source: string): string[] {
  const expected = modelTensorNames(config);
  const names = [...tensors.names()].sort(); // sorted: the same tensor is named whatever the files' order
  for (const name of names) checkQuantizedTensorName(name, source);
  const quantized = new Set<string>();
  for (const name of names) {
    if (!expected.has(name)) continue;
    const dtype = tensors.info(name).dtype;
    if (isBnbQuantized(tensors, name)) {
      if (dtype !== 'U8') {
        throw new UnsupportedQuantizationError(`${source}: tensor ${name} is bitsandbytes NF4 packed into ${dtype} (bnb_4bit_quant_storage other than uint8); swarmtune reads NF4 packed in uint8 only — save it again with bnb_4bit_quant_storage="uint8" or dequantize it (model.dequantize(), save_pretrained)`);
      }
      quantized.add(name);
    } else checkFloatWeightDtype(name, dtype, source);
  }
  return names.filter((name) => {
    if (expected.has(name) || /\.rotary_emb\.inv_freq$/.test(name)) return false;
    if (name === 'lm_head.weight' && config.tieWordEmbeddings) return false;
    return !(isBnbAuxiliary(name) && quantized.has(name.replace(/\.weight\..*$/, '.weight')));
  });
}

/** transformers' class name for the warning, as it would print it. */
function modelClassName(config: LlamaConfig): string {
  const a = config.raw.architectures;
  if (Array.isArray(a) && typeof a[0] === 'string') return a[0];
  return MODEL_CLASS[config.modelType] ?? 'the model';
}

const MAX_LISTED = 20;

export interface OpenModelDirOptions {
  /** one-line warnings (unused checkpoint tensors); default: "warning: …" on stderr */
  warn?: (line: string) => void;
  /** bnb_4bit_use_double_quant for linears quantized on load (full-precision checkpoints): default true, as in
   *  the QLoRA recipe; a prequantized checkpoint keeps the form it was stored in */
  doubleQuant?: boolean;
}

/** Open config.json, the weights (model.safetensors or a sharded index) and the tokenizer (optional).
 *  Quantized forms other than bitsandbytes NF4 are refused (UnsupportedQuantizationError) before any weight
 *  is read; tensors the model never reads are reported through `warn` in one line. */
export async function openModelDir(dir: string, opts: OpenModelDirOptions = {}): Promise<ModelDir> {
  if (!existsSync(dir)) throw new ModelDirError(`${dir}: model directory does not exist`);
  if (!existsSync(join(dir, 'config.json'))) throw new ModelDirError(`${dir}: no config.json (is this a Hugging Face model directory?)`);
  const config = await readConfig(dir);
  const tensors = await openSafetensorsDir(dir);
  if (!tensors) {
    const pickles = existsSync(join(dir, 'pytorch_model.bin')) || existsSync(join(dir, 'pytorch_model.bin.index.json'));
    throw new ModelDirError(`${dir}: no model.safetensors or model.safetensors.index.json${pickles ? ' (pytorch_model.bin pickles are never loaded; convert the checkpoint to safetensors)' : ''}`);
  }
  try {
    // a quantized form explains a checkpoint better than any missing or misshapen tensor would
    const unusedTensors = checkCheckpointTensors(config, tensors, dir);
    const embed = 'model.embed_tokens.weight';
    if (!tensors.has(embed)) throw new ModelDirError(`${dir}: weights have no ${embed}; not a Llama-family checkpoint`);
    const shape = tensors.info(embed).shape;
    if (shape.length !== 2 || shape[0] !== config.vocabSize || shape[1] !== config.hiddenSize) {
      throw new ModelDirError(`${dir}: ${embed} has shape [${shape.join(', ')}], config.json says [vocab_size=${config.vocabSize}, hidden_size=${config.hiddenSize}]`);
    }
    if (unusedTensors.length) {
      const listed = unusedTensors.slice(0, MAX_LISTED).map((n) => `'${n}'`).join(', ');
      const more = unusedTensors.length > MAX_LISTED ? `, ... (${unusedTensors.length - MAX_LISTED} more)` : '';
      const warn = opts.warn ?? ((line: string) => { process.stderr.write(`warning: ${line}\n`); });
      warn(`Some weights of the model checkpoint at ${dir} were not used when initializing ${modelClassName(config)}: [${listed}${more}]`);
    }
    const q0 = 'model.layers.0.self_attn.q_proj.weight';
    const prequantized = tensors.has(q0) && isBnbQuantized(tensors, q0);
    const doubleQuant = prequantized ? tensors.has(`${q0}.nested_absmax`) : opts.doubleQuant ?? true;
    const tokenizer = await Tokenizer.fromDir(dir);
    const vocabBf16 = [embed, ...(config.tieWordEmbeddings ? [] : ['lm_head.weight'])].every((n) => tensors.has(n) && tensors.info(n).dtype === 'BF16');
    return {
      dir, config, tokenizer, prequantized, doubleQuant, vocabBf16, notes: configNotes(config), unusedTensors,
      weights: new SafetensorsWeightSource(config, tensors, dir, 64, opts.doubleQuant ?? true),
      close: () => tensors.close(),
    };
  } catch (e) {
    await tensors.close();
    throw e;
  }
}
