// Where each assistant turn lies in a rendered conversation, and which tokens that makes trainable — the
// assistant_only_loss mask of TRL / transformers' return_assistant_tokens_mask.
//
// With {% generation %} markers the template says so itself (transformers' rule). Without them (most real
// templates) a turn is located from renders of the conversation's prefixes and checked; a turn that cannot be
// located exactly is refused (ChatSpanError names the message), never guessed.
import type { RenderResult } from './jinja.ts';
import type { ChatTemplateOptions } from './tokenizer.ts';
import { isDict } from './jinja-values.ts';

export class ChatSpanError extends Error {
  override readonly name = 'ChatSpanError';
  /** index of the assistant message in the record's messages */
  readonly turn: number;
  constructor(turn: number, message: string) {
    super(message);
    this.turn = turn;
  }
}

export interface ChatRenderer {
  renderChat(messages: readonly unknown[], opts: ChatTemplateOptions): RenderResult;
  template(opts: ChatTemplateOptions): { readonly hasGenerationMarkers: boolean };
}

/** [start, end) of one assistant turn's trained text in the rendered conversation (UTF-16 offsets). */
export interface AssistantSpan {
  /** message index, or -1 when a template's generation blocks do not pair up with the assistant messages */
  turn: number;
  start: number;
  end: number;
}

export interface LocatedChat {
  text: string;
  spans: AssistantSpan[];
  /** 'generation': the template's markers; 'located': found from prefix renders */
  method: 'generation' | 'located';
}

/** A private-use character no template strips or reformats, appended to a message's content to see where it lands. */
const SENTINEL = '\uE000';

function field(m: unknown, key: string): unknown {
  return isDict(m) ? m.get(key) : (m as Record<string, unknown> | null)?.[key];
}

function withContent(m: unknown, content: string): unknown {
  if (isDict(m)) return new Map([...m, ['content', content]]);
  return { ...(m as Record<string, unknown>), content };
}

/** Where message i's content begins in the full render F: a sentinel put before the content must appear there as
 *  a single clean insertion (before its leading whitespace, or after it when the template strips it), else -1. */
function contentStart(tok: ChatRenderer, messages: readonly unknown[], i: number, F: string, opts: ChatTemplateOptions): number {
  const content = field(messages[i], 'content');
  if (typeof content !== 'string' || content.trim() === '') return -1;
  const lead = content.length - content.replace(/^\s+/u, '').length;
  for (const probe of [SENTINEL + content, content.slice(0, lead) + SENTINEL + content.slice(lead)]) {
    try {
      const at = insertionPoint(F, tok.renderChat(messages.map((m, j) => (j === i ? withContent(m, probe) : m)), { ...opts, addGenerationPrompt: false }).text, SENTINEL);
      if (at >= 0) return at;
    } catch { /* no evidence */ }
    if (lead === 0) break;
  }
  return -1;
}

/** Index of the single place where `b` is `a` with `ins` inserted, or -1. */
function insertionPoint(a: string, b: string, ins: string): number {
  if (b.length !== a.length + ins.length) return -1;
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  return b.startsWith(ins, i) && b.slice(i + ins.length) === a.slice(i) ? i : -1;
}

