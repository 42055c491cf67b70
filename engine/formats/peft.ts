// PEFT LoRA adapter directories: adapter_config.json (as PEFT writes it) + adapter_model.safetensors (F32, PEFT key names).
import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { LlamaConfig, LoraConfig, LoraTarget, NamedTensor } from '../types.ts';
import { ALL_TARGETS, LORA_TARGETS } from '../types.ts';
import { linearShape, loraParamName, moduleGroup, moduleRank } from '../model/lora.ts';
import { pyJsonDumps } from './pyjson.ts';
import { numelOf } from './safetensors/header.ts';
import { SafetensorsFile } from './safetensors/read.ts';
import { writeSafetensors } from './safetensors/write.ts';

export class AdapterError extends Error {
  override readonly name = 'AdapterError';
}

export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';

const KEY_RE = new RegExp(`^base_model\\.model\\.model\\.layers\\.(\\d+)\\.(self_attn|mlp)\\.(${ALL_TARGETS.join('|')})\\.lora_(A|B)\\.weight$`);

/** Parse a PEFT LoRA key (engine/model/lora.ts loraParamName writes them); null when it is not one. */
export function parseLoraKey(name: string): { layer: number; module: LoraTarget; which: 'A' | 'B' } | null {
  const m = KEY_RE.exec(name);
  if (!m || moduleGroup(m[3] as LoraTarget) !== m[2]) return null;
  return { layer: Number(m[1]), module: m[3] as LoraTarget, which: m[4] as 'A' | 'B' };
}

/** adapter_config.json text exactly as PEFT's save_pretrained writes it (sorted keys, indent 2). */
export function adapterConfigJson(lora: LoraConfig, baseModel: string): string {
  const targets = [...new Set(lora.targetModules)].sort();
  const cfg = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: baseModel,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: lora.initLoraWeights,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: lora.loraAlpha,
    lora_dropout: lora.loraDropout,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: lora.r,
    rank_pattern: {},
    revision: null,
    target_modules: targets,
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: lora.useRslora,
  };
  return pyJsonDumps(cfg, { indent: 2, sortKeys: true, floatKeys: new Set(['lora_dropout']) });
}

/** Validate and convert a parsed adapter_config.json into LoraConfig (+ base model), rejecting features
 *  this engine does not implement rather than silently training something else. */
export function parseAdapterConfig(json: unknown, source = ADAPTER_CONFIG_FILE): { lora: LoraConfig; baseModel: string | null } {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new AdapterError(`${source}: must be a JSON object`);
  const c = json as Record<string, unknown>;
  const bad = (key: string, want: string): never => { throw new AdapterError(`${source}: "${key}" ${want}, got ${JSON.stringify(c[key])}`); };
  if (c.peft_type !== 'LORA') bad('peft_type', 'must be "LORA"');
  if (c.task_type !== undefined && c.task_type !== null && c.task_type !== 'CAUSAL_LM') bad('task_type', 'must be "CAUSAL_LM"');
  const r = c.r ?? 8;
  if (typeof r !== 'number' || !Number.isSafeInteger(r) || r <= 0) bad('r', 'must be a positive integer');
  const loraAlpha = c.lora_alpha ?? 8;
  if (typeof loraAlpha !== 'number' || !Number.isFinite(loraAlpha) || loraAlpha <= 0) bad('lora_alpha', 'must be a positive number');
  const loraDropout = c.lora_dropout ?? 0;
  if (typeof loraDropout !== 'number' || !(loraDropout >= 0 && loraDropout < 1)) bad('lora_dropout', 'must be in [0, 1)');
  const useRslora = c.use_rslora ?? false;
  if (typeof useRslora !== 'boolean') bad('use_rslora', 'must be true or false');
  let targets: LoraTarget[];
  const tm = c.target_modules;
  if (tm === 'all-linear') targets = [...LORA_TARGETS];
  else if (Array.isArray(tm) && tm.length > 0) {
    for (const t of tm) {
      if (!(ALL_TARGETS as readonly string[]).includes(t as string)) {
        throw new AdapterError(`${source}: "target_modules" entry ${JSON.stringify(t)} is not one of ${ALL_TARGETS.join(', ')}`);
      }
    }
    targets = ALL_TARGETS.filter((t) => (tm as string[]).includes(t));
  } else {
    bad('target_modules', 'must be a non-empty list of module names (regex strings are not supported)');
  }
  // features whose presence would change the math: refuse them instead of ignoring them
  if ((c.bias ?? 'none') !== 'none') bad('bias', 'must be "none"');
  if (c.use_dora === true) bad('use_dora', 'is not supported (must be false)');
  if (c.fan_in_fan_out === true) bad('fan_in_fan_out', 'is not supported (must be false)');
  if (c.lora_bias === true) bad('lora_bias', 'is not supported (must be false)');
  for (const k of ['rank_pattern', 'alpha_pattern']) {
    const v = c[k];
    if (v !== undefined && v !== null && (typeof v !== 'object' || Object.keys(v).length > 0)) bad(k, 'must be empty (per-module ranks are not supported)');
  }
  for (const k of ['layers_to_transform', 'modules_to_save', 'layer_replication']) {
    if (c[k] !== undefined && c[k] !== null) bad(k, 'must be null (not supported)');
  }
  const baseModel = typeof c.base_model_name_or_path === 'string' ? c.base_model_name_or_path : null;
  return {
    lora: { r: r as number, loraAlpha: loraAlpha as number, loraDropout: loraDropout as number, targetModules: targets!, useRslora: useRslora as boolean,
      initLoraWeights: c.init_lora_weights === 'gaussian' ? 'gaussian' : true },
    baseModel,
  };
}

