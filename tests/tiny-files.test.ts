// Tests of the embedded tiny model: reproducible tokenizer/config files, tokenizer behaviour in the JS
// tokenizers library, chat template rendering, and the deterministic weights written by ensureTinyModel.
// Everything here is small (a 960-token vocab, a 3.9 MB model): the whole file runs in about a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { buildTinyFiles, readTinyDataset, TINY_DATA_DIR, BOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN, PAD_TOKEN, EOT_TOKEN } from '../engine/tiny/files.ts';
import { bpeEncodeWord, mergeRanks, preTokenize, trainBpe } from '../engine/tiny/bpe.ts';
import { ensureTinyModel, isTinyModelDir, TINY_DATASET_PATH, TINY_SYSTEM_PROMPT } from '../engine/tiny/index.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { parseLlamaConfig } from '../engine/formats/config.ts';

const committed = (name: string) => readFileSync(join(TINY_DATA_DIR, name), 'utf8');

function loadTokenizer(): { tok: Tokenizer; json: any; config: any } {
  const json = JSON.parse(committed('tokenizer.json'));
  const config = JSON.parse(committed('tokenizer_config.json'));
  return { tok: new Tokenizer(json, config), json, config };
}

function renderChat(config: any, messages: { role: string; content: string }[], addGenerationPrompt: boolean): string {
  return new Template(config.chat_template).render({
    messages, add_generation_prompt: addGenerationPrompt, bos_token: config.bos_token, eos_token: config.eos_token,
  });
}

