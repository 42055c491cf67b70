// The embedded tiny Llama model: deterministic random weights + the committed tokenizer/config, materialized on demand.
//
// `ensureTinyModel()` writes a complete HF-style model dir (config.json, model.safetensors, tokenizer files)
// into a cache dir keyed by a hash of everything that determines its bytes, so every process on every
// machine gets an identical model without shipping weights in the package.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { knobs } from '../env.ts';
import { Rng } from '../model/rng.ts';
import { writeSafetensors, type TensorData } from '../formats/safetensors/write.ts';
import { TINY_DATA_DIR, TINY_DATASET_PATH, TINY_SYSTEM_PROMPT, TINY_CHAT_TEMPLATE } from './files.ts';

export { TINY_DATASET_PATH, TINY_SYSTEM_PROMPT, TINY_CHAT_TEMPLATE };

/** Seed of the tiny model's weights. Changing it (or the generator) changes the cache key. */
export const TINY_SEED = 20241;
/** Bump when the weight generator changes in a way the inputs of the hash would not reveal. */
const GENERATOR_VERSION = 1;
/** Files copied verbatim from engine/tiny/data into the model dir. */
export const TINY_TEXT_FILES = ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json'] as const;
/** Written last in a model dir: its content (the model hash) marks the dir complete and current. */
const STAMP_FILE = '.swarmtune-tiny';

interface TinyConfigJson {
  hidden_size: number; intermediate_size: number; num_hidden_layers: number; num_attention_heads: number;
  num_key_value_heads: number; head_dim: number; vocab_size: number; initializer_range: number;
}

function readTextFiles(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of TINY_TEXT_FILES) out[name] = readFileSync(join(TINY_DATA_DIR, name), 'utf8');
  return out;
}

/** sha256 (first 16 hex digits) of what determines the model dir's bytes. */
export function tinyModelHash(): string {
  const h = createHash('sha256');
  h.update(`swarmtune-tiny v${GENERATOR_VERSION} seed ${TINY_SEED}\n`);
  for (const [name, text] of Object.entries(readTextFiles())) h.update(`${name}\n${text}\n`);
  return h.digest('hex').slice(0, 16);
}

/** FNV-1a of a tensor name: gives each tensor its own PRNG stream, so adding or reordering tensors
 *  never changes the others' values. */
function nameSeed(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** The weights of the tiny model, in HF names and shapes ([out, in] for linears), float32.
 *  Init as transformers' LlamaPreTrainedModel: N(0, initializer_range) for embeddings and linears, ones for
 *  RMSNorms — except lm_head, drawn with std 1/sqrt(hidden). Why: only LoRA trains, so the head stays frozen;
 *  with std 0.02 its logits can never exceed |w|·|h| ≈ 0.02·hidden ≈ 2.6, which floors the loss near 3.9 nats
 *  and makes fine-tuning look like it learned nothing. std 1/sqrt(hidden) allows confident predictions. */
export function tinyWeights(config: TinyConfigJson, seed = TINY_SEED): TensorData[] {
  const C = config.hidden_size;
  const I = config.intermediate_size;
  const V = config.vocab_size;
  const D = config.head_dim;
  const qOut = config.num_attention_heads * D;
  const kvOut = config.num_key_value_heads * D;
  const std = config.initializer_range;
  const tensors: TensorData[] = [];
  const normal = (name: string, shape: number[], s: number) => {
    const data = new Rng(seed, nameSeed(name)).fillNormal(new Float32Array(shape[0] * shape[1]), 0, s);
    tensors.push({ name, dtype: 'F32', shape, data });
  };
  const ones = (name: string, n: number) => tensors.push({ name, dtype: 'F32', shape: [n], data: new Float32Array(n).fill(1) });

  normal('model.embed_tokens.weight', [V, C], std);
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    ones(`${p}.input_layernorm.weight`, C);
    normal(`${p}.self_attn.q_proj.weight`, [qOut, C], std);
    normal(`${p}.self_attn.k_proj.weight`, [kvOut, C], std);
    normal(`${p}.self_attn.v_proj.weight`, [kvOut, C], std);
    normal(`${p}.self_attn.o_proj.weight`, [C, qOut], std);
    ones(`${p}.post_attention_layernorm.weight`, C);
    normal(`${p}.mlp.gate_proj.weight`, [I, C], std);
    normal(`${p}.mlp.up_proj.weight`, [I, C], std);
    normal(`${p}.mlp.down_proj.weight`, [C, I], std);
  }
  ones('model.norm.weight', C);
  normal('lm_head.weight', [V, C], 1 / Math.sqrt(C));
  return tensors;
}

/** Default location: $SWARMTUNE_CACHE_DIR, else $XDG_CACHE_HOME/swarmtune, else ~/.cache/swarmtune
 *  (os.tmpdir()/swarmtune-cache when there is no home). */
export function defaultTinyModelDir(): string {
  const { cacheDir, xdgCacheHome: xdg } = knobs();
  let root = cacheDir;
  if (!root) {
    let home = '';
    try { home = homedir(); } catch { /* no home dir (sandboxed user) */ }
    root = xdg ? join(xdg, 'swarmtune') : home ? join(home, '.cache', 'swarmtune') : join(tmpdir(), 'swarmtune-cache');
  }
  return join(root, `tiny-${tinyModelHash()}`);
}

async function isCurrent(dir: string, hash: string): Promise<boolean> {
  try {
    return (await readFile(join(dir, STAMP_FILE), 'utf8')).trim() === hash;
  } catch {
    return false;
  }
}

/** Write the tiny model dir if it is missing or stale and return its path. Safe to call from several
 *  processes at once: every file is written under a unique temp name and renamed into place, and the
 *  stamp file that marks the dir complete is renamed last. */
export async function ensureTinyModel(dir?: string): Promise<string> {
  const hash = tinyModelHash();
  let target = dir ?? defaultTinyModelDir();
  if (await isCurrent(target, hash)) return target;
  try {
    await mkdir(target, { recursive: true });
  } catch (e) {
    // an unusable default cache (read-only home, a file in the way) should not stop a demo: use the temp dir
    if (dir !== undefined) {
      throw new Error(`ensureTinyModel: cannot create ${target}: ${(e as Error).message}`, { cause: e });
    }
    target = join(tmpdir(), 'swarmtune-cache', `tiny-${hash}`);
    if (await isCurrent(target, hash)) return target;
    await mkdir(target, { recursive: true });
  }
  const tmpSuffix = `.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  const place = async (name: string, write: (path: string) => Promise<void>) => {
    const tmp = join(target, name + tmpSuffix);
    try {
      await write(tmp);
      await rename(tmp, join(target, name));
    } catch (e) {
      await rm(tmp, { force: true });
      throw new Error(`ensureTinyModel: writing ${join(target, name)} failed: ${(e as Error).message}`, { cause: e });
    }
  };
  const texts = readTextFiles();
  for (const [name, text] of Object.entries(texts)) await place(name, (p) => writeFile(p, text));
  const config = JSON.parse(texts['config.json']) as TinyConfigJson;
  await place('model.safetensors', (p) => writeSafetensors(p, tinyWeights(config), { format: 'pt' }));
  await place(STAMP_FILE, (p) => writeFile(p, hash + '\n'));
  return target;
}

/** True when `dir` holds the current tiny model (for tests and the demo's messages). */
export function isTinyModelDir(dir: string): boolean {
  const stamp = join(dir, STAMP_FILE);
  return existsSync(stamp) && readFileSync(stamp, 'utf8').trim() === tinyModelHash();
}
