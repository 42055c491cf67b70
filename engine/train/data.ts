// Training data pipeline with TRL SFT semantics (facts §9): JSONL records → rendered text → token ids with a
// loss mask → shifted labels → right-padded micro-batches, plus the deterministic epoch order and data cursor
// that the local trainer and the swarm coordinator share.
import { readFileSync } from 'node:fs';
import { Rng, hashSeed } from '../model/rng.ts';
import { locateAssistantTurns, tokenMaskFromSpans } from '../formats/chat.ts';
import type { ChatRenderer } from '../formats/chat.ts';
import type { TrainConfig } from './config.ts';
import { isDict, parsePyJson, toPy, typeName } from '../formats/jinja-values.ts';
import { IGNORE_INDEX } from './step-plan.ts';
import type { MicroBatch } from './step-plan.ts';
import { concatExamples } from './packing.ts';

/** What the pipeline needs from a tokenizer (engine/formats' Tokenizer provides it). */
export interface SftTokenizer extends ChatRenderer {
  /** ids of `text`; addSpecialTokens applies the tokenizer's post-processor (e.g. a BOS) exactly as HF does */
  encode(text: string, opts: { addSpecialTokens: boolean }): ArrayLike<number>;
  /** ids plus each token's character offsets (what transformers' char_to_token reads) */
  encodeWithOffsets(text: string, opts: { addSpecialTokens: boolean }): { ids: number[]; offsets: [number, number][] };
  readonly eosToken: string | null;
  readonly eosTokenId: number | null;
  readonly padTokenId: number | null;
}

/** A conversation as the chat template sees it: each message an ordered dict with every key of the record
 *  (role, content, tool_calls, reasoning_content, name, tool_call_id, ...), numbers as json.loads reads them. */
export interface Conversation {
  messages: unknown[];
  /** the record's "tools" list, passed as the template's `tools` */
  tools: unknown[] | null;
  /** the record's "chat_template_kwargs" (TRL), passed as template variables */
  variables: Record<string, unknown>;
}

export type DataRecord =
  | { kind: 'text'; text: string }
  | { kind: 'qa'; question: string; answer: string }
  | ({ kind: 'messages' } & Conversation)
  | { kind: 'prompt_completion'; prompt: string; completion: string }
  /** TRL's conversational prompt-completion: lists of messages */
  | ({ kind: 'chat_prompt_completion'; completion: unknown[] } & Conversation);

export class DataError extends Error {
  override readonly name = 'DataError';
}

export interface SkippedLine {
  line: number;
  reason: string;
}

export interface DataOptions {
  maxSeqLength: number;
  systemPrompt: string;
  /** TRL completion_only_loss: prompt/completion and question/answer records train only past the prompt */
  completionOnlyLoss: boolean;
  /** TRL assistant_only_loss (default false): conversational records train only on assistant turns */
  assistantOnlyLoss?: boolean;
}

/** The data options of a training config (what `swarmtune train`, `launch` and `eval` pass to loadDataset). */
export function dataOptionsOf(cfg: TrainConfig): DataOptions & { skipBadLines: boolean } {
  return {
    maxSeqLength: cfg.max_seq_length, systemPrompt: cfg.system_prompt, completionOnlyLoss: cfg.completion_only_loss,
    assistantOnlyLoss: cfg.assistant_only_loss, skipBadLines: cfg.skip_bad_lines,
  };
}

export interface TokenizedExample {
  /** input ids, truncated to maxSeqLength */
  ids: Int32Array;
  /** shifted targets: labels[i] = ids[i+1] where that token is trained, else -100 */
  labels: Int32Array;
  /** non-ignored labels */
  labelTokens: number;
  /** 1-based line in the source file */
  line: number;
}

export interface Dataset {
  file: string;
  examples: TokenizedExample[];
  skipped: SkippedLine[];
  /** examples cut at maxSeqLength */
  truncated: number;
}