/** The rendered conversation and its assistant spans. `opts` carries the record's tools and template variables. */
export function locateAssistantTurns(tok: ChatRenderer, messages: readonly unknown[], opts: ChatTemplateOptions = {}): LocatedChat {
  const full = tok.renderChat(messages, { ...opts, addGenerationPrompt: false });
  const F = full.text;
  const assistants = messages.map((m, i) => (field(m, 'role') === 'assistant' ? i : -1)).filter((i) => i >= 0);
  if (tok.template(opts).hasGenerationMarkers) {
    const paired = full.generation.length === assistants.length;
    return { text: F, method: 'generation', spans: full.generation.map(([start, end], k) => ({ turn: paired ? assistants[k] : -1, start, end })) };
  }
  const spans: AssistantSpan[] = [];
  const render = (msgs: readonly unknown[], gen: boolean, i: number, what: string): string => {
    try {
      return tok.renderChat(msgs, { ...opts, addGenerationPrompt: gen }).text;
    } catch (e) {
      throw new ChatSpanError(i, `assistant turn messages[${i}]: cannot render ${what} to locate the turn (${(e as Error).message})`);
    }
  };
  for (const i of assistants) {
    const refuse = (why: string): never => {
      throw new ChatSpanError(i, `assistant turn messages[${i}]: ${why}; its tokens cannot be located exactly, so the record is refused (a chat template with {% generation %} markers avoids this)`);
    };
    // the turn starts where the template's generation prompt ends, if the conversation before it renders as a prefix
    const P = render(messages.slice(0, i), true, i, 'the conversation before it with the generation prompt');
    let start = P.length;
    if (!F.startsWith(P)) {
      // a template that moves text between turns (Mistral puts the system message into the LAST user turn) renders the
      // conversation before the turn differently; with no generation prompt the turn is its content, found in place
      const P0 = render(messages.slice(0, i), false, i, 'the conversation before it');
      const at = P === P0 ? contentStart(tok, messages, i, F, opts) : -1;
      if (at < 0) refuse('the conversation before it renders differently on its own (with the generation prompt) than inside the whole conversation');
      start = at;
    }
    // it ends where the conversation up to it ends, if that too renders as a prefix of the whole ...
    const Q = render(messages.slice(0, i + 1), false, i, 'the conversation up to it');
    let end = -1;
    if (Q.length > start && F.startsWith(Q)) end = Q.length;
    else if (start === P.length && Q.startsWith(P)) {
      // ... else the turn renders differently when it is last (a reasoning block the template keeps only on the last
      // turns): the turn as rendered inside the conversation must be a suffix of its last-turn rendering, exactly one way
      const last = Q.slice(P.length);
      const ends: number[] = [];
      for (let k = 1; k <= last.length && start + k <= F.length; k++) if (F.startsWith(last.slice(last.length - k), start)) ends.push(start + k);
      if (ends.length !== 1) refuse(ends.length === 0 ? 'its text inside the conversation is not a suffix of its text as the last turn' : `${ends.length} different ends fit its text`);
      end = ends[0];
    } else refuse('the conversation up to it does not start with the conversation before it');
    if (spans.length > 0 && start < spans[spans.length - 1].end) refuse('it overlaps the previous assistant turn');
    // check: the end of the message's content (a sentinel appended to it) must land inside the span
    const content = field(messages[i], 'content');
    if (typeof content === 'string' && content.trim() !== '') {
      const body = content.replace(/\s+$/u, '');
      const probe = messages.map((m, j) => (j === i ? withContent(m, body + SENTINEL + content.slice(body.length)) : m));
      let at = -1;
      try {
        at = insertionPoint(F, tok.renderChat(probe, { ...opts, addGenerationPrompt: false }).text, SENTINEL);
      } catch { /* a template that refuses the probe gives no evidence either way */ }
      if (at >= 0 && (at < start || at > end)) refuse(`its content ends at character ${at}, outside the located span [${start}, ${end})`);
    }
    spans.push({ turn: i, start, end });
  }
  return { text: F, method: 'located', spans };
}

/** Token mask from character spans, by transformers' return_assistant_tokens_mask rule: from the token holding a
 *  span's first character through the token holding its last one (offsets as the tokenizer reports them). */
export function tokenMaskFromSpans(offsets: readonly (readonly [number, number])[], spans: readonly { start: number; end: number }[]): Uint8Array {
  const mask = new Uint8Array(offsets.length);
  const charToToken = (c: number): number => {
    for (let t = 0; t < offsets.length; t++) if (offsets[t][0] <= c && c < offsets[t][1]) return t;
    return -1;
  };
  for (const { start, end } of spans) {
    const a = charToToken(start);
    if (a < 0) break; // transformers stops at a span that starts past the tokens (truncation)
    const b = charToToken(end - 1);
    // `end_token + 1 if end_token else len(input_ids)`: no token (or token 0) for the last character runs to the end
    const stop = b > 0 ? b + 1 : offsets.length;
    for (let t = a; t < stop; t++) mask[t] = 1;
  }
  return mask;
}
