// bitsandbytes 4-bit (NF4) checkpoint tensors: reading Linear4bit state dicts from safetensors and writing them.
import type { NF4Weight } from './nf4.ts';
import type { Dtype } from './safetensors/header.ts';
import { numelOf } from './safetensors/header.ts';
import type { TensorSource } from './safetensors/read.ts';
import { NF4_CODE, checkBlocksize, checkNestedBlocksize, decodeAbsmax, doubleQuantize, internDoubleQuant, isDoubleQuant } from './nf4.ts';
import { pyFloatRepr, pyJsonString } from './pyjson.ts';

export class BnbFormatError extends Error {
  override readonly name = 'BnbFormatError';
}

export const QUANT_STATE_SUFFIX = '.quant_state.bitsandbytes__nf4';
const QUANT_STATE_ANY = /\.quant_state\.bitsandbytes__(nf4|fp4)$/;
/** QuantState.from_dict's valid_qs_keys (the component suffixes after "<module>.weight."). */
const VALID_QS_KEYS = new Set(['absmax', 'quant_map', 'nested_absmax', 'nested_quant_map', 'quant_state', 'quant_type',
  'blocksize', 'dtype', 'shape', 'nested_blocksize', 'nested_dtype', 'nested_offset']);

/** The linear weights bitsandbytes quantizes in a Llama-family model (every nn.Linear but lm_head). */
export function isQuantizableLinear(name: string, shape: readonly number[]): boolean {
  return shape.length === 2 && /^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$/.test(name);
}

/** True when `name` (".weight") is stored bnb-quantized in the source. */
export function isBnbQuantized(src: TensorSource, name: string): boolean {
  return src.has(name + QUANT_STATE_SUFFIX) || src.has(name + '.quant_state.bitsandbytes__fp4');
}

/** Is this tensor name one of the auxiliary parts of a quantized weight (absmax, quant_map, quant_state...)? */
export function isBnbAuxiliary(name: string): boolean {
  return QUANT_STATE_ANY.test(name) || /\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map)$/.test(name);
}

/** torch dtype name as bnb writes it (str(dtype).strip("torch.")) for a safetensors dtype. */
export function torchDtypeName(dtype: Dtype): string {
  switch (dtype) {
    case 'BF16': return 'bfloat16';
    case 'F16': return 'float16';
    case 'F32': return 'float32';
    default: throw new BnbFormatError(`weights of dtype ${dtype} cannot be the source of a bnb 4-bit layer (expected BF16, F16 or F32)`);
  }
}

export interface QuantStateDict {
  quant_type: string;
  blocksize: number;
  dtype: string;
  shape: number[];
  nested_blocksize?: number;
  nested_dtype?: string;
  nested_offset?: number;
}

/** json.dumps of the packed QuantState dict, key order and separators exactly as bitsandbytes. */
export function quantStateJson(qs: QuantStateDict): string {
  const parts = [
    `"quant_type": ${pyJsonString(qs.quant_type)}`,
    `"blocksize": ${qs.blocksize}`,
    `"dtype": ${pyJsonString(qs.dtype)}`,
    `"shape": [${qs.shape.join(', ')}]`,
  ];
  if (qs.nested_offset !== undefined) {
    parts.push(`"nested_blocksize": ${qs.nested_blocksize ?? 256}`, `"nested_dtype": ${pyJsonString(qs.nested_dtype ?? 'float32')}`,
      `"nested_offset": ${pyFloatRepr(qs.nested_offset)}`);
  }
  return `{${parts.join(', ')}}`;
}

export interface BnbWriteOptions {
  /** compress_statistics: 8-bit absmax with a nested float32 absmax per 256 blocks (default true) */
  doubleQuant?: boolean;
  /** torch dtype name of the original weight recorded in the quant state (default "bfloat16") */
  dtype?: string;
}

export interface BnbTensor {
  name: string;
  dtype: Dtype;
  shape: number[];
  data: Uint8Array;
}