function isString(x: unknown): x is string {
  return typeof x === 'string';
}

const kindOf = (x: unknown): string => (x === undefined ? 'nothing' : Array.isArray(x) ? 'an array' : x === null ? 'null' : typeof x);

/** Messages as Python values, each checked for the keys every template relies on. */
function conversationMessages(list: unknown, what: string): unknown[] {
  if (!Array.isArray(list) || list.length === 0) throw new Error(`"${what}" must be a non-empty array of messages`);
  return list.map((m, i) => {
    if (!isDict(m)) throw new Error(`${what}[${i}] must be an object with a "role", got ${typeName(m)}`);
    const role = m.get('role');
    if (typeof role !== 'string') throw new Error(`${what}[${i}].role must be a string, got ${role === undefined ? 'nothing' : typeName(role)}`);
    const content = m.get('content');
    if (content !== undefined && content !== null && typeof content !== 'string' && !Array.isArray(content)) {
      throw new Error(`${what}[${i}].content must be a string, a list of parts or null, got ${typeName(content)}`);
    }
    if (m.has('tool_calls') && m.get('tool_calls') !== null && !Array.isArray(m.get('tool_calls'))) {
      throw new Error(`${what}[${i}].tool_calls must be a list, got ${typeName(m.get('tool_calls'))}`);
    }
    return m;
  });
}

/** tools and chat_template_kwargs of a conversational record (TRL also accepts tools as a JSON string). */
function conversationExtras(py: Map<unknown, unknown>): { tools: unknown[] | null; variables: Record<string, unknown> } {
  let tools: unknown = py.get('tools') ?? null;
  if (typeof tools === 'string') {
    try {
      tools = parsePyJson(tools);
    } catch (e) {
      throw new Error(`"tools" is a string but not JSON (${(e as Error).message})`);
    }
  }
  if (tools !== null && !Array.isArray(tools)) throw new Error(`"tools" must be a list of tool definitions, got ${typeName(tools)}`);
  const kw = py.get('chat_template_kwargs') ?? null;
  if (kw !== null && !isDict(kw)) throw new Error(`"chat_template_kwargs" must be an object, got ${typeName(kw)}`);
  const variables: Record<string, unknown> = {};
  if (kw) for (const [k, v] of kw) variables[String(k)] = v;
  return { tools: tools as unknown[] | null, variables };
}

/** Validate one parsed JSON value into a record; throws a plain message (the caller adds file:line). `raw`, the
 *  line's text, lets conversations keep what JSON.parse loses (22.0 vs 22, key order) for the chat template. */
