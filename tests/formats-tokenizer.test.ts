// Tokenizer wrapper and chat template on a small hand-built Metaspace BPE tokenizer.json with a BOS-adding post-processor.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tokenizer } from '../engine/formats/tokenizer.ts';

const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
const VOCAB = ['<unk>', '<s>', '</s>', '▁', 'h', 'e', 'l', 'o', 'w', 'r', 'd', '▁h', '▁he', 'll', '▁hell', '▁hello', '▁w', '▁wo', 'rl', '▁worl', '▁world', '<|user|>', '<|assistant|>'];
const id = (t: string) => VOCAB.indexOf(t);
const TOKENIZER_JSON = {
  version: '1.0', truncation: null, padding: null,
  added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>'), special(21, '<|user|>'), special(22, '<|assistant|>')],
  normalizer: null,
  pre_tokenizer: { type: 'Metaspace', replacement: '▁', prepend_scheme: 'always', split: true },
  post_processor: {
    type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
    pair: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
    special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
  },
  decoder: { type: 'Metaspace', replacement: '▁', prepend_scheme: 'always', split: true },
  model: {
    type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null, end_of_word_suffix: null,
    fuse_unk: false, byte_fallback: false, ignore_merges: false,
    vocab: Object.fromEntries(VOCAB.map((t, i) => [t, i])),
    merges: ['▁ h', '▁h e', 'l l', '▁he ll', '▁hell o', '▁ w', '▁w o', 'r l', '▁wo rl', '▁worl d'],
  },
};
const TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}" +
  "{{ raise_exception('Only user and assistant roles are supported, got ' + m['role']) }}{% endif %}" +
  "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
const TOKENIZER_CONFIG = {
  bos_token: { content: '<s>', lstrip: false, normalized: false, rstrip: false, single_word: false, __type: 'AddedToken' },
  eos_token: '</s>', pad_token: null, unk_token: '<unk>', chat_template: TEMPLATE, clean_up_tokenization_spaces: false,
};

test('encode adds BOS only through the post-processor; BPE merges applied in rank order', () => {
  const t = new Tokenizer(TOKENIZER_JSON, TOKENIZER_CONFIG);
  assert.deepEqual(t.encode('hello world'), [1, id('▁hello'), id('▁world')]);
  assert.deepEqual(t.encode('hello world', { addSpecialTokens: false }), [id('▁hello'), id('▁world')]);
  // "hold": ▁ h → ▁h, ▁h... no "▁h o" merge → [▁h, o, l, d]
  assert.deepEqual(t.encode('hold', { addSpecialTokens: false }), [id('▁h'), id('o'), id('l'), id('d')]);
  assert.deepEqual(t.encode('hez', { addSpecialTokens: false }), [id('▁he'), 0]); // unknown char → <unk>
  assert.equal(t.bosTokenId, 1);
  assert.equal(t.eosTokenId, 2);
  assert.equal(t.padTokenId, null);
  assert.equal(t.vocabSize, VOCAB.length);
});

test('decode with and without special tokens', () => {
  const t = new Tokenizer(TOKENIZER_JSON, TOKENIZER_CONFIG);
  const ids = [1, id('▁hello'), id('▁world'), 2];
  assert.equal(t.decode(ids, true), 'hello world');
  assert.equal(t.decode(ids, false), '<s> hello world</s>');
});

