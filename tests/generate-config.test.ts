// generate's defaults from generation_config.json (as transformers' GenerationConfig reads them; flags
// override), --chat through the model's own template (Qwen3's real one), top-k and repetition penalty with HF
// semantics, and empty answers (eos first, --max-new-tokens 0) as normal answers (issue 13).
//
// The embedded tiny model on the RefBackend, copied per case with its own generation_config.json: seconds.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RefBackend } from '../engine/backends/ref.ts';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { generateText } from '../engine/tasks/generate.ts';
import { parseGenerationConfig, HF_GENERATION_DEFAULTS } from '../engine/formats/generation-config.ts';
import { applyRepetitionPenalty, sampleToken } from '../engine/model/generate.ts';
import { Rng } from '../engine/model/rng.ts';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { qwen3Json, writeQwen3Dir } from './family-dirs.ts';

registerBuiltinBackends();
const backend = new RefBackend();
let root = '';
let tiny = '';
before(async () => {
  root = await mkdtemp(join(tmpdir(), 'swarmtune-gencfg-'));
  tiny = await ensureTinyModel(join(root, 'tiny'));
});
after(async () => { await rm(root, { recursive: true, force: true }); });

let copies = 0;
/** the tiny model with this generation_config.json (null: none at all) */
async function withGenerationConfig(json: Record<string, unknown> | null): Promise<string> {
  const dir = join(root, `copy${copies++}`);
  await cp(tiny, dir, { recursive: true });
  if (json === null) await rm(join(dir, 'generation_config.json'));
  else await writeFile(join(dir, 'generation_config.json'), JSON.stringify(json));
  return dir;
}

const PROMPT = 'The Sorn';

test('parseGenerationConfig: Qwen3\'s real file, transformers\' defaults, named errors, notes for what is not applied', () => {
  // Qwen3-0.6B's generation_config.json
  const q = parseGenerationConfig({ bos_token_id: 151643, do_sample: true, eos_token_id: [151645, 151643], pad_token_id: 151643, temperature: 0.6, top_k: 20, top_p: 0.95, transformers_version: '4.51.0' });
  assert.deepEqual(q, { doSample: true, temperature: 0.6, topK: 20, topP: 0.95, repetitionPenalty: 1, eosTokenIds: [151645, 151643], maxNewTokens: null, notes: [] });
  assert.deepEqual(parseGenerationConfig({}), { ...HF_GENERATION_DEFAULTS, notes: [] });
  assert.equal(HF_GENERATION_DEFAULTS.topK, 50);
  assert.deepEqual(parseGenerationConfig({ eos_token_id: 2 }).eosTokenIds, [2]);
  assert.throws(() => parseGenerationConfig({ top_p: 1.5 }, 'm/generation_config.json'), { name: 'GenerationConfigError', message: 'm/generation_config.json: "top_p" must be in (0, 1], got 1.5' });
  assert.throws(() => parseGenerationConfig({ do_sample: 'yes' }), /"do_sample" must be true or false/);
  assert.throws(() => parseGenerationConfig({ eos_token_id: [1, -2] }), /"eos_token_id" must be a token id or a list/);
  assert.deepEqual(parseGenerationConfig({ num_beams: 4, num_beams_unknown: 1 }, 'g').notes, ['g: "num_beams": 4 is not applied (generate decodes one sequence token by token)']);
});

test('sampleToken top_k keeps the k most likely (ties at the k-th kept); repetition penalty as HF', () => {
  const logits = Float32Array.from([0.1, 2, 1, 2, -1, 1]);
  const seen = new Set<number>();
  const rng = new Rng(1);
  for (let i = 0; i < 400; i++) seen.add(sampleToken(logits, 1, 1, rng, 2));
  assert.deepEqual([...seen].sort(), [1, 3]);
  // the 3rd largest is 1 (ids 2 and 5): both stay, as `scores < topk(scores, 3)[-1]` removes only smaller ones
  const seen3 = new Set<number>();
  for (let i = 0; i < 800; i++) seen3.add(sampleToken(logits, 1, 1, rng, 3));
  assert.deepEqual([...seen3].sort(), [1, 2, 3, 5]);
  // top_k 1 is greedy whatever the temperature
  const unique = Float32Array.from([0.1, 2, 1, 1.9, -1, 1]);
  for (let i = 0; i < 50; i++) assert.equal(sampleToken(unique, 5, 1, rng, 1), 1);
  const l = Float32Array.from([2, -2, 3, 0.5]);
  applyRepetitionPenalty(l, [0, 1, 1], 2);
  assert.deepEqual([...l], [1, -4, 3, 0.5]);
});