/** Check names, shapes ([r, in] / [out, r]), data lengths and A/B pairing; returns tensors in Stage order
 *  (layer, module in moduleRank order, A then B). */
export function validateAdapterTensors(tensors: readonly NamedTensor[], lora: LoraConfig, source: string, config?: LlamaConfig): NamedTensor[] {
  const byKey = new Map<string, { t: NamedTensor; layer: number; module: LoraTarget; which: 'A' | 'B' }>();
  for (const t of tensors) {
    const k = parseLoraKey(t.name);
    if (!k) throw new AdapterError(`${source}: tensor ${JSON.stringify(t.name)} is not a PEFT LoRA key (base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_<A|B>.weight)`);
    if (!lora.targetModules.includes(k.module)) throw new AdapterError(`${source}: tensor ${t.name} targets ${k.module}, which is not in target_modules [${lora.targetModules.join(', ')}]`);
    if (byKey.has(t.name)) throw new AdapterError(`${source}: duplicate tensor ${t.name}`);
    if (t.shape.length !== 2) throw new AdapterError(`${source}: tensor ${t.name} must be 2-D, got shape [${t.shape.join(', ')}]`);
    if (t.data.length !== numelOf(t.shape)) throw new AdapterError(`${source}: tensor ${t.name} has ${t.data.length} values for shape [${t.shape.join(', ')}]`);
    const rDim = k.which === 'A' ? t.shape[0] : t.shape[1];
    if (rDim !== lora.r) throw new AdapterError(`${source}: tensor ${t.name} has shape [${t.shape.join(', ')}], expected ${k.which === 'A' ? `[r=${lora.r}, in]` : `[out, r=${lora.r}]`}`);
    if (config) {
      if (k.layer >= config.numHiddenLayers) throw new AdapterError(`${source}: tensor ${t.name} names layer ${k.layer}, but the model has ${config.numHiddenLayers}`);
      const [out, inp] = linearShape(config, k.module);
      const want = k.which === 'A' ? [lora.r, inp] : [out, lora.r];
      if (t.shape[0] !== want[0] || t.shape[1] !== want[1]) throw new AdapterError(`${source}: tensor ${t.name} has shape [${t.shape.join(', ')}], expected [${want.join(', ')}]`);
    }
    byKey.set(t.name, { t, ...k });
  }
  for (const v of byKey.values()) {
    const other = loraParamName(v.layer, v.module, v.which === 'A' ? 'B' : 'A');
    const o = byKey.get(other);
    if (!o) throw new AdapterError(`${source}: ${v.t.name} has no matching ${other}`);
  }
  const order = moduleRank;
  return [...byKey.values()]
    .sort((a, b) => a.layer - b.layer || order(a.module) - order(b.module) || (a.which < b.which ? -1 : a.which > b.which ? 1 : 0))
    .map((v) => v.t);
}

/** Write a PEFT adapter dir: adapter_config.json and adapter_model.safetensors (F32, metadata {"format":"pt"}). */
export async function writeAdapter(dir: string, a: { lora: LoraConfig; baseModel: string; tensors: NamedTensor[] }): Promise<void> {
  const tensors = validateAdapterTensors(a.tensors, a.lora, dir);
  await mkdir(dir, { recursive: true });
  await writeSafetensors(join(dir, ADAPTER_WEIGHTS_FILE), tensors.map((t) => ({ name: t.name, dtype: 'F32', shape: [...t.shape], data: t.data })), { format: 'pt' });
  await writeFile(join(dir, ADAPTER_CONFIG_FILE), adapterConfigJson(a.lora, a.baseModel));
}

/** Read a PEFT adapter dir; tensors come back float32 in Stage order. With `config`, in/out sizes are checked too. */
export async function readAdapter(dir: string, opts: { config?: LlamaConfig } = {}): Promise<{ lora: LoraConfig; tensors: NamedTensor[]; baseModel: string | null }> {
  const cfgPath = join(dir, ADAPTER_CONFIG_FILE);
  let text: string;
  try {
    text = await readFile(cfgPath, 'utf8');
  } catch {
    throw new AdapterError(`${dir}: no ${ADAPTER_CONFIG_FILE} (is this a PEFT adapter directory?)`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new AdapterError(`${cfgPath}: invalid JSON: ${(e as Error).message}`);
  }
  const { lora, baseModel } = parseAdapterConfig(json, cfgPath);
  const wPath = join(dir, ADAPTER_WEIGHTS_FILE);
  if (!existsSync(wPath)) {
    const bin = existsSync(join(dir, 'adapter_model.bin'));
    throw new AdapterError(`${dir}: no ${ADAPTER_WEIGHTS_FILE}${bin ? ' (adapter_model.bin is a pickle and is never loaded; convert it to safetensors)' : ''}`);
  }
  const f = await SafetensorsFile.open(wPath);
  try {
    const tensors: NamedTensor[] = [];
    for (const name of f.names()) {
      const info = f.info(name);
      if (info.dtype !== 'F32' && info.dtype !== 'BF16' && info.dtype !== 'F16') throw new AdapterError(`${wPath}: tensor ${name} has dtype ${info.dtype}, expected F32 (or F16/BF16)`);
      tensors.push({ name, shape: [...info.shape], data: await f.readFloat32(name) });
    }
    if (tensors.length === 0) throw new AdapterError(`${wPath}: no tensors`);
    return { lora, tensors: validateAdapterTensors(tensors, lora, wPath, opts.config), baseModel };
  } finally {
    await f.close();
  }
}
