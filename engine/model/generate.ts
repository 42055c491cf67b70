// Autoregressive generation over a whole-model stage with a KV cache: greedy, or sampling with temperature,
// top-k and top-p, after HF's repetition penalty (transformers' order: processors, then temperature, top_k, top_p).
import type { Decodable } from './decode.ts';
import { Rng } from './rng.ts';

export interface GenerateOptions {
  maxNewTokens: number;
  /** 0 = greedy (argmax); default 1 */
  temperature?: number;
  /** nucleus sampling mass in (0, 1]; default 1 (off) */
  topP?: number;
  /** keep the k most likely tokens (ties at the k-th kept, as transformers); 0 = off (default) */
  topK?: number;
  /** HF repetition_penalty over the prompt and the tokens so far; 1 = off (default) */
  repetitionPenalty?: number;
  /** sampling seed (same seed ⇒ same text on any machine); default 0 */
  seed?: number;
  /** generation stops after emitting one of these (the eos token is included in the output) */
  eosTokenIds?: number[];
  /** called with each new token as soon as it is chosen */
  onToken?: (id: number) => void;
  signal?: AbortSignal;
}

/** index of the largest logit (lowest index on ties, as torch.argmax) */
export function argmax(logits: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/** HF RepetitionPenaltyLogitsProcessor in place: each token already seen has its logit divided by the
 *  penalty when positive and multiplied by it when negative. */
export function applyRepetitionPenalty(logits: Float32Array, seen: Iterable<number>, penalty: number): void {
  if (!(penalty > 0)) throw new RangeError(`repetition_penalty must be > 0, got ${penalty}`);
  if (penalty === 1) return;
  for (const id of new Set(seen)) {
    const v = logits[id];
    logits[id] = v < 0 ? v * penalty : v / penalty;
  }
}

/** Sample one token id from logits with HF semantics: logits / temperature; with topK > 0 only tokens at
 *  least as likely as the k-th stay; softmax over those, then keep the smallest set of most likely tokens
 *  whose mass reaches topP (always at least one). temperature 0 is greedy. */
export function sampleToken(logits: ArrayLike<number>, temperature: number, topP: number, rng: Rng, topK = 0): number {
  if (!(temperature >= 0)) throw new RangeError(`temperature must be >= 0, got ${temperature}`);
  if (!(topP > 0 && topP <= 1)) throw new RangeError(`top_p must be in (0, 1], got ${topP}`);
  if (!(Number.isInteger(topK) && topK >= 0)) throw new RangeError(`top_k must be a non-negative integer, got ${topK}`);
  if (temperature === 0) return argmax(logits);
  const n = logits.length;
  let kth = -Infinity;
  if (topK > 0 && topK < n) kth = Float64Array.from(logits).sort()[n - topK];
  let mx = -Infinity;
  for (let i = 0; i < n; i++) if (logits[i] > mx) mx = logits[i];
  const p = new Float64Array(n);
  let sum = 0;
  for (let i = 0; i < n; i++) { p[i] = logits[i] >= kth ? Math.exp((logits[i] - mx) / temperature) : 0; sum += p[i]; }
  for (let i = 0; i < n; i++) p[i] /= sum;
  let candidates: number[];
  if (topP < 1) {
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => p[b] - p[a] || a - b);
    candidates = [];
    let mass = 0;
    for (const i of order) {
      candidates.push(i);
      mass += p[i];
      if (mass >= topP) break;
    }
  } else {
    candidates = Array.from({ length: n }, (_, i) => i).filter((i) => p[i] > 0);
  }
  let total = 0;
  for (const i of candidates) total += p[i];
  const u = rng.nextFloat() * total;
  let acc = 0;
  for (const i of candidates) {
    acc += p[i];
    if (u < acc) return i;
  }
  return candidates[candidates.length - 1];
}

/** Generate up to maxNewTokens tokens after promptIds; returns only the new tokens. */
export async function generate(model: Decodable, promptIds: ArrayLike<number>, opts: GenerateOptions): Promise<number[]> {
  const { maxNewTokens } = opts;
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 0) throw new RangeError(`maxNewTokens must be a non-negative integer, got ${maxNewTokens}`);
  if (promptIds.length === 0) throw new RangeError('generate: the prompt has no tokens');
  const temperature = opts.temperature ?? 1;
  const topP = opts.topP ?? 1;
  const topK = opts.topK ?? 0;
  const penalty = opts.repetitionPenalty ?? 1;
  const eos = new Set(opts.eosTokenIds ?? []);
  const rng = new Rng(opts.seed ?? 0, 0x47656e /* "Gen" */);
  const out: number[] = [];
  if (maxNewTokens === 0) return out;
  const decoder = model.createDecoder(promptIds.length + maxNewTokens);
  let logits = await decoder.append(promptIds);
  for (;;) {
    opts.signal?.throwIfAborted();
    if (penalty !== 1) applyRepetitionPenalty(logits, [...Array.from(promptIds), ...out], penalty);
    const id = sampleToken(logits, temperature, topP, rng, topK);
    out.push(id);
    opts.onToken?.(id);
    if (eos.has(id) || out.length >= maxNewTokens) break;
    logits = await decoder.append([id]);
  }
  return out;
}
