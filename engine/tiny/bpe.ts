// A small deterministic byte-level BPE trainer (GPT-2 / Llama 3 style) used to build the tiny model's tokenizer.json.
//
// Pre-tokenization follows Llama 3's split regex, then GPT-2's bytes→unicode map, so the produced
// vocab/merges load in Hugging Face tokenizers (Rust) and @huggingface/tokenizers (JS) unchanged.

/** Llama 3's pre-tokenizer pattern, written as the Oniguruma source that goes into tokenizer.json. */
export const LLAMA3_SPLIT_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// The same pattern in JavaScript syntax: `(?i:...)` has no JS equivalent before ES2025 modifiers, so the
// contractions are spelled out case by case.
const LLAMA3_SPLIT_JS =
  /'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+/gu;

/** GPT-2's reversible byte → printable unicode char map (index = byte value). */
export function bytesToUnicode(): string[] {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const table: string[] = new Array(256);
  const isPrintable = new Set(printable);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = isPrintable.has(b) ? String.fromCodePoint(b) : String.fromCodePoint(256 + n++);
  }
  return table;
}

const BYTE_CHARS = bytesToUnicode();
const utf8 = new TextEncoder();

/** Split text into byte-level pre-tokens (each a string of byte chars), as the tokenizer.json pipeline does. */
export function preTokenize(text: string): string[] {
  const out: string[] = [];
  for (const m of text.matchAll(LLAMA3_SPLIT_JS)) {
    let s = '';
    for (const b of utf8.encode(m[0])) s += BYTE_CHARS[b];
    out.push(s);
  }
  return out;
}

export interface BpeModel {
  /** token string → id; ids 0..255 are the single bytes in byte order, then one id per merge */
  vocab: Map<string, number>;
  merges: [string, string][];
}

export interface BpeTrainOptions {
  /** stop once the base vocabulary (256 bytes + merges) reaches this size */
  maxVocabSize: number;
  /** a pair must occur at least this often (weighted by word frequency) to be merged */
  minFrequency: number;
}

/** Train merges on `texts`. Ties between equally frequent pairs go to the lexicographically smallest
 *  (left, right) pair by UTF-16 code units, so the result does not depend on Map iteration details. */
export function trainBpe(texts: readonly string[], opts: BpeTrainOptions): BpeModel {
  if (opts.maxVocabSize < 256) throw new RangeError(`trainBpe: maxVocabSize ${opts.maxVocabSize} < 256 byte tokens`);
  const wordCounts = new Map<string, number>();
  for (const t of texts) for (const w of preTokenize(t)) wordCounts.set(w, (wordCounts.get(w) ?? 0) + 1);
  // Sorted so that the words' order (and so every later loop) is independent of insertion order.
  const words = [...wordCounts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .map(([w, count]) => ({ symbols: Array.from(w), count }));

  const vocab = new Map<string, number>();
  for (const c of BYTE_CHARS) vocab.set(c, vocab.size);
  const merges: [string, string][] = [];

  // The corpus is tiny (a few thousand symbols), so recounting all pairs each round is fast enough and
  // far simpler to get right than incremental pair bookkeeping.
  while (vocab.size < opts.maxVocabSize) {
    const pairCounts = new Map<string, number>();
    for (const w of words) {
      for (let i = 0; i + 1 < w.symbols.length; i++) {
        const key = w.symbols[i] + '\u0000' + w.symbols[i + 1];
        pairCounts.set(key, (pairCounts.get(key) ?? 0) + w.count);
      }
    }
    let bestKey: string | null = null;
    let bestCount = 0;
    for (const [key, count] of pairCounts) {
      if (count > bestCount || (count === bestCount && bestKey !== null && key < bestKey)) {
        bestKey = key;
        bestCount = count;
      }
    }
    if (bestKey === null || bestCount < opts.minFrequency) break;
    const [left, right] = bestKey.split('\u0000') as [string, string];
    const merged = left + right;
    merges.push([left, right]);
    if (!vocab.has(merged)) vocab.set(merged, vocab.size);
    for (const w of words) {
      const s = w.symbols;
      for (let i = 0; i + 1 < s.length; i++) {
        if (s[i] === left && s[i + 1] === right) s.splice(i, 2, merged);
      }
    }
  }
  return { vocab, merges };
}

/** Reference encoder for one pre-token: repeatedly apply the lowest-ranked merge present (standard BPE).
 *  Used by tests to check that tokenizer libraries agree with the trainer. */
export function bpeEncodeWord(word: string, ranks: ReadonlyMap<string, number>): string[] {
  const s = Array.from(word);
  for (;;) {
    let best = -1;
    let bestRank = Infinity;
    for (let i = 0; i + 1 < s.length; i++) {
      const r = ranks.get(s[i] + '\u0000' + s[i + 1]);
      if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
    }
    if (best < 0) return s;
    s.splice(best, 2, s[best] + s[best + 1]);
  }
}

export function mergeRanks(merges: readonly [string, string][]): Map<string, number> {
  return new Map(merges.map(([a, b], i) => [a + '\u0000' + b, i]));
}
