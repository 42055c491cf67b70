// Trainer data pipeline: record formats, TRL masking/eos rules, shifting, truncation, padding, bad lines,
// epoch order. Uses the tiny model's real tokenizer (byte-level BPE, BOS post-processor, ChatML template).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '../engine/formats/tokenizer.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import {
  DataError, DataLoader, collate, epochOrder, loadDataset, planSteps, tokenizeJsonl,
} from '../engine/train/data.ts';
import { IGNORE_INDEX } from '../engine/train/step-plan.ts';
import type { DataOptions, TokenizedExample } from '../engine/train/data.ts';

const tok = (await Tokenizer.fromDir(TINY_DATA_DIR))!;
const opts: DataOptions & { skipBadLines: boolean } = { maxSeqLength: 256, systemPrompt: 'Be brief.', completionOnlyLoss: true, skipBadLines: false };

/** the text of the tokens that carry a label (labels are shifted: label i is token i+1) */
function trainedText(e: TokenizedExample): string {
  const ids: number[] = [];
  for (let i = 0; i < e.labels.length; i++) if (e.labels[i] !== IGNORE_INDEX) ids.push(e.labels[i]);
  return tok.decode(ids);
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

test('messages: every assistant turn is trained, nothing else', () => {
  const e = one({ messages: [
    { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello.' },
    { role: 'user', content: 'Moons?' }, { role: 'assistant', content: 'Three.' },
  ] });
  assert.equal(trainedText(e), 'Hello.<|im_end|>\nThree.<|im_end|>\n');
  assert.throws(() => one({ messages: [{ role: 'user', content: 'Hi' }] }), /mem\.jsonl:1: .*no assistant message/);
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