test('generate reads do_sample, temperature, top_k, top_p and the eos list from generation_config.json; options override', async () => {
  const greedy = await generateText({ model: tiny, prompt: PROMPT, maxNewTokens: 6, backend });
  // the tiny model's own file: do_sample false, eos [919, 917]
  assert.deepEqual(greedy.settings, { doSample: false, temperature: 1, topK: 50, topP: 1, repetitionPenalty: 1, maxNewTokens: 6, eosTokenIds: [919, 917] });
  const sampling = await withGenerationConfig({ do_sample: true, temperature: 1.5, top_k: 1, top_p: 0.9, eos_token_id: [919], max_new_tokens: 6 });
  const s = await generateText({ model: sampling, prompt: PROMPT, backend, seed: 3 });
  assert.deepEqual(s.settings, { doSample: true, temperature: 1.5, topK: 1, topP: 0.9, repetitionPenalty: 1, maxNewTokens: 6, eosTokenIds: [919] });
  // top_k 1 from the file makes sampling greedy: the same tokens up to the eos list's difference
  const stop = (ids: number[], eos: number[]) => { const i = ids.findIndex((x) => eos.includes(x)); return i < 0 ? ids : ids.slice(0, i + 1); };
  assert.deepEqual(s.ids, stop(greedy.ids, [919]));
  // a wide top_k with a high temperature samples something else than greedy (seeded, so reproducible)
  const wide = await generateText({ model: sampling, prompt: PROMPT, backend, seed: 3, topK: 0, topP: 1, temperature: 5 });
  assert.equal(wide.settings.doSample, true);
  assert.notDeepEqual(wide.ids, s.ids);
  assert.deepEqual((await generateText({ model: sampling, prompt: PROMPT, backend, seed: 3, topK: 0, topP: 1, temperature: 5 })).ids, wide.ids);
  // --no-do-sample and --temperature 0 are greedy whatever the file says
  assert.deepEqual((await generateText({ model: sampling, prompt: PROMPT, backend, doSample: false, topK: 0 })).ids, s.ids);
  assert.equal((await generateText({ model: sampling, prompt: PROMPT, backend, temperature: 0, topK: 0 })).settings.doSample, false);
  // no generation_config.json: transformers' defaults (greedy), eos from config.json and the tokenizer
  const none = await withGenerationConfig(null);
  const n = await generateText({ model: none, prompt: PROMPT, maxNewTokens: 6, backend });
  assert.equal(n.settings.doSample, false);
  assert.deepEqual(n.ids, greedy.ids);
  // a bad file is one clear error naming it and the key, before the model is read
  const bad = await withGenerationConfig({ temperature: -1 });
  await assert.rejects(generateText({ model: bad, prompt: PROMPT, backend }), { name: 'GenerationConfigError', message: `${join(bad, 'generation_config.json')}: "temperature" must be a number > 0, got -1` });
  const notes: string[] = [];
  await generateText({ model: await withGenerationConfig({ num_beams: 3 }), prompt: PROMPT, maxNewTokens: 1, backend, onNote: (l) => notes.push(l) });
  assert.equal(notes.length, 1);
  assert.match(notes[0], /"num_beams": 3 is not applied/);
});

test('an empty answer is a normal answer: the first token is eos, or --max-new-tokens 0 (issue 13)', async () => {
  const first = (await generateText({ model: tiny, prompt: PROMPT, maxNewTokens: 1, backend })).ids[0];
  const dir = await withGenerationConfig({ do_sample: false, eos_token_id: [first] });
  let streamed = '';
  const r = await generateText({ model: dir, prompt: PROMPT, maxNewTokens: 5, backend, onText: (t) => { streamed += t; } });
  assert.deepEqual(r.ids, [first]);
  assert.equal(r.text, '');
  assert.equal(streamed, '');
  const zero = await generateText({ model: tiny, prompt: PROMPT, maxNewTokens: 0, backend, onText: (t) => { streamed += t; } });
  assert.deepEqual(zero.ids, []);
  assert.equal(zero.text, '');
  // the CLI prints the empty answer and exits 0
  const { Command } = await import('commander');
  const { registerGenerate } = await import('../bin/commands/generate.ts');
  for (const args of [['--model', dir], ['--model', tiny, '--max-new-tokens', '0']]) {
    const program = new Command().exitOverride();
    registerGenerate(program);
    const writes: string[] = [];
    const orig = process.stdout.write.bind(process.stdout);
    process.exitCode = undefined;
    (process.stdout as unknown as { write: (s: string) => boolean }).write = (s: string) => { writes.push(s); return true; };
    try {
      await program.parseAsync(['generate', ...args, '--prompt', PROMPT, '--device', 'ref'], { from: 'user' });
    } finally {
      (process.stdout as unknown as { write: typeof orig }).write = orig;
    }
    assert.equal(process.exitCode, undefined, `exit code for ${args.join(' ')}`);
    assert.deepEqual(writes, ['\n']);
  }
});

test('--chat renders the model\'s own chat template (Qwen3\'s, with the generation prompt)', async () => {
  const dir = join(root, 'qwen3');
  await writeQwen3Dir(dir, qwen3Json({ hidden_size: 16, head_dim: 8, intermediate_size: 32, vocab_size: 151936, tie_word_embeddings: true }));
  const r = await generateText({ model: dir, prompt: 'Hi there', system: 'Be brief.', chat: true, maxNewTokens: 1, backend });
  const { openModelDir } = await import('../engine/formats/model-dir.ts');
  const md = await openModelDir(dir);
  // Qwen3's template: ChatML turns, and the assistant turn opened for the answer
  assert.equal(md.tokenizer!.decode(r.promptIds), '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n');
  await md.close();
});
