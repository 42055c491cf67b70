// `swarmtune eval`: flags of the eval task (engine/tasks/eval.ts) and its printed result.
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
import { evaluate } from '../../engine/tasks/eval.ts';
import type { EvalResult } from '../../engine/tasks/eval.ts';
import { DEFAULT_TRAIN_CONFIG } from '../../engine/train/config.ts';
import { action } from '../errors.ts';
import { dataFileArg, modelDirArg } from '../args.ts';

function positiveInt(flag: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError(`${flag} must be a positive integer, got "${v}"`);
    return n;
  };
}

/** `out` lets tests capture the printed result (default process.stdout). */
export function registerEval(program: Command, out: { write(s: string): unknown } = process.stdout): void {
  program
    .command('eval')
    .description('mean token loss and perplexity of a model (+ optional PEFT adapter) on a JSONL dataset')
    .requiredOption('--model <dir>', 'Hugging Face model dir (full precision or bitsandbytes 4-bit), or tiny (the embedded demo model)')
    .requiredOption('--data <file>', 'tiny (the demo QA set) or a JSONL file: {"text"}, {"question","answer"}, {"messages"} or {"prompt","completion"} records')
    .option('--adapter <dir>', 'PEFT LoRA adapter dir to apply')
    .option('--max-seq-length <n>', 'truncate tokenized examples to this length', positiveInt('--max-seq-length'), DEFAULT_TRAIN_CONFIG.max_seq_length)
    .option('--batch-size <n>', 'sequences per forward pass', positiveInt('--batch-size'), 4)
    .option('--system-prompt <text>', 'system message for {"question","answer"} records', DEFAULT_TRAIN_CONFIG.system_prompt)
    .option('--no-completion-only-loss', 'prompt/completion and question/answer records: score the prompt too (TRL completion_only_loss off)')
    .option('--assistant-only-loss', 'conversational records: score only assistant turns (TRL assistant_only_loss)', DEFAULT_TRAIN_CONFIG.assistant_only_loss)
    .option('--device <device>', 'auto | cpu | ref | cuda[:N]', 'auto')
    .option('--json', 'print one JSON object {loss, perplexity, tokens}')
    .action(action('eval', async (o: { model: string; data: string; adapter?: string; maxSeqLength: number; batchSize: number; systemPrompt: string;
      completionOnlyLoss: boolean; assistantOnlyLoss: boolean; device: string; json?: boolean }) => {
      const r: EvalResult = await evaluate({
        model: await modelDirArg('--model', o.model), data: await dataFileArg('--data', o.data), adapter: o.adapter, maxSeqLength: o.maxSeqLength, batchSize: o.batchSize,
        systemPrompt: o.systemPrompt, completionOnlyLoss: o.completionOnlyLoss, assistantOnlyLoss: o.assistantOnlyLoss, device: o.device,
      });
      if (o.json) {
        out.write(JSON.stringify({ loss: r.loss, perplexity: r.perplexity, tokens: r.tokens }) + '\n');
      } else {
        out.write(`eval: ${r.examples} examples, ${r.tokens} scored tokens` +
          `${r.truncated ? `, ${r.truncated} truncated at ${o.maxSeqLength}` : ''}\n` +
          `loss ${r.loss.toFixed(4)}  perplexity ${r.perplexity.toFixed(3)}\n`);
      }
    }));
}
