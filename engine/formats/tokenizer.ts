// Tokenizer of a HF model dir (tokenizer.json + tokenizer_config.json) and its Jinja chat template.
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { ChatTemplate, TemplateError } from './jinja.ts';
import type { RenderResult } from './jinja.ts';

export class TokenizerError extends Error {
  override readonly name = 'TokenizerError';
}

export interface ChatMessage {
  role: string;
  content: string;
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** append the assistant header so the model continues as the assistant (default false) */
  addGenerationPrompt?: boolean;
  /** a named template when tokenizer_config.json holds several (default "default", or "tool_use" when tools are given
   *  and the tokenizer has such a template, as transformers picks) */
  templateName?: string;
  /** the record's tool definitions, passed as the template's `tools` (omitted when null/undefined, as transformers) */
  tools?: unknown[] | null;
  /** extra template variables (documents, date_string, enable_thinking, ...) */
  variables?: Record<string, unknown>;
}

/** Token ids with each token's [start, end) in the encoded text (UTF-16 offsets; a character split across byte-level
 *  tokens belongs to each of them), the offsets transformers' char_to_token reads. */
export interface EncodingWithOffsets {
  ids: number[];
  offsets: [number, number][];
}

/** GPT-2's byte-to-printable-character table that byte-level BPE vocabularies are written in, inverted. */
function byteLevelDecoder(): Map<string, number> {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  return new Map(bs.map((b, i) => [String.fromCodePoint(cs[i]), b]));
}

type SurfaceKind = 'bytelevel' | 'metaspace';

/** Which spelling the vocabulary uses, from the decoder (ByteLevel, or Metaspace / Replace("▁"," ") + ByteFallback). */
function surfaceKind(tokenizerJson: Record<string, unknown>): SurfaceKind | null {
  const types: string[] = [];
  const walk = (d: unknown): void => {
    if (!d || typeof d !== 'object') return;
    const o = d as { type?: unknown; decoders?: unknown[] };
    if (typeof o.type === 'string') types.push(o.type);
    if (Array.isArray(o.decoders)) o.decoders.forEach(walk);
  };
  walk(tokenizerJson.decoder);
  if (types.includes('ByteLevel')) return 'bytelevel';
  if (types.includes('Metaspace') || (types.includes('Replace') && types.includes('ByteFallback'))) return 'metaspace';
  return null;
}

/** tokenizer_config.json writes special tokens as a string or as an AddedToken dict {"content": ...}. */
function tokenString(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return null;
}

export class Tokenizer {
  readonly source: string;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly padToken: string | null;
  readonly unkToken: string | null;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  readonly padTokenId: number | null;
  /** vocabulary size including added tokens (max id + 1) */
  readonly vocabSize: number;
  private readonly tok: HfTokenizer;
  private readonly templates: Map<string, string>;
  private readonly compiled = new Map<string, ChatTemplate>();
  private readonly surface: SurfaceKind | null;
  private readonly addedTokens = new Map<number, string>();
  private byteLevel: Map<string, number> | null = null;
  /** strftime_now's clock (tests pin it) */
  now: () => Date = () => new Date();

