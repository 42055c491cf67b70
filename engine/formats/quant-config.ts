// Which quantized checkpoints swarmtune refuses, and the one line that says so: config.json's quantization_config,
// the standalone quantize_config.json / quant_config.json GPTQ and AWQ tools write, and tensors whose names or
// dtypes belong to a quantization format (LLM.int8 SCB, GPTQ/AWQ qweight, FP8 scales, FP4 quant states).
// Supported: full-precision weights (BF16/F16/F32/F64) and bitsandbytes 4-bit NF4 with uint8 storage.
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

/** A checkpoint in a quantized form the engine cannot read; the message is one line naming the form, the file
 *  or tensor, and what to do. */
export class UnsupportedQuantizationError extends Error {
  override readonly name = 'UnsupportedQuantizationError';
}

const CAN_LOAD = 'swarmtune loads only full-precision (BF16/F16/F32) or bitsandbytes NF4 checkpoints';
/** transformers implements dequantize() for its bitsandbytes quantizers */
const DEQUANTIZE_BNB = 'dequantize it first (transformers: from_pretrained, then model.dequantize(), then save_pretrained) or use the bf16/fp16 original';
/** GPTQ/AWQ: no transformers dequantize; the codes are an approximation of the original, so start from that */
const USE_ORIGINAL = 'use the bf16/fp16 model it was quantized from (or dequantize it to bf16 with the tool that made it and save_pretrained)';
const DEQUANTIZE = 'dequantize it to bf16 first (transformers: from_pretrained, then model.dequantize() where the method has one, then save_pretrained) or use the bf16/fp16 original';

interface Form { label: string; advice: string }

/** transformers' QuantizationMethod values (quant_method) and what to call them. */
const FORMS: Record<string, Form> = {
  gptq: { label: 'GPTQ', advice: USE_ORIGINAL },
  awq: { label: 'AWQ', advice: USE_ORIGINAL },
  fp8: { label: 'FP8', advice: DEQUANTIZE },
  fbgemm_fp8: { label: 'FBGEMM FP8', advice: DEQUANTIZE },
  'compressed-tensors': { label: 'compressed-tensors (llm-compressor)', advice: DEQUANTIZE },
  hqq: { label: 'HQQ', advice: DEQUANTIZE },
  eetq: { label: 'EETQ int8', advice: DEQUANTIZE },
  torchao: { label: 'torchao', advice: DEQUANTIZE },
  quanto: { label: 'Quanto', advice: DEQUANTIZE },
  aqlm: { label: 'AQLM', advice: USE_ORIGINAL },
  vptq: { label: 'VPTQ', advice: USE_ORIGINAL },
  higgs: { label: 'HIGGS', advice: DEQUANTIZE },
  spqr: { label: 'SpQR', advice: USE_ORIGINAL },
  bitnet: { label: 'BitNet', advice: USE_ORIGINAL },
  quark: { label: 'AMD Quark', advice: DEQUANTIZE },
  'auto-round': { label: 'AutoRound', advice: USE_ORIGINAL },
  mxfp4: { label: 'MXFP4', advice: DEQUANTIZE },
  fp_quant: { label: 'FP-Quant', advice: DEQUANTIZE },
};

function refusal(where: string, what: string, form: Form): UnsupportedQuantizationError {
  return new UnsupportedQuantizationError(`${where}: ${what} is ${form.label}; ${CAN_LOAD} — ${form.advice}`);
}

/** Refuse a config.json "quantization_config" that is anything but bitsandbytes 4-bit NF4 (uint8 storage).
 *  `source` is the file it came from. Absent or null: full precision, nothing to check. */
export function checkQuantizationConfig(qc: unknown, source: string): void {
  if (qc === undefined || qc === null) return;
  if (typeof qc !== 'object' || Array.isArray(qc)) {
    throw new UnsupportedQuantizationError(`${source}: "quantization_config" must be an object, got ${JSON.stringify(qc)}; ${CAN_LOAD}`);
  }
  const q = qc as Record<string, unknown>;
  const flag = (k: string): boolean => q[k] === true || q[`_${k}`] === true;
  // configs written before transformers added quant_method carry only the load_in_* flags
  const method = typeof q.quant_method === 'string' ? q.quant_method.toLowerCase()
    : (q.load_in_4bit !== undefined || q.load_in_8bit !== undefined ? 'bitsandbytes' : undefined);
  if (method === undefined) {
    throw new UnsupportedQuantizationError(`${source}: "quantization_config" has no quant_method (${JSON.stringify(Object.keys(q))}); ${CAN_LOAD}`);
  }
  if (method !== 'bitsandbytes') {
    const known = FORMS[method];
    const bits = typeof q.bits === 'number' ? ` ${q.bits}-bit` : '';
    const form = known ? { ...known, label: `${known.label}${bits} (quant_method "${method}")` } : { label: `quant_method "${method}"`, advice: DEQUANTIZE };
    throw refusal(source, 'quantization_config', form);
  }
  if (flag('load_in_8bit')) throw refusal(source, 'quantization_config', { label: 'bitsandbytes 8-bit (LLM.int8, load_in_8bit)', advice: DEQUANTIZE_BNB });
  if (!flag('load_in_4bit')) {
    throw new UnsupportedQuantizationError(`${source}: bitsandbytes "quantization_config" has neither load_in_4bit nor load_in_8bit set; ${CAN_LOAD}`);
  }
  // BitsAndBytesConfig's default quant type is fp4, so a config without the key is FP4
  const quantType = q.bnb_4bit_quant_type ?? 'fp4';
  if (quantType !== 'nf4') {
    throw refusal(source, 'quantization_config', { label: `bitsandbytes 4-bit ${JSON.stringify(quantType)} (bnb_4bit_quant_type; only "nf4" is supported)`, advice: DEQUANTIZE_BNB });
  }
  const storage = q.bnb_4bit_quant_storage ?? 'uint8';
  if (storage !== 'uint8') {
    throw refusal(source, 'quantization_config', {
      label: `bitsandbytes NF4 packed into ${JSON.stringify(storage)} tensors (bnb_4bit_quant_storage; only "uint8" is supported)`,
      advice: 'save it again with bnb_4bit_quant_storage="uint8", or dequantize it (model.dequantize(), save_pretrained)',
    });
  }
}

