// generation_config.json → the decoding defaults of `generate`, read as transformers' GenerationConfig reads
// them (its defaults where a key is absent); what this engine does not apply is named in notes, never dropped silently.
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';

export class GenerationConfigError extends Error {
  override readonly name = 'GenerationConfigError';
}

export interface GenerationDefaults {
  /** false: greedy (argmax); true: sample with temperature, top_k, top_p */
  doSample: boolean;
  temperature: number;
  /** 0 = off (transformers' default is 50) */
  topK: number;
  topP: number;
  /** 1 = off; HF's RepetitionPenaltyLogitsProcessor otherwise */
  repetitionPenalty: number;
  /** stop tokens from the file (null when it names none) */
  eosTokenIds: number[] | null;
  /** null when the file does not set max_new_tokens */
  maxNewTokens: number | null;
  /** keys that change decoding but are not applied here, one line each */
  notes: string[];
}

/** transformers' GenerationConfig defaults for the keys generate applies */
export const HF_GENERATION_DEFAULTS: Readonly<Omit<GenerationDefaults, 'notes'>> = {
  doSample: false, temperature: 1, topK: 50, topP: 1, repetitionPenalty: 1, eosTokenIds: null, maxNewTokens: null,
};

/** keys that would change the output, with the value that leaves it unchanged */
const NOT_APPLIED: Record<string, unknown> = {
  num_beams: 1, min_p: null, typical_p: 1, epsilon_cutoff: 0, eta_cutoff: 0, no_repeat_ngram_size: 0,
  bad_words_ids: null, min_new_tokens: null, min_length: 0, length_penalty: 1, diversity_penalty: 0,
};

/** Parse a generation_config.json object; `source` prefixes every error. */
export function parseGenerationConfig(json: unknown, source = 'generation_config.json'): GenerationDefaults {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new GenerationConfigError(`${source}: must be a JSON object`);
  const raw = json as Record<string, unknown>;
  const bad = (key: string, want: string): never => {
    throw new GenerationConfigError(`${source}: "${key}" must be ${want}, got ${JSON.stringify(raw[key])}`);
  };
  const d = HF_GENERATION_DEFAULTS;
  const numberKey = (key: string, fallback: number, ok: (n: number) => boolean, want: string): number => {
    const v = raw[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !ok(v)) bad(key, want);
    return v as number;
  };
  const doSample = raw.do_sample ?? d.doSample;
  if (typeof doSample !== 'boolean') bad('do_sample', 'true or false');
  const temperature = numberKey('temperature', d.temperature, (n) => Number.isFinite(n) && n > 0, 'a number > 0');
  const topK = numberKey('top_k', d.topK, (n) => Number.isInteger(n) && n >= 0, 'a non-negative integer');
  const topP = numberKey('top_p', d.topP, (n) => n > 0 && n <= 1, 'in (0, 1]');
  const repetitionPenalty = numberKey('repetition_penalty', d.repetitionPenalty, (n) => Number.isFinite(n) && n > 0, 'a number > 0');
  const maxNew = raw.max_new_tokens;
  let maxNewTokens: number | null = null;
  if (maxNew !== undefined && maxNew !== null) {
    if (typeof maxNew !== 'number' || !Number.isInteger(maxNew) || maxNew < 0) bad('max_new_tokens', 'a non-negative integer');
    maxNewTokens = maxNew as number;
  }
  let eosTokenIds: number[] | null = null;
  const eos = raw.eos_token_id;
  if (eos !== undefined && eos !== null) {
    const list = Array.isArray(eos) ? eos : [eos];
    if (!list.every((x) => Number.isSafeInteger(x) && (x as number) >= 0)) bad('eos_token_id', 'a token id or a list of token ids');
    eosTokenIds = list as number[];
  }
  const notes: string[] = [];
  for (const [key, neutral] of Object.entries(NOT_APPLIED)) {
    const v = raw[key];
    if (v !== undefined && v !== null && v !== neutral) notes.push(`${source}: "${key}": ${JSON.stringify(v)} is not applied (generate decodes one sequence token by token)`);
  }
  return { doSample: doSample as boolean, temperature, topK, topP, repetitionPenalty, eosTokenIds, maxNewTokens, notes };
}

/** <dir>/generation_config.json parsed, or transformers' defaults when the dir has none. */
export async function readGenerationConfig(dir: string): Promise<GenerationDefaults> {
  const path = join(dir, 'generation_config.json');
  if (!existsSync(path)) return { ...HF_GENERATION_DEFAULTS, notes: [] };
  let json: unknown;
  try {
    json = JSON.parse(await readFile(path, 'utf8'));
  } catch (e) {
    throw new GenerationConfigError(`${path}: not valid JSON (${(e as Error).message})`);
  }
  return parseGenerationConfig(json, path);
}