  constructor(tokenizerJson: unknown, tokenizerConfig: unknown, source = 'tokenizer', chatTemplateOverride?: string) {
    this.source = source;
    if (typeof tokenizerJson !== 'object' || tokenizerJson === null || !('model' in tokenizerJson)) {
      throw new TokenizerError(`${source}: tokenizer.json must be an object with a "model"`);
    }
    const cfg: Record<string, unknown> = typeof tokenizerConfig === 'object' && tokenizerConfig !== null ? { ...(tokenizerConfig as Record<string, unknown>) } : {};
    for (const k of ['bos_token', 'eos_token', 'pad_token', 'unk_token', 'sep_token', 'cls_token', 'mask_token']) {
      if (k in cfg) cfg[k] = tokenString(cfg[k]) ?? undefined;
    }
    try {
      this.tok = new HfTokenizer(tokenizerJson, cfg);
    } catch (e) {
      throw new TokenizerError(`${source}: cannot build the tokenizer: ${(e as Error).message}`);
    }
    const id = (t: string | null, key: string): number | null => {
      if (t === null) return null;
      const i = this.tok.token_to_id(t);
      if (i === undefined) throw new TokenizerError(`${source}: tokenizer_config.json ${key} ${JSON.stringify(t)} is not in the vocabulary`);
      return i;
    };
    this.bosToken = (cfg.bos_token as string | undefined) ?? null;
    this.eosToken = (cfg.eos_token as string | undefined) ?? null;
    this.padToken = (cfg.pad_token as string | undefined) ?? null;
    this.unkToken = (cfg.unk_token as string | undefined) ?? null;
    this.bosTokenId = id(this.bosToken, 'bos_token');
    this.eosTokenId = id(this.eosToken, 'eos_token');
    this.padTokenId = id(this.padToken, 'pad_token');
    let maxId = -1;
    for (const v of this.tok.get_vocab(true).values()) if (v > maxId) maxId = v;
    this.vocabSize = maxId + 1;
    this.surface = surfaceKind(tokenizerJson as Record<string, unknown>);
    const added = (tokenizerJson as { added_tokens?: unknown }).added_tokens;
    if (Array.isArray(added)) {
      for (const t of added) if (t && typeof t.id === 'number' && typeof t.content === 'string') this.addedTokens.set(t.id, t.content);
    }
    this.templates = new Map();
    const ct = chatTemplateOverride ?? cfg.chat_template;
    if (typeof ct === 'string') this.templates.set('default', ct);
    else if (Array.isArray(ct)) {
      for (const e of ct) {
        if (e && typeof e.name === 'string' && typeof e.template === 'string') this.templates.set(e.name, e.template);
      }
    } else if (ct && typeof ct === 'object') {
      for (const [k, v] of Object.entries(ct)) if (typeof v === 'string') this.templates.set(k, v);
    }
  }

  /** Load from a model dir; null when it has no tokenizer.json. A chat_template.jinja file (newer
   *  transformers) takes precedence over tokenizer_config.json's chat_template. */
  static async fromDir(dir: string): Promise<Tokenizer | null> {
    const tjPath = join(dir, 'tokenizer.json');
    if (!existsSync(tjPath)) return null;
    const readJson = async (p: string): Promise<unknown> => {
      try {
        return JSON.parse(await readFile(p, 'utf8'));
      } catch (e) {
        throw new TokenizerError(`${p}: ${(e as Error).message}`);
      }
    };
    const tj = await readJson(tjPath);
    const tcPath = join(dir, 'tokenizer_config.json');
    const tc = existsSync(tcPath) ? await readJson(tcPath) : {};
    const jinjaPath = join(dir, 'chat_template.jinja');
    const override = existsSync(jinjaPath) ? await readFile(jinjaPath, 'utf8') : undefined;
    return new Tokenizer(tj, tc, dir, override);
  }