test('rebuilding the tiny tokenizer and config gives byte-identical committed files', () => {
  const { files } = buildTinyFiles();
  assert.deepEqual(Object.keys(files).sort(), ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']);
  for (const [name, text] of Object.entries(files)) {
    assert.equal(text, committed(name), `${name} differs from a rebuild: run node engine/tiny/build.ts and commit`);
  }
});

test('BPE trainer: most frequent pair first, deterministic ties, stops below min frequency', () => {
  // pre-tokens "abab", "Ġab": the pair (a, b) occurs 3 times, every other pair once
  const m = trainBpe(['abab ab'], { maxVocabSize: 300, minFrequency: 2 });
  assert.deepEqual(m.merges, [['a', 'b']], 'only (a, b) reaches the minimum frequency');
  assert.equal(m.vocab.get('ab'), 256);
  // a tie goes to the lexicographically smallest pair, whatever the input order
  assert.deepEqual(trainBpe(['xy pq'], { maxVocabSize: 257, minFrequency: 1 }).merges, [['p', 'q']]);
  assert.deepEqual(trainBpe(['pq xy'], { maxVocabSize: 257, minFrequency: 1 }).merges, [['p', 'q']]);
  assert.throws(() => trainBpe(['x'], { maxVocabSize: 10, minFrequency: 1 }), /maxVocabSize/);
});

test('tokenizer.json loads in @huggingface/tokenizers and matches the trainer on every dataset chat', () => {
  const { tok, json, config } = loadTokenizer();
  const vocab = new Map<string, number>(Object.entries(json.model.vocab));
  const ranks = mergeRanks(json.model.merges);
  const ids = (t: string) => { const id = tok.token_to_id(t); assert.ok(id !== undefined, `no id for ${t}`); return id; };
  const bos = ids(BOS_TOKEN);
  const records = readTinyDataset();
  assert.ok(records.length >= 32 && records.length <= 64, `dataset has ${records.length} records`);
  for (const { question, answer } of records) {
    const messages = [
      { role: 'system', content: TINY_SYSTEM_PROMPT }, { role: 'user', content: question }, { role: 'assistant', content: answer },
    ];
    const text = renderChat(config, messages, false);
    assert.equal(text, `<|im_start|>system\n${TINY_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n${question}<|im_end|>\n<|im_start|>assistant\n${answer}<|im_end|>\n`);
    // reference: split on the special tokens, pre-tokenize the rest, apply merges by rank
    const expected = [bos];
    for (const part of text.split(/(<\|im_start\|>|<\|im_end\|>)/)) {
      if (part === '') continue;
      if (part === IM_START_TOKEN || part === IM_END_TOKEN) { expected.push(ids(part)); continue; }
      for (const w of preTokenize(part)) for (const t of bpeEncodeWord(w, ranks)) expected.push(vocab.get(t)!);
    }
    const got = tok.encode(text).ids;
    assert.deepEqual(got, expected, `encoding of ${JSON.stringify(question)}`);
    assert.equal(tok.decode(got, { skip_special_tokens: false }), BOS_TOKEN + text);
    // the chat is short: the question and answer words are mostly whole tokens
    assert.ok(got.length < 64, `${got.length} tokens for ${JSON.stringify(question)}`);
  }
});

test('special tokens, BOS post-processor, byte fallback for unseen text, generation prompt', () => {
  const { tok, config } = loadTokenizer();
  const modelConfig = JSON.parse(committed('config.json'));
  const bos = tok.token_to_id(BOS_TOKEN)!;
  assert.equal(modelConfig.bos_token_id, bos);
  assert.deepEqual(modelConfig.eos_token_id, [tok.token_to_id(IM_END_TOKEN), tok.token_to_id(EOT_TOKEN)]);
  assert.equal(modelConfig.pad_token_id, tok.token_to_id(PAD_TOKEN));
  assert.equal(modelConfig.vocab_size, tok.get_vocab(true).size);
  assert.equal(modelConfig.vocab_size % 64, 0);
  assert.ok(modelConfig.vocab_size >= 512 && modelConfig.vocab_size <= 1024);

  assert.deepEqual(tok.encode('Veloria').ids.slice(0, 1), [bos]);
  assert.equal(tok.encode('Veloria', { add_special_tokens: false }).ids.includes(bos), false);
  // text never seen in training still round-trips through single bytes
  const odd = 'Zügzwang ✓ 42\t{x}';
  assert.equal(tok.decode(tok.encode(odd).ids, { skip_special_tokens: true }), odd);
  const gen = renderChat(config, [{ role: 'user', content: 'Hi' }], true);
  assert.ok(gen.endsWith('<|im_start|>assistant\n'));
  assert.throws(() => renderChat(config, [{ role: 'tool', content: 'x' }], false), /Unsupported chat role: tool/);
});

test('ensureTinyModel writes a loadable, deterministic HF model dir and reuses it', async () => {
  const root = mkdtempSync(join(tmpdir(), 'swarmtune-tiny-test-'));
  try {
    const a = await ensureTinyModel(join(root, 'a'));
    const b = await ensureTinyModel(join(root, 'b'));
    assert.ok(isTinyModelDir(a));
    const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');
    assert.equal(sha(join(a, 'model.safetensors')), sha(join(b, 'model.safetensors')), 'weights must not depend on the run');
    for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json']) assert.equal(readFileSync(join(a, f), 'utf8'), committed(f));

    const cfg = parseLlamaConfig(JSON.parse(readFileSync(join(a, 'config.json'), 'utf8')), join(a, 'config.json'));
    assert.equal(cfg.hiddenSize, 128);
    assert.equal(cfg.numKeyValueHeads, 2);
    assert.equal(cfg.tieWordEmbeddings, false);

    const st = await SafetensorsFile.open(join(a, 'model.safetensors'));
    try {
      assert.equal(st.metadata?.format, 'pt');
      assert.equal(st.names().length, 2 + 1 + cfg.numHiddenLayers * 9);
      assert.deepEqual(st.info('model.layers.0.self_attn.k_proj.weight').shape, [cfg.numKeyValueHeads * cfg.headDim, cfg.hiddenSize]);
      assert.deepEqual(st.info('model.layers.3.mlp.down_proj.weight').shape, [cfg.hiddenSize, cfg.intermediateSize]);
      const q = await st.readFloat32('model.layers.1.self_attn.q_proj.weight');
      const mean = q.reduce((s, x) => s + x, 0) / q.length;
      const std = Math.sqrt(q.reduce((s, x) => s + (x - mean) ** 2, 0) / q.length);
      // 16384 samples: std of the estimate ~0.02/sqrt(2·16384) ≈ 1.1e-4, so ±1e-3 is a wide margin
      assert.ok(Math.abs(std - 0.02) < 1e-3 && Math.abs(mean) < 1e-3, `q_proj mean ${mean} std ${std}`);
      const head = await st.readFloat32('lm_head.weight');
      const headStd = Math.sqrt(head.reduce((s, x) => s + x * x, 0) / head.length);
      assert.ok(Math.abs(headStd - 1 / Math.sqrt(128)) < 3e-3, `lm_head std ${headStd}`);
      assert.ok((await st.readFloat32('model.norm.weight')).every((x) => x === 1));
      // different layers draw from different streams
      const q2 = await st.readFloat32('model.layers.2.self_attn.q_proj.weight');
      assert.notDeepEqual(q.slice(0, 8), q2.slice(0, 8));
    } finally {
      await st.close();
    }

    // an existing complete dir is reused untouched; a stale stamp makes it rewrite
    const mtime = statSync(join(a, 'model.safetensors')).mtimeMs;
    await ensureTinyModel(a);
    assert.equal(statSync(join(a, 'model.safetensors')).mtimeMs, mtime);
    writeFileSync(join(a, '.swarmtune-tiny'), 'stale\n');
    writeFileSync(join(a, 'config.json'), '{}');
    assert.equal(isTinyModelDir(a), false);
    await ensureTinyModel(a);
    assert.ok(isTinyModelDir(a));
    assert.equal(readFileSync(join(a, 'config.json'), 'utf8'), committed('config.json'));
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test('TINY_DATASET_PATH points at the bundled dataset', () => {
  assert.equal(readTinyDataset(TINY_DATASET_PATH).length, readFileSync(TINY_DATASET_PATH, 'utf8').trim().split('\n').length);
});

test('ensureTinyModel: an unusable default cache falls back to the temp dir; an unusable explicit dir is an error', async () => {
  const root = mkdtempSync(join(tmpdir(), 'swarmtune-tiny-cache-'));
  const saved = { cache: process.env.SWARMTUNE_CACHE_DIR, tmp: process.env.TMPDIR };
  try {
    const file = join(root, 'a-file');
    writeFileSync(file, 'x');
    process.env.SWARMTUNE_CACHE_DIR = join(file, 'cache'); // a file where a dir should be: ENOTDIR
    process.env.TMPDIR = join(root, 'tmp');                // os.tmpdir() reads it at call time
    const dir = await ensureTinyModel();
    assert.ok(dir.startsWith(join(root, 'tmp', 'swarmtune-cache', 'tiny-')), dir);
    assert.ok(isTinyModelDir(dir));
    await assert.rejects(ensureTinyModel(join(file, 'model')), /cannot create .*a-file\/model.*ENOTDIR/);
  } finally {
    for (const [k, v] of [['SWARMTUNE_CACHE_DIR', saved.cache], ['TMPDIR', saved.tmp]] as const) {
      if (v === undefined) delete process.env[k]; else process.env[k] = v;
    }
    rmSync(root, { recursive: true, force: true });
  }
});
