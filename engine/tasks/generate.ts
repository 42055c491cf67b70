// The generate task: text generation from a model (+ optional PEFT adapter) with a KV cache.
import { openForInference, backendForDevice } from '../model/inference.ts';
import { generate } from '../model/generate.ts';
import type { Backend } from '../backend.ts';

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
    const maxNew = opts.maxNewTokens ?? 128;
    const eos = eosIds(model.config.eosTokenId, tok.eosTokenId);
    const ids: number[] = [];
    let emitted = '';
    // an answer that is only EOS (or --max-new-tokens 0) is the empty answer, not an error of the decoder
    const decodeText = (xs: readonly number[]): string => {
      const kept = xs.filter((i) => !eos.includes(i));
      return kept.length === 0 ? '' : tok.decode(kept, true);
    };
    const out = await generate(model.stage, promptIds, {
      maxNewTokens: maxNew, temperature: opts.temperature ?? 0, topP: opts.topP ?? 1, seed: opts.seed ?? 0,
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
