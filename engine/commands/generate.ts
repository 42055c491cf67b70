// `swarmtune generate`: text generation from a model (+ optional PEFT adapter) with a KV cache.
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
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
    const out = await generate(model.stage, promptIds, {
      maxNewTokens: maxNew, temperature: opts.temperature ?? 0, topP: opts.topP ?? 1, seed: opts.seed ?? 0,
      eosTokenIds: eos,
      onToken: (id) => {
        ids.push(id);
        if (!opts.onText) return;
        // decode the whole continuation each time: byte-level BPE tokens may split a UTF-8 character
        const text = tok.decode(ids.filter((i) => !eos.includes(i)), true);
        if (text.startsWith(emitted) && !text.endsWith('\uFFFD')) {
          opts.onText(text.slice(emitted.length));
          emitted = text;
        }
      },
    });
    const text = tok.decode(out.filter((i) => !eos.includes(i)), true);
    if (opts.onText && text.length > emitted.length && text.startsWith(emitted)) opts.onText(text.slice(emitted.length));
    return { text, promptIds, ids: out };
  } finally {
    await model.close();
    if (!opts.backend) backend.dispose();
  }
}

function num(flag: string, check: (n: number) => boolean, want: string) {
  return (v: string): number => {
    const n = Number(v);
    if (v.trim() === '' || !check(n)) throw new InvalidArgumentError(`${flag} must be ${want}, got "${v}"`);
    return n;
  };
}

export function registerGenerate(program: Command): void {
  program
    .command('generate')
    .description('generate text from a model (+ optional PEFT adapter) with a KV cache')
    .requiredOption('--model <dir>', 'Hugging Face model dir (full precision or bitsandbytes 4-bit)')
    .option('--adapter <dir>', 'PEFT LoRA adapter dir to apply')
    .requiredOption('--prompt <text>', 'prompt text')
    .option('--chat', 'wrap the prompt as a user message in the tokenizer\'s chat template')
    .option('--system <text>', 'system message (with --chat)')
    .option('--max-new-tokens <n>', 'tokens to generate at most', num('--max-new-tokens', (n) => Number.isInteger(n) && n >= 0, 'a non-negative integer'), 128)
    .option('--temperature <t>', '0 = greedy', num('--temperature', (n) => n >= 0, 'a number >= 0'), 0)
    .option('--top-p <p>', 'nucleus sampling mass', num('--top-p', (n) => n > 0 && n <= 1, 'in (0, 1]'), 1)
    .option('--seed <s>', 'sampling seed', num('--seed', (n) => Number.isSafeInteger(n), 'an integer'), 0)
    .option('--device <device>', 'auto | cpu | ref | cuda[:N]', 'auto')
    .action(async (o: { model: string; adapter?: string; prompt: string; chat?: boolean; system?: string; maxNewTokens: number;
      temperature: number; topP: number; seed: number; device: string }) => {
      try {
        await generateText({
          model: o.model, adapter: o.adapter, prompt: o.prompt, chat: o.chat, system: o.system, maxNewTokens: o.maxNewTokens,
          temperature: o.temperature, topP: o.topP, seed: o.seed, device: o.device,
          onText: (t) => process.stdout.write(t),
        });
        process.stdout.write('\n');
      } catch (e) {
        process.stderr.write(`swarmtune generate: ${(e as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