test('chat template renders with bos/eos, generation prompt, raise_exception', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tok-test-'));
  try {
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(TOKENIZER_JSON));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify(TOKENIZER_CONFIG));
    const t = await Tokenizer.fromDir(dir);
    assert.ok(t);
    const msgs = [{ role: 'user', content: 'hello' }, { role: 'assistant', content: 'world' }];
    assert.equal(t.applyChatTemplate(msgs), '<s><|user|>hello</s><|assistant|>world</s>');
    assert.equal(t.applyChatTemplate(msgs.slice(0, 1), { addGenerationPrompt: true }), '<s><|user|>hello</s><|assistant|>');
    assert.throws(() => t.applyChatTemplate([{ role: 'system', content: 'x' }]), /Only user and assistant roles are supported, got system/);
    // rendered text already holds <s>: tokenizing without special tokens keeps exactly one BOS
    const ids = t.encode(t.applyChatTemplate(msgs.slice(0, 1), { addGenerationPrompt: true }), { addSpecialTokens: false });
    assert.deepEqual(ids, [1, 21, id('▁hello'), 2, 22]);
    // a chat_template.jinja file overrides tokenizer_config.json
    await writeFile(join(dir, 'chat_template.jinja'), '{% for m in messages %}[{{ m.content }}]{% endfor %}');
    const t2 = await Tokenizer.fromDir(dir);
    assert.equal(t2!.applyChatTemplate(msgs), '[hello][world]');
    assert.equal(await Tokenizer.fromDir(join(dir, 'none')), null);
    // transformers renders with trim_blocks + lstrip_blocks: the newline after a block tag and the indent before it vanish
    await writeFile(join(dir, 'chat_template.jinja'), '{% for m in messages %}\n  {% if m.role == "user" %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}');
    assert.equal((await Tokenizer.fromDir(dir))!.applyChatTemplate(msgs), 'U:hello\n');
    const noTpl = new Tokenizer(TOKENIZER_JSON, { ...TOKENIZER_CONFIG, chat_template: undefined }, 'x');
    assert.throws(() => noTpl.applyChatTemplate(msgs), /x: tokenizer_config.json has no chat_template/);
    assert.throws(() => new Tokenizer(TOKENIZER_JSON, { ...TOKENIZER_CONFIG, eos_token: '<eos>' }, 'y'), /y: tokenizer_config.json eos_token "<eos>" is not in the vocabulary/);
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('encodeWithOffsets: Metaspace tokens (with the prepended "▁") and a post-processor BOS map back onto the text', () => {
  const t = new Tokenizer(TOKENIZER_JSON, TOKENIZER_CONFIG);
  const withBos = t.encodeWithOffsets('hello world');
  assert.deepEqual(withBos.ids, [1, id('▁hello'), id('▁world')]);
  // BOS is not in the text (zero width); "▁hello" covers "hello" (its ▁ was prepended), "▁world" covers " world"
  assert.deepEqual(withBos.offsets, [[0, 0], [0, 5], [5, 11]]);
  const { ids, offsets } = t.encodeWithOffsets('<|user|>hello</s>', { addSpecialTokens: false });
  assert.deepEqual(ids, [21, id('▁hello'), 2]);
  assert.deepEqual(offsets, [[0, 8], [8, 13], [13, 17]]);
});

test('encodeWithOffsets on byte-level BPE: a character split across tokens belongs to each; a rewritten text is refused', async () => {
  const { TINY_DATA_DIR } = await import('../engine/tiny/files.ts');
  const t = (await Tokenizer.fromDir(TINY_DATA_DIR))!;
  const text = '<|im_start|>user\nhé 🙂<|im_end|>';
  const { ids, offsets } = t.encodeWithOffsets(text, { addSpecialTokens: false });
  assert.deepEqual(ids, t.encode(text, { addSpecialTokens: false }));
  assert.equal(offsets[0][1], '<|im_start|>'.length);
  assert.equal(offsets.at(-1)![1], text.length);
  // every character is covered, in order, and the emoji (4 UTF-8 bytes, likely several byte tokens) maps to its 2 UTF-16 units
  for (let i = 1; i < offsets.length; i++) assert.ok(offsets[i][0] >= offsets[i - 1][0] && offsets[i][0] <= offsets[i - 1][1]);
  const emoji = text.indexOf('🙂');
  assert.ok(offsets.some(([a, b]) => a <= emoji && b >= emoji + 2));
  const ws = new Tokenizer({ ...TOKENIZER_JSON, decoder: { type: 'WordPiece', prefix: '##', cleanup: true } }, TOKENIZER_CONFIG, 'wp');
  assert.throws(() => ws.encodeWithOffsets('hello'), /wp: cannot map tokens to characters/);
});

test('renderChat passes tools and every message key, picks the tool_use template, reports generation spans; strftime_now uses the pinned clock', () => {
  const tpl = "{% if tools %}T:{{ tools | tojson }}|{% endif %}{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}{% endif %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}{{ strftime_now('%d %B %Y') }}";
  const t = new Tokenizer(TOKENIZER_JSON, { ...TOKENIZER_CONFIG, chat_template: [{ name: 'default', template: 'D' }, { name: 'tool_use', template: tpl }] });
  t.now = () => new Date(2024, 6, 26);
  const msgs = [{ role: 'user', content: 'w?' }, { role: 'assistant', content: 'ok', tool_calls: [{ function: { name: 'f', arguments: { x: 1.5, y: [true, null] } } }] }];
  const r = t.renderChat(msgs, { tools: [{ type: 'function', function: { name: 'f' } }] });
  assert.equal(r.text, 'T:[{"type": "function", "function": {"name": "f"}}]|user:w?assistant:{"x": 1.5, "y": [true, null]}ok</s>26 July 2024');
  assert.deepEqual(r.generation.map(([a, b]) => r.text.slice(a, b)), ['ok</s>']);
  assert.equal(t.applyChatTemplate(msgs), 'D');
  assert.throws(() => new Tokenizer(TOKENIZER_JSON, { ...TOKENIZER_CONFIG, chat_template: '{% for %}' }, 'z').applyChatTemplate(msgs), /z: chat_template "default" does not parse/);
});
