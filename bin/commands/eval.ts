// `swarmtune eval`: flags of the eval task (engine/tasks/eval.ts) and its printed result.
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
import { evaluate } from '../../engine/tasks/eval.ts';
import type { EvalResult } from '../../engine/tasks/eval.ts';
import { DEFAULT_TRAIN_CONFIG } from '../../engine/train/config.ts';

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
    .requiredOption('--model <dir>', 'Hugging Face model dir (full precision or bitsandbytes 4-bit)')
    .requiredOption('--data <file>', 'JSONL file: {"text"}, {"question","answer"}, {"messages"} or {"prompt","completion"} records')
    .option('--adapter <dir>', 'PEFT LoRA adapter dir to apply')
    .option('--max-seq-length <n>', 'truncate tokenized examples to this length', positiveInt('--max-seq-length'), DEFAULT_TRAIN_CONFIG.max_seq_length)
    .option('--batch-size <n>', 'sequences per forward pass', positiveInt('--batch-size'), 4)
    .option('--system-prompt <text>', 'system message for {"question","answer"} records', DEFAULT_TRAIN_CONFIG.system_prompt)
    .option('--no-completion-only-loss', 'prompt/completion and question/answer records: score the prompt too (TRL completion_only_loss off)')
    .option('--assistant-only-loss', 'conversational records: score only assistant turns (TRL assistant_only_loss)', DEFAULT_TRAIN_CONFIG.assistant_only_loss)
    .option('--device <device>', 'auto | cpu | ref | cuda[:N]', 'auto')
    .option('--json', 'print one JSON object {loss, perplexity, tokens}')
    .action(async (o: { model: string; data: string; adapter?: string; maxSeqLength: number; batchSize: number; systemPrompt: string;
      completionOnlyLoss: boolean; assistantOnlyLoss: boolean; device: string; json?: boolean }) => {
      let r: EvalResult;
      try {
        r = await evaluate({
          model: o.model, data: o.data, adapter: o.adapter, maxSeqLength: o.maxSeqLength, batchSize: o.batchSize,
          systemPrompt: o.systemPrompt, completionOnlyLoss: o.completionOnlyLoss, assistantOnlyLoss: o.assistantOnlyLoss, device: o.device,
        });
      } catch (e) {
        process.stderr.write(`swarmtune eval: ${(e as Error).message}\n`);
        process.exitCode = 1;
        return;
      }
      if (o.json) {
        out.write(JSON.stringify({ loss: r.loss, perplexity: r.perplexity, tokens: r.tokens }) + '\n');
      } else {
        out.write(`eval: ${r.examples} examples, ${r.tokens} scored tokens` +
          `${r.truncated ? `, ${r.truncated} truncated at ${o.maxSeqLength}` : ''}\n` +
          `loss ${r.loss.toFixed(4)}  perplexity ${r.perplexity.toFixed(3)}\n`);
      }
    });
}