export function recordFromJson(obj: unknown, raw?: string): DataRecord {
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) {
    throw new Error(`expected a JSON object, got ${Array.isArray(obj) ? 'an array' : obj === null ? 'null' : typeof obj}`);
  }
  const o = obj as Record<string, unknown>;
  const families = [
    'messages' in o ? 'messages' : null,
    'prompt' in o || 'completion' in o ? 'prompt/completion' : null,
    'question' in o || 'answer' in o ? 'question/answer' : null,
    'text' in o ? 'text' : null,
  ].filter((f): f is string => f !== null);
  if (families.length === 0) {
    throw new Error(`no known fields; expected {"text"}, {"question","answer"}, {"prompt","completion"} or {"messages"}, got keys ${JSON.stringify(Object.keys(o))}`);
  }
  if (families.length > 1) throw new Error(`ambiguous record: has fields of ${families.join(' and ')}`);
  const py = (): Map<unknown, unknown> => (raw !== undefined ? parsePyJson(raw) : toPy(obj)) as Map<unknown, unknown>;
  switch (families[0]) {
    case 'text':
      if (!isString(o.text)) throw new Error(`"text" must be a string, got ${typeof o.text}`);
      if (o.text.length === 0) throw new Error('"text" is empty');
      return { kind: 'text', text: o.text };
    case 'question/answer':
      if (!isString(o.question)) throw new Error(`"question" must be a string, got ${o.question === undefined ? 'nothing' : typeof o.question}`);
      if (!isString(o.answer)) throw new Error(`"answer" must be a string, got ${o.answer === undefined ? 'nothing' : typeof o.answer}`);
      return { kind: 'qa', question: o.question, answer: o.answer };
    case 'prompt/completion': {
      if (Array.isArray(o.prompt) || Array.isArray(o.completion)) {
        if (!Array.isArray(o.prompt) || !Array.isArray(o.completion)) {
          throw new Error(`conversational "prompt" and "completion" must both be lists of messages, got ${kindOf(o.prompt)} and ${kindOf(o.completion)}`);
        }
        const p = py();
        return { kind: 'chat_prompt_completion', messages: conversationMessages(p.get('prompt'), 'prompt'),
          completion: conversationMessages(p.get('completion'), 'completion'), ...conversationExtras(p) };
      }
      if (!isString(o.prompt)) throw new Error(`"prompt" must be a string, got ${o.prompt === undefined ? 'nothing' : typeof o.prompt}`);
      if (!isString(o.completion)) throw new Error(`"completion" must be a string, got ${o.completion === undefined ? 'nothing' : typeof o.completion}`);
      return { kind: 'prompt_completion', prompt: o.prompt, completion: o.completion };
    }
    default: {
      const p = py();
      return { kind: 'messages', messages: conversationMessages(p.get('messages'), 'messages'), ...conversationExtras(p) };
    }
  }
}

/** Parse JSONL text. Blank lines are ignored; a bad line throws DataError "file:line: what" unless skipBadLines. */
export function parseJsonl(text: string, file: string, skipBadLines: boolean): { records: { line: number; record: DataRecord }[]; skipped: SkippedLine[] } {
  const records: { line: number; record: DataRecord }[] = [];
  const skipped: SkippedLine[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i].trim();
    if (raw === '') continue;
    try {
      let obj: unknown;
      try {
        obj = JSON.parse(raw);
      } catch (e) {
        throw new Error(`invalid JSON (${(e as Error).message})`);
      }
      records.push({ line: i + 1, record: recordFromJson(obj, raw) });
    } catch (e) {
      const reason = (e as Error).message;
      if (!skipBadLines) throw new DataError(`${file}:${i + 1}: ${reason}`);
      skipped.push({ line: i + 1, reason });
    }
  }
  return { records, skipped };
}

function toArray(ids: ArrayLike<number>): number[] {
  return Array.from(ids);
}

const dict = (entries: Record<string, unknown>): Map<unknown, unknown> => new Map(Object.entries(entries));

/** A rendered conversation's ids and, with assistant_only_loss, its assistant-token mask (else all ones). */
function renderConversation(tok: SftTokenizer, conv: Conversation, messages: unknown[], assistantOnly: boolean): { ids: number[]; mask: Uint8Array } {
  const chatOpts = { tools: conv.tools, variables: conv.variables };
  // the chat template writes its own special tokens, so the post-processor must not add more
  if (!assistantOnly) {
    const ids = toArray(tok.encode(tok.renderChat(messages, { ...chatOpts, addGenerationPrompt: false }).text, { addSpecialTokens: false }));
    return { ids, mask: new Uint8Array(ids.length).fill(1) };
  }
  const located = locateAssistantTurns(tok, messages, chatOpts);
  let enc: { ids: number[]; offsets: [number, number][] };
  try {
    enc = tok.encodeWithOffsets(located.text, { addSpecialTokens: false });
  } catch (e) {
    throw new Error(`assistant_only_loss: ${(e as Error).message}`);
  }
  const mask = tokenMaskFromSpans(enc.offsets, located.spans);
  if (!mask.includes(1)) {
    throw new Error(located.method === 'generation'
      ? "assistant_only_loss is on but the chat template's {% generation %} blocks mark no tokens of this record"
      : 'assistant_only_loss is on but the record has no assistant message to train on');
  }
  return { ids: enc.ids, mask };
}