  /** Token ids exactly as HF's tokenizer(text): special tokens only where the post-processor adds them. */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    return this.tok.encode(text, { add_special_tokens: opts.addSpecialTokens ?? true }).ids;
  }

  decode(ids: ArrayLike<number>, skipSpecial = false): string {
    // no tokens decode to no text, as in transformers (the JS library throws on an empty list)
    if (ids.length === 0) return '';
    return this.tok.decode(Array.from(ids), { skip_special_tokens: skipSpecial });
  }

  /** Token ids and their character offsets in `text`. Throws when the tokens do not spell the text back (a
   *  normalizer that rewrote it, or a vocabulary spelling we cannot read), so no mask is ever guessed. */
  encodeWithOffsets(text: string, opts: { addSpecialTokens?: boolean } = {}): EncodingWithOffsets {
    const ids = this.encode(text, opts);
    if (this.surface === null) throw new TokenizerError(`${this.source}: cannot map tokens to characters for this tokenizer's decoder`);
    const bytes = Buffer.from(text, 'utf8');
    // utf16At[b] = UTF-16 offset of the character holding byte b
    const utf16At = new Int32Array(bytes.length + 1);
    let u = 0, b = 0;
    for (const ch of text) {
      const n = Buffer.byteLength(ch, 'utf8');
      for (let k = 0; k < n; k++) utf16At[b + k] = u;
      b += n;
      u += ch.length;
    }
    utf16At[bytes.length] = u;
    // a token ending inside a multi-byte character still covers that whole character
    const utf16End = (e: number): number => {
      while (e < bytes.length && (bytes[e] & 0xc0) === 0x80) e++;
      return utf16At[e];
    };
    const offsets: [number, number][] = [];
    let p = 0;
    const fail = (i: number, why: string): never => {
      throw new TokenizerError(`${this.source}: token ${i} (${JSON.stringify(this.idToToken(ids[i]))}) ${why} at character ${utf16At[Math.min(p, bytes.length)]}; cannot map tokens to characters`);
    };
    for (let i = 0; i < ids.length; i++) {
      const surf = this.tokenBytes(ids[i]);
      const start = p;
      if (surf.length > 0 && bytes.subarray(p, p + surf.length).equals(surf)) p += surf.length;
      else if (this.surface === 'metaspace' && surf[0] === 0x20 && bytes.subarray(p, p + surf.length - 1).equals(surf.subarray(1))) {
        p += surf.length - 1; // the "▁" a Metaspace pre-tokenizer prepends is not in the text
      } else if (opts.addSpecialTokens !== false && this.addedTokens.has(ids[i])) {
        offsets.push([utf16At[p], utf16At[p]]); // a special token the post-processor added (BOS, EOS)
        continue;
      } else return fail(i, 'does not match the text');
      offsets.push([utf16At[start], utf16End(p)]);
    }
    if (p !== bytes.length) fail(ids.length - 1, `leaves ${bytes.length - p} bytes unread`);
    return { ids, offsets };
  }

  private tokenBytes(id: number): Buffer {
    const added = this.addedTokens.get(id);
    if (added !== undefined) return Buffer.from(added, 'utf8');
    const t = this.idToToken(id);
    if (t === null) throw new TokenizerError(`${this.source}: id ${id} is not in the vocabulary`);
    if (this.surface === 'bytelevel') {
      this.byteLevel ??= byteLevelDecoder();
      const out: number[] = [];
      for (const c of t) {
        const v = this.byteLevel.get(c);
        if (v === undefined) return Buffer.from(t, 'utf8');
        out.push(v);
      }
      return Buffer.from(out);
    }
    const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(t);
    if (hex) return Buffer.from([parseInt(hex[1], 16)]);
    return Buffer.from(t.replace(/\u2581/g, ' '), 'utf8');
  }

  tokenToId(token: string): number | null { return this.tok.token_to_id(token) ?? null; }
  idToToken(id: number): string | null { return this.tok.id_to_token(id) ?? null; }

  get hasChatTemplate(): boolean { return this.templates.size > 0; }

  /** Render the chat template as transformers' apply_chat_template(tokenize=False) does. The template may
   *  call raise_exception(msg), which surfaces as a TokenizerError. */
  applyChatTemplate(messages: readonly unknown[], opts: ChatTemplateOptions = {}): string {
    return this.renderChat(messages, opts).text;
  }

  /** The rendered text and the character spans of its {% generation %} blocks (transformers'
   *  return_assistant_tokens_mask reads the same spans). Every message key and the record's `tools` reach the
   *  template unchanged. */
  renderChat(messages: readonly unknown[], opts: ChatTemplateOptions = {}): RenderResult {
    const tpl = this.template(opts);
    const vars: Record<string, unknown> = {
      messages,
      add_generation_prompt: opts.addGenerationPrompt ?? false,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
      pad_token: this.padToken ?? '',
      unk_token: this.unkToken ?? '',
    };
    if (opts.tools !== undefined && opts.tools !== null) vars.tools = opts.tools;
    Object.assign(vars, opts.variables);
    try {
      return tpl.render(vars);
    } catch (e) {
      throw new TokenizerError(`${this.source}: chat template: ${(e as Error).message}`);
    }
  }

  /** The compiled template transformers would pick: the named one, else "tool_use" when tools are given and the
   *  tokenizer has one, else "default". */
  template(opts: ChatTemplateOptions = {}): ChatTemplate {
    const name = opts.templateName ?? (opts.tools && this.templates.has('tool_use') ? 'tool_use' : 'default');
    const src = this.templates.get(name);
    if (src === undefined) {
      throw new TokenizerError(this.templates.size === 0
        ? `${this.source}: tokenizer_config.json has no chat_template`
        : `${this.source}: no chat template named ${JSON.stringify(name)} (have ${[...this.templates.keys()].join(', ')})`);
    }
    let tpl = this.compiled.get(name);
    if (!tpl) {
      try {
        tpl = new ChatTemplate(src, { now: () => this.now() });
      } catch (e) {
        throw new TokenizerError(`${this.source}: chat_template ${JSON.stringify(name)} ${e instanceof TemplateError ? e.message : `does not parse: ${(e as Error).message}`}`);
      }
      this.compiled.set(name, tpl);
    }
    return tpl;
  }
}
