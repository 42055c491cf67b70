// Tokenizer of a HF model dir (tokenizer.json + tokenizer_config.json) and its Jinja chat template.
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';

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
  /** a named template when tokenizer_config.json holds several (default "default") */
  templateName?: string;
  /** extra template variables (tools, documents, date_string, ...) */
  variables?: Record<string, unknown>;
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
  private readonly compiled = new Map<string, Template>();

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
    return this.tok.decode(Array.from(ids), { skip_special_tokens: skipSpecial });
  }

  tokenToId(token: string): number | null { return this.tok.token_to_id(token) ?? null; }
  idToToken(id: number): string | null { return this.tok.id_to_token(id) ?? null; }

  get hasChatTemplate(): boolean { return this.templates.size > 0; }

  /** Render the chat template as transformers' apply_chat_template(tokenize=False) does. The template may
   *  call raise_exception(msg), which surfaces as a TokenizerError. */
  applyChatTemplate(messages: ChatMessage[], opts: ChatTemplateOptions = {}): string {
    const name = opts.templateName ?? 'default';
    const src = this.templates.get(name);
    if (src === undefined) {
      throw new TokenizerError(this.templates.size === 0
        ? `${this.source}: tokenizer_config.json has no chat_template`
        : `${this.source}: no chat template named ${JSON.stringify(name)} (have ${[...this.templates.keys()].join(', ')})`);
    }
    let tpl = this.compiled.get(name);
    if (!tpl) {
      try {
        tpl = new Template(src);
      } catch (e) {
        throw new TokenizerError(`${this.source}: chat_template ${JSON.stringify(name)} does not parse: ${(e as Error).message}`);
      }
      this.compiled.set(name, tpl);
    }
    try {
      return tpl.render({
        messages,
        add_generation_prompt: opts.addGenerationPrompt ?? false,
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
        pad_token: this.padToken ?? '',
        unk_token: this.unkToken ?? '',
        ...opts.variables,
      });
    } catch (e) {
      throw new TokenizerError(`${this.source}: chat template: ${(e as Error).message}`);
    }
  }
}
