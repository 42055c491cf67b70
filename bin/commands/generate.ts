// `swarmtune generate`: flags of the generate task (engine/tasks/generate.ts); the text streams to stdout.
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
import { generateText } from '../../engine/tasks/generate.ts';
import { action } from '../errors.ts';
import { modelDirArg } from '../args.ts';

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
    .requiredOption('--model <dir>', 'Hugging Face model dir (full precision or bitsandbytes 4-bit), or tiny (the embedded demo model)')
    .option('--adapter <dir>', 'PEFT LoRA adapter dir to apply')
    .requiredOption('--prompt <text>', 'prompt text')
    .option('--chat', 'render the prompt as a user message with the model\'s own chat template (add_generation_prompt)')
    .option('--system <text>', 'system message (with --chat)')
    .option('--max-new-tokens <n>', 'tokens to generate at most (default: generation_config.json max_new_tokens, else 128)', num('--max-new-tokens', (n) => Number.isInteger(n) && n >= 0, 'a non-negative integer'))
    .option('--do-sample', 'sample (default: generation_config.json\'s do_sample, else greedy)')
    .option('--no-do-sample', 'greedy decoding whatever generation_config.json says')
    .option('--temperature <t>', 'sampling temperature (default: generation_config.json, else 1); given alone, > 0 samples and 0 is greedy', num('--temperature', (n) => n >= 0, 'a number >= 0'))
    .option('--top-k <k>', 'keep the k most likely tokens, 0 = off (default: generation_config.json, else 50)', num('--top-k', (n) => Number.isInteger(n) && n >= 0, 'a non-negative integer'))
    .option('--top-p <p>', 'nucleus sampling mass (default: generation_config.json, else 1)', num('--top-p', (n) => n > 0 && n <= 1, 'in (0, 1]'))
    .option('--repetition-penalty <r>', 'HF repetition_penalty, 1 = off (default: generation_config.json, else 1)', num('--repetition-penalty', (n) => n > 0 && Number.isFinite(n), 'a number > 0'))
    .option('--seed <s>', 'sampling seed', num('--seed', (n) => Number.isSafeInteger(n), 'an integer'), 0)
    .option('--device <device>', 'auto | cpu | ref | cuda[:N]', 'auto')
    .action(action('generate', async (o: { model: string; adapter?: string; prompt: string; chat?: boolean; system?: string; maxNewTokens?: number;
      doSample?: boolean; temperature?: number; topK?: number; topP?: number; repetitionPenalty?: number; seed: number; device: string }) => {
      await generateText({
        model: await modelDirArg('--model', o.model), adapter: o.adapter, prompt: o.prompt, chat: o.chat, system: o.system, maxNewTokens: o.maxNewTokens,
        doSample: o.doSample, temperature: o.temperature, topK: o.topK, topP: o.topP, repetitionPenalty: o.repetitionPenalty,
        seed: o.seed, device: o.device,
        onText: (t) => process.stdout.write(t),
        onNote: (line) => process.stderr.write(`note: ${line}\n`),
      });
      process.stdout.write('\n');
    }));
}