/** Standalone quantization files next to config.json: AutoGPTQ/GPTQModel's quantize_config.json and older
 *  AutoAWQ's quant_config.json. Their presence alone means the weights are GPTQ/AWQ codes. */
export async function checkQuantConfigFiles(dir: string): Promise<void> {
  for (const [file, fallback] of [['quantize_config.json', 'gptq'], ['quant_config.json', 'awq']] as const) {
    const path = join(dir, file);
    if (!existsSync(path)) continue;
    let method: string = fallback, bits = '';
    try {
      const j = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
      if (typeof j.quant_method === 'string') method = j.quant_method.toLowerCase();
      const b = j.bits ?? j.w_bit;
      if (typeof b === 'number') bits = ` ${b}-bit`;
    } catch { /* unreadable: its name alone says what wrote it */ }
    const known = FORMS[method] ?? { label: `quant_method "${method}"`, advice: DEQUANTIZE };
    throw refusal(path, 'this checkpoint', { label: `${known.label}${bits} (${file} is present)`, advice: known.advice });
  }
}

/** Tensor-name suffixes that only quantized formats write, and their form. */
const TENSOR_FORMS: ReadonlyArray<[RegExp, Form]> = [
  [/\.(SCB|weight_format)$/, { label: 'bitsandbytes 8-bit (LLM.int8: int8 weight + SCB row scales)', advice: DEQUANTIZE_BNB }],
  [/\.weight\.quant_state\.bitsandbytes__fp4$/, { label: 'bitsandbytes 4-bit FP4 (only NF4 is supported)', advice: DEQUANTIZE_BNB }],
  [/\.(qweight|qzeros|scales|g_idx)$/, { label: 'GPTQ/AWQ (int32-packed qweight/qzeros with scales)', advice: USE_ORIGINAL }],
  [/\.weight_scale_inv$/, { label: 'FP8 (F8_E4M3 weight with block weight_scale_inv)', advice: DEQUANTIZE }],
  [/\.(weight_scale|input_scale|weight_zero_point|weight_global_scale)$/, { label: 'FP8/int8 compressed-tensors (weight with weight_scale)', advice: DEQUANTIZE }],
  [/\.(weight_packed|weight_shape)$/, { label: 'compressed-tensors pack-quantized (int4 codes in int32)', advice: USE_ORIGINAL }],
];

/** Refuse a tensor whose name belongs to a quantization format (called for every checkpoint tensor). */
export function checkQuantizedTensorName(name: string, source: string): void {
  for (const [re, form] of TENSOR_FORMS) if (re.test(name)) throw refusal(source, `tensor ${name}`, { ...form, label: `of the ${form.label} format` });
}

const FLOAT_WEIGHT_DTYPES = new Set(['BF16', 'F16', 'F32', 'F64']);

/** Refuse a tensor the model reads as a float weight (embeddings, norms, biases, lm_head, a linear that is
 *  not bnb-quantized) when its dtype holds codes rather than values. */
export function checkFloatWeightDtype(name: string, dtype: string, source: string): void {
  if (FLOAT_WEIGHT_DTYPES.has(dtype)) return;
  const what = dtype === 'I8' ? 'int8 codes (an LLM.int8 / int8 checkpoint?)'
    : dtype === 'U8' ? 'uint8 codes (a quantized weight without its quantization state?)'
      : dtype.startsWith('F8_') ? 'FP8 values, which mean nothing without their scale tensors (an FP8 checkpoint?)'
        : dtype === 'I32' ? 'int32 words (packed 4-bit codes of a GPTQ/AWQ checkpoint?)'
          : 'not a floating-point weight';
  throw new UnsupportedQuantizationError(`${source}: tensor ${name} has dtype ${dtype}: ${what}; ${CAN_LOAD} — ${DEQUANTIZE}`);
}