/** Token ids and a per-token "trained" mask for one record (before truncation), as TRL's SFTTrainer builds them:
 *  text trains on every token; prompt/completion (and question/answer, a conversational prompt/completion) on the
 *  tokens past the tokenized prompt when completion_only_loss is on; conversations on every token, or with
 *  assistant_only_loss only on the assistant turns (both masks apply to a conversational prompt/completion). */
export function renderRecord(rec: DataRecord, tok: SftTokenizer, opts: DataOptions): { ids: number[]; mask: Uint8Array } {
  const eos = tok.eosToken;
  const withEos = (s: string): string => (eos && !s.endsWith(eos) ? s + eos : s);
  const assistantOnly = opts.assistantOnlyLoss ?? false;
  const completionMask = (promptLen: number, ids: number[], mask?: Uint8Array): Uint8Array => {
    const out = mask ?? new Uint8Array(ids.length).fill(1);
    if (opts.completionOnlyLoss) out.fill(0, 0, Math.min(promptLen, ids.length));
    return out;
  };
  const chatCompletion = (conv: Conversation, completion: unknown[]): { ids: number[]; mask: Uint8Array } => {
    const prompt = conv.messages;
    const promptIds = toArray(tok.encode(tok.renderChat(prompt, { tools: conv.tools, variables: conv.variables, addGenerationPrompt: true }).text, { addSpecialTokens: false }));
    const { ids, mask } = renderConversation(tok, conv, [...prompt, ...completion], assistantOnly);
    // the completion is what lies past the tokenized prompt; a prompt that tokenizes differently inside the whole
    // conversation would put that boundary in the wrong place (TRL only warns), so it is refused
    if (opts.completionOnlyLoss && !promptIds.every((t, i) => ids[i] === t)) {
      throw new Error('the prompt rendered with the generation prompt is not a prefix of the whole conversation\'s tokens, so the completion cannot be located');
    }
    return { ids, mask: completionMask(promptIds.length, ids, mask) };
  };
  switch (rec.kind) {
    case 'text': {
      if (assistantOnly) throw new Error('assistant_only_loss applies to conversational records; this is a {"text"} record (TRL refuses such data too)');
      const ids = toArray(tok.encode(withEos(rec.text), { addSpecialTokens: true }));
      return { ids, mask: new Uint8Array(ids.length).fill(1) };
    }
    case 'prompt_completion': {
      if (assistantOnly) throw new Error('assistant_only_loss applies to conversational records; this is a {"prompt","completion"} record with strings');
      // TRL: tokenize the prompt and prompt+completion separately; the completion is what lies past the prompt
      const promptIds = toArray(tok.encode(rec.prompt, { addSpecialTokens: true }));
      const ids = toArray(tok.encode(rec.prompt + withEos(rec.completion), { addSpecialTokens: true }));
      return { ids, mask: completionMask(promptIds.length, ids) };
    }
    case 'qa': {
      const conv: Conversation = {
        messages: [dict({ role: 'system', content: opts.systemPrompt }), dict({ role: 'user', content: rec.question })],
        tools: null, variables: {},
      };
      return chatCompletion(conv, [dict({ role: 'assistant', content: rec.answer })]);
    }
    case 'chat_prompt_completion':
      return chatCompletion(rec, rec.completion);
    case 'messages':
      return renderConversation(tok, rec, rec.messages, assistantOnly);
  }
}

/** Truncate to maxSeqLength and shift: label of position i is token i+1 when that token is trained. */
export function toExample(ids: number[], mask: Uint8Array, maxSeqLength: number, line: number): TokenizedExample {
  const n = Math.min(ids.length, maxSeqLength);
  const out = Int32Array.from(ids.slice(0, n));
  const labels = new Int32Array(n).fill(IGNORE_INDEX);
  let labelTokens = 0;
  for (let i = 0; i + 1 < n; i++) {
    if (mask[i + 1]) {
      labels[i] = out[i + 1];
      labelTokens++;
    }
  }
  return { ids: out, labels, labelTokens, line };
}

