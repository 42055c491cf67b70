// The generate task: text generation from a model (+ optional PEFT adapter) with a KV cache. The decoding
// defaults come from the model's generation_config.json as transformers reads it; options override them.
import { openForInference, backendForDevice } from '../model/inference.ts';
import { generate } from '../model/generate.ts';
import { readGenerationConfig } from '../formats/generation-config.ts';
import type { Backend } from '../backend.ts';

export interface GenerateTextOptions {
  model: string;
  adapter?: string;
  prompt: string;
  /** render the prompt as a user message through the tokenizer's chat template (+ generation prompt) */
  chat?: boolean;
  system?: string;
  /** default: generation_config.json's max_new_tokens, else 128 */
  maxNewTokens?: number;
  /** sample (true) or greedy (false); default: generation_config.json's do_sample (transformers: false). A
   *  temperature given without doSample decides it: > 0 samples, 0 is greedy. */
  doSample?: boolean;
  temperature?: number;
  topP?: number;
  /** 0 = off */
  topK?: number;
  repetitionPenalty?: number;
  seed?: number;
  device?: string;
  backend?: Backend;
  /** called with the text of each new token as it is produced */
  onText?: (text: string) => void;
  /** generation_config.json keys that are not applied, one line each (default: dropped) */
  onNote?: (line: string) => void;
}

/** The decoding settings a run used, after generation_config.json and the options. */
export interface GenerationSettings {
  doSample: boolean;
  temperature: number;
  topK: number;
  topP: number;
  repetitionPenalty: number;
  maxNewTokens: number;
  eosTokenIds: number[];
}

export interface GenerateTextResult {
  text: string;
  promptIds: number[];
  ids: number[];
  settings: GenerationSettings;
}

const DEFAULT_MAX_NEW_TOKENS = 128;

function eosIds(configEos: number | number[] | null, tokEos: number | null): number[] {
  const s = new Set<number>();
  if (typeof configEos === 'number') s.add(configEos);
  else if (Array.isArray(configEos)) for (const e of configEos) s.add(e);
  if (tokEos !== null) s.add(tokEos);
  return [...s];
}

export async function generateText(opts: GenerateTextOptions): Promise<GenerateTextResult> {
  // read (and check) generation_config.json before anything heavy is loaded
  const gc = await readGenerationConfig(opts.model);
  for (const n of gc.notes) opts.onNote?.(n);
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
    const doSample = opts.doSample ?? (opts.temperature !== undefined ? opts.temperature > 0 : gc.doSample);
    const settings: GenerationSettings = {
      doSample,
      temperature: opts.temperature ?? gc.temperature,
      topK: opts.topK ?? gc.topK,
      topP: opts.topP ?? gc.topP,
      repetitionPenalty: opts.repetitionPenalty ?? gc.repetitionPenalty,
      maxNewTokens: opts.maxNewTokens ?? gc.maxNewTokens ?? DEFAULT_MAX_NEW_TOKENS,
      // transformers stops on generation_config's eos list; without one, on config.json's and the tokenizer's eos
      eosTokenIds: gc.eosTokenIds ?? eosIds(model.config.eosTokenId, tok.eosTokenId),
    };
    const eos = settings.eosTokenIds;
    const ids: number[] = [];
    let emitted = '';
    const out = await generate(model.stage, promptIds, {
      maxNewTokens: settings.maxNewTokens, temperature: doSample ? settings.temperature : 0, topP: settings.topP,
      topK: settings.topK, repetitionPenalty: settings.repetitionPenalty, seed: opts.seed ?? 0, eosTokenIds: eos,
      onToken: (id) => {
        ids.push(id);
        if (!opts.onText) return;
        // decode the whole continuation each time: byte-level BPE tokens may split a UTF-8 character
        const text = tok.decode(ids.filter((i) => !eos.includes(i)), true);
        if (text.startsWith(emitted) && !text.endsWith('\uFFFD')) {
          if (text.length > emitted.length) opts.onText(text.slice(emitted.length));
          emitted = text;
        }
      },
    });
    // an empty answer (eos first, or max_new_tokens 0) is a normal answer: the text is ''
    const text = tok.decode(out.filter((i) => !eos.includes(i)), true);
    if (opts.onText && text.length > emitted.length && text.startsWith(emitted)) opts.onText(text.slice(emitted.length));
    return { text, promptIds, ids: out, settings };
  } finally {
    await model.close();
    if (!opts.backend) backend.dispose();
  }
}
