// The generate task: text generation from a model (+ optional PEFT adapter) with a KV cache.
import { openForInference, backendForDevice } from '../model/inference.ts';
import { generate } from '../model/generate.ts';
import type { Backend } from '../backend.ts';
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

/** The defaults transformers' generate() takes from a model dir's generation_config.json: sampling only
 *  when do_sample is true (then temperature and top_p, HF's defaults 1.0), max_new_tokens, and eos ids. */
export interface GenerationDefaults { temperature: number; topP: number; maxNewTokens: number | null; eos: number[] }

export function readGenerationConfig(modelDir: string): GenerationDefaults {
  const file = join(modelDir, 'generation_config.json');
  const none: GenerationDefaults = { temperature: 0, topP: 1, maxNewTokens: null, eos: [] };
  if (!existsSync(file)) return none;
  let g: Record<string, unknown>;
  try {
    g = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`${file}: not valid JSON (${(e as Error).message})`);
  }
  const num = (k: string, d: number): number => {
    const v = g[k];
    if (v === undefined || v === null) return d;
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`${file}: ${k} must be a number, got ${JSON.stringify(v)}`);
    return v;
  };
  const sample = g.do_sample === true;
  const eosRaw = g.eos_token_id;
  const eos = typeof eosRaw === 'number' ? [eosRaw] : Array.isArray(eosRaw) ? eosRaw.filter((x): x is number => Number.isInteger(x)) : [];
  const maxNew = g.max_new_tokens;
  return {
    temperature: sample ? num('temperature', 1) : 0,
    topP: sample ? num('top_p', 1) : 1,
    maxNewTokens: typeof maxNew === 'number' && Number.isInteger(maxNew) && maxNew >= 0 ? maxNew : null,
    eos,
  };
}

export interface GenerateTextOptions {
  model: string;
  adapter?: string;
  prompt: string;
  /** render the prompt as a user message through the tokenizer's chat template (+ generation prompt) */
  chat?: boolean;
  system?: string;
  maxNewTokens?: number;
  temperature?: number;
  topP?: number;
  seed?: number;
  device?: string;
  backend?: Backend;
  /** called with the text of each new token as it is produced */
  onText?: (text: string) => void;
}

export interface GenerateTextResult {
  text: string;
  promptIds: number[];
  ids: number[];
}

function eosIds(configEos: number | number[] | null, tokEos: number | null): number[] {
  const s = new Set<number>();
  if (typeof configEos === 'number') s.add(configEos);
  else if (Array.isArray(configEos)) for (const e of configEos) s.add(e);
  if (tokEos !== null) s.add(tokEos);
  return [...s];
}

export async function generateText(opts: GenerateTextOptions): Promise<GenerateTextResult> {
  const backend = opts.backend ?? await backendForDevice(opts.device ?? 'auto');
  const model = await openForInference(opts.model, opts.adapter, backend);
  try {
    const tok = model.tokenizer;
    if (!tok) throw new Error(`${opts.model}: no tokenizer.json; generate needs the tokenizer`);
    let promptIds: number[];
    if (opts.chat) {
      const messages = [...(opts.system ? [{ role: 'system', content: opts.system }] : []), { role: 'user', content: opts.prompt }];
      // the rendered template already carries its special tokens (bos etc.), as HF's apply_chat_template(tokenize=True)
      promptIds = tok.encode(tok.applyChatTemplate(messages, { addGenerationPrompt: true }), { addSpecialTokens: false });
    } else {
      promptIds = tok.encode(opts.prompt, { addSpecialTokens: true });
    }
    if (promptIds.length === 0) throw new Error('generate: the prompt encodes to no tokens');
    // flags override generation_config.json, which overrides the library defaults (greedy, 128 tokens)
    const gen = readGenerationConfig(opts.model);
    const maxNew = opts.maxNewTokens ?? gen.maxNewTokens ?? 128;
    const eos = [...new Set([...eosIds(model.config.eosTokenId, tok.eosTokenId), ...gen.eos])];
    const ids: number[] = [];
    let emitted = '';
    // an answer that is only EOS (or --max-new-tokens 0) is the empty answer, not an error of the decoder
    const decodeText = (xs: readonly number[]): string => {
      const kept = xs.filter((i) => !eos.includes(i));
      return kept.length === 0 ? '' : tok.decode(kept, true);
    };
    const out = await generate(model.stage, promptIds, {
      maxNewTokens: maxNew, temperature: opts.temperature ?? gen.temperature, topP: opts.topP ?? gen.topP, seed: opts.seed ?? 0,
      eosTokenIds: eos,
      onToken: (id) => {
        ids.push(id);
        if (!opts.onText) return;
        // decode the whole continuation each time: byte-level BPE tokens may split a UTF-8 character
        const text = decodeText(ids);
        if (text.startsWith(emitted) && !text.endsWith('\uFFFD')) {
          opts.onText(text.slice(emitted.length));
          emitted = text;
        }
      },
    });
    const text = decodeText(out);
    if (opts.onText && text.length > emitted.length && text.startsWith(emitted)) opts.onText(text.slice(emitted.length));
    return { text, promptIds, ids: out };
  } finally {
    await model.close();
    if (!opts.backend) backend.dispose();
  }
}