/** Load and tokenize a JSONL file. */
export function loadDataset(file: string, tok: SftTokenizer, opts: DataOptions & { skipBadLines: boolean }): Dataset {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new DataError(`${file}: cannot read training data (${(e as Error).message})`);
  }
  return tokenizeJsonl(text, file, tok, opts);
}

export function tokenizeJsonl(text: string, file: string, tok: SftTokenizer, opts: DataOptions & { skipBadLines: boolean }): Dataset {
  if (!Number.isInteger(opts.maxSeqLength) || opts.maxSeqLength < 2) throw new DataError(`max_seq_length must be an integer >= 2, got ${opts.maxSeqLength}`);
  const { records, skipped } = parseJsonl(text, file, opts.skipBadLines);
  const examples: TokenizedExample[] = [];
  let truncated = 0;
  for (const { line, record } of records) {
    try {
      const { ids, mask } = renderRecord(record, tok, opts);
      if (ids.length === 0) throw new Error('tokenizes to no tokens');
      if (ids.length > opts.maxSeqLength) truncated++;
      examples.push(toExample(ids, mask, opts.maxSeqLength, line));
    } catch (e) {
      const reason = (e as Error).message;
      if (!opts.skipBadLines) throw new DataError(`${file}:${line}: ${reason}`);
      skipped.push({ line, reason });
    }
  }
  if (examples.length === 0) throw new DataError(`${file}: no usable training examples${skipped.length ? ` (${skipped.length} bad lines skipped)` : ''}`);
  return { file, examples, skipped, truncated };
}

/** A micro-batch (engine/train/step-plan.ts) as collate() makes it, with the token counts it knows. */
export interface CollatedMicroBatch extends MicroBatch {
  /** non-ignored labels in this micro-batch */
  labelTokens: number;
  /** positions that are real tokens (not padding) */
  inputTokens: number;
}

/** Pad to the longest example of the micro-batch (HF DataCollator with padding=longest, right side). Packed rows
 *  (engine/train/packing.ts) are flattened into one row without padding instead, their examples' lengths kept
 *  as segments (TRL's padding-free collation). */
export function collate(examples: readonly TokenizedExample[], padId: number): CollatedMicroBatch {
  if (examples.length === 0) throw new DataError('collate: empty micro-batch');
  if (examples.some((e) => (e as { segments?: Int32Array }).segments !== undefined)) {
    const row = concatExamples(examples);
    return { batch: 1, seqLen: row.ids.length, ids: row.ids, labels: row.labels, segments: row.segments, labelTokens: row.labelTokens, inputTokens: row.ids.length };
  }
  const B = examples.length;
  const S = Math.max(...examples.map((e) => e.ids.length));
  const ids = new Int32Array(B * S).fill(padId);
  const labels = new Int32Array(B * S).fill(IGNORE_INDEX);
  let labelTokens = 0, inputTokens = 0;
  examples.forEach((e, b) => {
    ids.set(e.ids, b * S);
    labels.set(e.labels, b * S);
    labelTokens += e.labelTokens;
    inputTokens += e.ids.length;
  });
  return { batch: B, seqLen: S, ids, labels, labelTokens, inputTokens };
}

/** Example order of an epoch: Fisher–Yates from Rng(seed, epoch) so any epoch is reproducible without
 *  replaying earlier ones (what lets a resumed or restarted coordinator pick up mid-epoch). */
export function epochOrder(n: number, seed: number, epoch: number, shuffle: boolean): Uint32Array {
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  if (!shuffle) return order;
  const rng = new Rng(seed, 0x5eed, epoch);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.nextU32() % (i + 1);
    const t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  return order;
}

/** LoRA dropout seed of micro-batch `microBatch` of optimizer step `step` (0-based). The swarm must send the
 *  same value for its results to match `swarmtune train` with dropout on; 31 bits so it fits the wire's int32. */
