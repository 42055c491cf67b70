// The eval task: mean token loss and perplexity of a model (optionally with a PEFT adapter) on a JSONL file.
import { openForInference, backendForDevice } from '../model/inference.ts';
import { collate, loadDataset } from '../train/data.ts';
import { DEFAULT_TRAIN_CONFIG } from '../train/config.ts';
import type { Backend } from '../backend.ts';

export interface EvalOptions {
  model: string;
  data: string;
  adapter?: string;
  maxSeqLength?: number;
  batchSize?: number;
  systemPrompt?: string;
  /** score only completion/assistant tokens, as training does by default */
  completionOnlyLoss?: boolean;
  /** conversational records: score only assistant turns (TRL assistant_only_loss; default off: every token) */
  assistantOnlyLoss?: boolean;
  device?: string;
  /** injected backend (tests); otherwise from device */
  backend?: Backend;
  onProgress?: (done: number, total: number) => void;
  /** batch the examples in file order (as Trainer.evaluate's SequentialSampler) instead of by length */
  fileOrder?: boolean;
}

export interface EvalResult {
  /** mean cross-entropy per scored token (nats) */
  loss: number;
  perplexity: number;
  tokens: number;
  examples: number;
  skipped: number;
  truncated: number;
  /** each forward pass: its examples, summed token loss and scored tokens (in the order run) */
  batches: Array<{ examples: number; lossSum: number; tokens: number }>;
}

/** Same data pipeline and loss semantics as training: labels shifted, -100 ignored, micro-batches padded
 *  to their longest example; the mean is over all scored tokens of the file (not a mean of batch means). */
export async function evaluate(opts: EvalOptions): Promise<EvalResult> {
  const backend = opts.backend ?? await backendForDevice(opts.device ?? 'auto');
  const model = await openForInference(opts.model, opts.adapter, backend);
  try {
    const tok = model.tokenizer;
    if (!tok) throw new Error(`${opts.model}: no tokenizer.json; eval needs the tokenizer to read ${opts.data}`);
    const maxSeqLength = opts.maxSeqLength ?? DEFAULT_TRAIN_CONFIG.max_seq_length;
    const ds = loadDataset(opts.data, tok, {
      maxSeqLength,
      systemPrompt: opts.systemPrompt ?? DEFAULT_TRAIN_CONFIG.system_prompt,
      completionOnlyLoss: opts.completionOnlyLoss ?? DEFAULT_TRAIN_CONFIG.completion_only_loss,
      assistantOnlyLoss: opts.assistantOnlyLoss ?? DEFAULT_TRAIN_CONFIG.assistant_only_loss,
      skipBadLines: false,
    });
    const batchSize = opts.batchSize ?? 4;
    if (!Number.isInteger(batchSize) || batchSize <= 0) throw new RangeError(`--batch-size must be a positive integer, got ${batchSize}`);
    const padId = tok.padTokenId ?? tok.eosTokenId ?? 0;
    // batching similar lengths together wastes less compute on padding; the order does not change the sum
    const order = ds.examples.map((_, i) => i);
    if (opts.fileOrder !== true) order.sort((a, b) => ds.examples[a].ids.length - ds.examples[b].ids.length);
    let lossSum = 0, tokens = 0;
    const batches: EvalResult['batches'] = [];
    for (let i = 0; i < order.length; i += batchSize) {
      const mb = collate(order.slice(i, i + batchSize).map((j) => ds.examples[j]), padId);
      const r = await model.stage.forward({ key: `eval:${i}`, batch: mb.batch, seqLen: mb.seqLen, ids: mb.ids, labels: mb.labels }, { train: false });
      lossSum += r.lossSum!;
      tokens += r.tokens!;
      batches.push({ examples: mb.batch, lossSum: r.lossSum!, tokens: r.tokens! });
      opts.onProgress?.(Math.min(i + batchSize, order.length), order.length);
    }
    if (tokens === 0) throw new Error(`${opts.data}: no scored tokens (every label is masked)`);
    const loss = lossSum / tokens;
    return { loss, perplexity: Math.exp(loss), tokens, examples: ds.examples.length, skipped: ds.skipped.length, truncated: ds.truncated, batches };
  } finally {
    await model.close();
    if (!opts.backend) backend.dispose();
  }
}