const bytesOf = (a: Float32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** The state-dict tensors of one bnb Linear4bit weight `name` ("....q_proj.weight"), as Linear4bit saves them.
 *  A weight held double-quantized is written from its own codes (the bytes bitsandbytes wrote or would write);
 *  float32 absmax is double-quantized here when `doubleQuant` asks for it. */
export function bnbTensors(name: string, W: NF4Weight, opts: BnbWriteOptions = {}): BnbTensor[] {
  const doubleQuant = opts.doubleQuant ?? true;
  const dtype = opts.dtype ?? 'bfloat16';
  const n = W.rows * W.cols;
  const nBlocks = Math.ceil(n / W.blocksize);
  const out: BnbTensor[] = [{ name, dtype: 'U8', shape: [(n + 1) >> 1, 1], data: W.packed }];
  let qs: QuantStateDict;
  if (doubleQuant) {
    const dq = isDoubleQuant(W.absmax) ? W.absmax : doubleQuantize(W.absmax);
    out.push({ name: `${name}.absmax`, dtype: 'U8', shape: [nBlocks], data: dq.codes });
    out.push({ name: `${name}.quant_map`, dtype: 'F32', shape: [16], data: bytesOf(Float32Array.from(NF4_CODE)) });
    out.push({ name: `${name}.nested_absmax`, dtype: 'F32', shape: [dq.nestedAbsmax.length], data: bytesOf(dq.nestedAbsmax) });
    out.push({ name: `${name}.nested_quant_map`, dtype: 'F32', shape: [256], data: bytesOf(dq.code) });
    qs = { quant_type: 'nf4', blocksize: W.blocksize, dtype, shape: [W.rows, W.cols], nested_blocksize: dq.nestedBlocksize, nested_dtype: 'float32', nested_offset: dq.offset };
  } else {
    out.push({ name: `${name}.absmax`, dtype: 'F32', shape: [nBlocks], data: bytesOf(Float32Array.from(decodeAbsmax(W.absmax))) });
    out.push({ name: `${name}.quant_map`, dtype: 'F32', shape: [16], data: bytesOf(Float32Array.from(NF4_CODE)) });
    qs = { quant_type: 'nf4', blocksize: W.blocksize, dtype, shape: [W.rows, W.cols] };
  }
  const json = new TextEncoder().encode(quantStateJson(qs));
  out.push({ name: name + QUANT_STATE_SUFFIX, dtype: 'U8', shape: [json.length], data: json });
  return out;
}

/** Parse and validate a packed quant state (the UTF-8 JSON bytes). */
export function parseQuantState(bytes: Uint8Array, where: string): QuantStateDict {
  let qs: unknown;
  try {
    qs = JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new BnbFormatError(`${where}: quant_state is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof qs !== 'object' || qs === null || Array.isArray(qs)) throw new BnbFormatError(`${where}: quant_state must be a JSON object`);
  const q = qs as Record<string, unknown>;
  for (const k of Object.keys(q)) if (!VALID_QS_KEYS.has(k)) throw new BnbFormatError(`${where}: unexpected quant_state key ${JSON.stringify(k)}`);
  if (q.quant_type !== 'nf4') throw new BnbFormatError(`${where}: quant_type ${JSON.stringify(q.quant_type)} is not supported (NF4 only)`);
  if (typeof q.blocksize !== 'number') throw new BnbFormatError(`${where}: quant_state.blocksize missing`);
  checkBlocksize(q.blocksize, `${where}: quant_state.blocksize`);
  if (!Array.isArray(q.shape) || q.shape.length !== 2 || !q.shape.every((d) => Number.isSafeInteger(d) && d > 0)) {
    throw new BnbFormatError(`${where}: quant_state.shape must be [out_features, in_features], got ${JSON.stringify(q.shape)}`);
  }
  if (typeof q.dtype !== 'string') throw new BnbFormatError(`${where}: quant_state.dtype missing`);
  if (q.nested_offset !== undefined && typeof q.nested_offset !== 'number') throw new BnbFormatError(`${where}: quant_state.nested_offset must be a number`);
  if (q.nested_blocksize !== undefined && (typeof q.nested_blocksize !== 'number' || !Number.isSafeInteger(q.nested_blocksize) || q.nested_blocksize <= 0)) {
    throw new BnbFormatError(`${where}: quant_state.nested_blocksize must be a positive integer`);
  }
  if (q.nested_dtype !== undefined && q.nested_dtype !== 'float32') throw new BnbFormatError(`${where}: nested_dtype ${JSON.stringify(q.nested_dtype)} unsupported (float32 only)`);
  return q as unknown as QuantStateDict;
}

async function readF32(src: TensorSource, name: string, expectShape: number[], where: string): Promise<Float32Array> {
  if (!src.has(name)) throw new BnbFormatError(`${where}: missing tensor ${name}`);
  const info = src.info(name);
  if (info.dtype !== 'F32' || numelOf(info.shape) !== numelOf(expectShape)) {
    throw new BnbFormatError(`${where}: ${name} must be F32 [${expectShape.join(', ')}], got ${info.dtype} [${info.shape.join(', ')}]`);
  }
  return src.readFloat32(name);
}

/** Read a bnb-quantized linear weight `name` as NF4 in the form it was stored: float32 absmax, or double-quantized
 *  (the checkpoint's own 8-bit codes, nested absmax, nested map and offset, kept as they are). */
export async function readBnbNF4(src: TensorSource, name: string): Promise<NF4Weight> {
  const where = `bnb weight ${name}`;
  const qsName = name + QUANT_STATE_SUFFIX;
  if (!src.has(qsName)) {
    if (src.has(name + '.quant_state.bitsandbytes__fp4')) throw new BnbFormatError(`${where}: FP4 checkpoints are not supported (NF4 only)`);
    throw new BnbFormatError(`${where}: missing ${qsName}`);
  }
  const qs = parseQuantState(await src.readRaw(qsName), where);
  const [rows, cols] = qs.shape;
  const n = rows * cols;
  const nBlocks = Math.ceil(n / qs.blocksize);
  const wInfo = src.info(name);
  const nPacked = (n + 1) >> 1;
  if (wInfo.dtype !== 'U8' || numelOf(wInfo.shape) !== nPacked) {
    throw new BnbFormatError(`${where}: packed weight must be U8 [${nPacked}, 1] for shape [${rows}, ${cols}], got ${wInfo.dtype} [${wInfo.shape.join(', ')}]`);
  }
  const packed = await src.readRaw(name);
  const quantMap = await readF32(src, `${name}.quant_map`, [16], where);
  for (let i = 0; i < 16; i++) {
    if (quantMap[i] !== NF4_CODE[i]) throw new BnbFormatError(`${where}: quant_map[${i}] = ${quantMap[i]} differs from the NF4 table (${NF4_CODE[i]})`);
  }
  const absName = `${name}.absmax`;
  if (!src.has(absName)) throw new BnbFormatError(`${where}: missing tensor ${absName}`);
  const aInfo = src.info(absName);
  if (numelOf(aInfo.shape) !== nBlocks) throw new BnbFormatError(`${where}: ${absName} has ${numelOf(aInfo.shape)} entries, expected ceil(${n}/${qs.blocksize}) = ${nBlocks}`);
  let absmax: NF4Weight['absmax'];
  if (qs.nested_offset !== undefined) {
    if (aInfo.dtype !== 'U8') throw new BnbFormatError(`${where}: nested quantization needs U8 ${absName}, got ${aInfo.dtype}`);
    const nestedBlocksize = qs.nested_blocksize ?? 256;
    try {
      checkNestedBlocksize(nestedBlocksize, `${where}: quant_state.nested_blocksize`);
    } catch (e) {
      throw new BnbFormatError((e as Error).message);
    }
    const offset = Math.fround(qs.nested_offset);
    if (!Number.isFinite(offset)) throw new BnbFormatError(`${where}: quant_state.nested_offset ${qs.nested_offset} is not a finite float32 value`);
    const nestedAbsmax = await readF32(src, `${name}.nested_absmax`, [Math.ceil(nBlocks / nestedBlocksize)], where);
    const code = await readF32(src, `${name}.nested_quant_map`, [256], where);
    // bitsandbytes loads nested_offset with torch.tensor(float(...)): a float32 value
    absmax = internDoubleQuant({ codes: await src.readRaw(absName), nestedAbsmax, offset, code, nestedBlocksize });
  } else {
    if (aInfo.dtype !== 'F32') throw new BnbFormatError(`${where}: ${absName} must be F32 without nested quantization, got ${aInfo.dtype}`);
    absmax = await src.readFloat32(absName);
  }
  return { packed, absmax, rows, cols, blocksize: qs.blocksize };
}

/** HF config.json "quantization_config" for a bnb 4-bit checkpoint, as transformers' BitsAndBytesConfig saves it. */
export function bnbQuantizationConfig(opts: { doubleQuant: boolean; computeDtype?: string }): Record<string, unknown> {
  return {
    _load_in_4bit: true,
    _load_in_8bit: false,
    bnb_4bit_compute_dtype: opts.computeDtype ?? 'bfloat16',
    bnb_4bit_quant_storage: 'uint8',
    bnb_4bit_quant_type: 'nf4',
    bnb_4bit_use_double_quant: opts.doubleQuant,
    llm_int8_enable_fp32_cpu_offload: false,
    llm_int8_has_fp16_weight: false,
    llm_int8_skip_modules: null,
    llm_int8_threshold: 6.0,
    load_in_4bit: true,
    load_in_8bit: false,
    quant_method: 'bitsandbytes',
  };
}