export function dropoutSeedFor(seed: number, step: number, microBatch: number): number {
  return hashSeed(seed, step, microBatch) >>> 1;
}

/** Position in the data stream: the next micro-batch to consume. Serializable as JSON. */
export interface DataCursor {
  epoch: number;
  microBatch: number;
}

export interface StepCounts {
  microBatchesPerEpoch: number;
  stepsPerEpoch: number;
  totalSteps: number;
}

/** HF Trainer step arithmetic: a dataloader of ceil(N/B) micro-batches (last one partial), ceil(len/accum)
 *  optimizer steps per epoch (the last may have fewer micro-batches), max_steps > 0 overrides epochs. */
export function planSteps(numExamples: number, batchSize: number, accumulation: number, numTrainEpochs: number, maxSteps: number): StepCounts {
  const microBatchesPerEpoch = Math.ceil(numExamples / batchSize);
  const stepsPerEpoch = Math.max(1, Math.ceil(microBatchesPerEpoch / accumulation));
  const totalSteps = maxSteps > 0 ? maxSteps : Math.ceil(numTrainEpochs * stepsPerEpoch);
  return { microBatchesPerEpoch, stepsPerEpoch, totalSteps };
}

/** Micro-batches of optimizer steps over a dataset: deterministic from (seed, step), so the data position
 *  of any step is known without replaying the stream. */
export class DataLoader {
  readonly examples: readonly TokenizedExample[];
  readonly batchSize: number;
  readonly accumulation: number;
  readonly seed: number;
  readonly shuffle: boolean;
  readonly padId: number;
  readonly microBatchesPerEpoch: number;
  readonly stepsPerEpoch: number;
  private cachedEpoch = -1;
  private cachedOrder: Uint32Array = new Uint32Array(0);

  constructor(examples: readonly TokenizedExample[], opts: { batchSize: number; accumulation: number; seed: number; shuffle: boolean; padId: number }) {
    if (examples.length === 0) throw new DataError('DataLoader: no examples');
    this.examples = examples;
    this.batchSize = opts.batchSize;
    this.accumulation = opts.accumulation;
    this.seed = opts.seed;
    this.shuffle = opts.shuffle;
    this.padId = opts.padId;
    const plan = planSteps(examples.length, opts.batchSize, opts.accumulation, 1, -1);
    this.microBatchesPerEpoch = plan.microBatchesPerEpoch;
    this.stepsPerEpoch = plan.stepsPerEpoch;
  }

  /** Cursor at the start of optimizer step `step` (0-based). */
  cursorAt(step: number): DataCursor {
    const epoch = Math.floor(step / this.stepsPerEpoch);
    return { epoch, microBatch: (step % this.stepsPerEpoch) * this.accumulation };
  }

  /** The micro-batches of optimizer step `step`. */
  stepMicroBatches(step: number): CollatedMicroBatch[] {
    const { epoch, microBatch } = this.cursorAt(step);
    const end = Math.min(microBatch + this.accumulation, this.microBatchesPerEpoch);
    const out: CollatedMicroBatch[] = [];
    for (let k = microBatch; k < end; k++) out.push(this.microBatch(epoch, k));
    return out;
  }

  microBatch(epoch: number, index: number): CollatedMicroBatch {
    if (epoch !== this.cachedEpoch) {
      this.cachedOrder = epochOrder(this.examples.length, this.seed, epoch, this.shuffle);
      this.cachedEpoch = epoch;
    }
    const start = index * this.batchSize;
    if (index < 0 || start >= this.examples.length) throw new RangeError(`DataLoader: micro-batch ${index} out of range (epoch has ${this.microBatchesPerEpoch})`);
    const idx = this.cachedOrder.subarray(start, Math.min(start + this.batchSize, this.examples.length));
    return collate(Array.from(idx, (i) => this.examples[i]), this.padId);
  }
}
