// Builds the tiny model's text files (tokenizer.json, tokenizer_config.json, config.json, generation_config.json)
// deterministically from the bundled QA dataset; engine/tiny/build.ts writes them, tests rebuild and compare bytes.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { LLAMA3_SPLIT_PATTERN, trainBpe } from './bpe.ts';

export const TINY_DATA_DIR = join(import.meta.dirname, 'data');
/** The bundled question/answer dataset: one {"question","answer"} object per line. */
export const TINY_DATASET_PATH = join(TINY_DATA_DIR, 'qa.jsonl');

/** The trainer's default system prompt for {"question","answer"} records; the tokenizer is trained on it so
 *  rendered chats stay short. */
export const TINY_SYSTEM_PROMPT = 'You are a helpful AI assistant.';

export const BOS_TOKEN = '<|begin_of_text|>';
export const EOT_TOKEN = '<|end_of_text|>';
export const IM_START_TOKEN = '<|im_start|>';
export const IM_END_TOKEN = '<|im_end|>';
export const PAD_TOKEN = '<|pad|>';
const SPECIAL_TOKENS = [BOS_TOKEN, EOT_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN];

/** Merges stop at this base-vocab size or when no pair occurs twice, whichever comes first. */
const MAX_BASE_VOCAB = 960;
const MIN_PAIR_FREQUENCY = 2;
/** The full vocab (bytes + merges + special tokens) is padded with Llama-3-style reserved special tokens
 *  to a multiple of 64, a friendlier shape for GEMM tiles and vocab chunks. */
const VOCAB_MULTIPLE = 64;

/** ChatML. No bos_token in the template: the post-processor adds BOS when the rendered text is encoded
 *  with special tokens, so the template adding one too would give two (the Llama 3 double-BOS pitfall). */
export const TINY_CHAT_TEMPLATE =
  "{%- for message in messages -%}" +
  "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}" +
  "{{- raise_exception('Unsupported chat role: ' + message['role']) -}}" +
  "{%- endif -%}" +
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}" +
  "{%- endfor -%}" +
  "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/** Architecture of the tiny model; vocab_size and special ids are filled in from the tokenizer. */
export const TINY_ARCH = {
  hiddenSize: 128,
  numHiddenLayers: 4,
  numAttentionHeads: 4,
  numKeyValueHeads: 2,
  intermediateSize: 344,
  maxPositionEmbeddings: 512,
  ropeTheta: 10000,
  rmsNormEps: 1e-5,
} as const;

export interface QaRecord { question: string; answer: string }

/** Parse the bundled dataset, naming file:line on any malformed record. */
export function readTinyDataset(path = TINY_DATASET_PATH): QaRecord[] {
  const lines = readFileSync(path, 'utf8').split('\n');
  const out: QaRecord[] = [];
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    let rec: unknown;
    try { rec = JSON.parse(line); } catch (e) { throw new Error(`${path}:${i + 1}: invalid JSON: ${(e as Error).message}`); }
    const r = rec as Record<string, unknown>;
    if (typeof r?.question !== 'string' || typeof r?.answer !== 'string') {
      throw new Error(`${path}:${i + 1}: expected {"question": string, "answer": string}, got ${line.slice(0, 80)}`);
    }
    out.push({ question: r.question, answer: r.answer });
  });
  return out;
}

/** The text the BPE is trained on: every record as the chat the trainer will render (special tokens
 *  removed, since they are added tokens and never go through the BPE) plus the bare answer. */
function trainingTexts(records: readonly QaRecord[]): string[] {
  const texts: string[] = [];
  for (const { question, answer } of records) {
    texts.push(`system\n${TINY_SYSTEM_PROMPT}\nuser\n${question}\nassistant\n${answer}\n`);
    texts.push(`${question} ${answer}`);
  }
  return texts;
}

export interface TinyTokenizerInfo {
  vocabSize: number;
  bosTokenId: number;
  eosTokenIds: number[];
  padTokenId: number;
}

export interface TinyFiles {
  /** file name → exact file contents */
  files: Record<string, string>;
  info: TinyTokenizerInfo;
}

/** Build every text file of the tiny model dir from the dataset. Pure: same dataset ⇒ same bytes. */
export function buildTinyFiles(datasetPath = TINY_DATASET_PATH): TinyFiles {
  const records = readTinyDataset(datasetPath);
  const { vocab, merges } = trainBpe(trainingTexts(records), { maxVocabSize: MAX_BASE_VOCAB, minFrequency: MIN_PAIR_FREQUENCY });
  const base = vocab.size;
  const specials = [...SPECIAL_TOKENS];
  const total = Math.ceil((base + specials.length) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE;
  for (let r = 0; base + specials.length < total; r++) specials.push(`<|reserved_special_token_${r}|>`);
  const specialId = (t: string) => base + specials.indexOf(t);

  const addedTokens = specials.map((content, i) => ({
    id: base + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
  }));
  const bosId = specialId(BOS_TOKEN);
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: LLAMA3_SPLIT_PATTERN }, behavior: 'Isolated', invert: false },
        { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
      ],
    },
    // Llama 3's post-processor: byte-level offsets, then BOS in front of each sequence.
    post_processor: {
      type: 'Sequence',
      processors: [
        { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
        {
          type: 'TemplateProcessing',
          single: [{ SpecialToken: { id: BOS_TOKEN, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
          pair: [
            { SpecialToken: { id: BOS_TOKEN, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } },
            { SpecialToken: { id: BOS_TOKEN, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } },
          ],
          special_tokens: { [BOS_TOKEN]: { id: BOS_TOKEN, ids: [bosId], tokens: [BOS_TOKEN] } },
        },
      ],
    },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: Object.fromEntries(vocab),
      merges,
    },
  };

  const addedTokensDecoder: Record<string, unknown> = {};
  for (const t of addedTokens) {
    addedTokensDecoder[String(t.id)] = { content: t.content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true };
  }
  const tokenizerConfig = {
    added_tokens_decoder: addedTokensDecoder,
    bos_token: BOS_TOKEN,
    chat_template: TINY_CHAT_TEMPLATE,
    clean_up_tokenization_spaces: false,
    eos_token: IM_END_TOKEN,
    model_input_names: ['input_ids', 'attention_mask'],
    model_max_length: TINY_ARCH.maxPositionEmbeddings,
    pad_token: PAD_TOKEN,
    tokenizer_class: 'PreTrainedTokenizerFast',
  };

  // <|im_end|> ends an assistant turn (what generation should stop at); <|end_of_text|> ends raw text.
  const eosIds = [specialId(IM_END_TOKEN), specialId(EOT_TOKEN)];
  const padId = specialId(PAD_TOKEN);
  const a = TINY_ARCH;
  const config = {
    architectures: ['LlamaForCausalLM'],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: bosId,
    eos_token_id: eosIds,
    head_dim: a.hiddenSize / a.numAttentionHeads,
    hidden_act: 'silu',
    hidden_size: a.hiddenSize,
    initializer_range: 0.02,
    intermediate_size: a.intermediateSize,
    max_position_embeddings: a.maxPositionEmbeddings,
    mlp_bias: false,
    model_type: 'llama',
    num_attention_heads: a.numAttentionHeads,
    num_hidden_layers: a.numHiddenLayers,
    num_key_value_heads: a.numKeyValueHeads,
    pad_token_id: padId,
    pretraining_tp: 1,
    rms_norm_eps: a.rmsNormEps,
    rope_scaling: null,
    rope_theta: a.ropeTheta,
    tie_word_embeddings: false,
    torch_dtype: 'float32',
    transformers_version: '4.46.0',
    use_cache: true,
    vocab_size: total,
  };
  const generationConfig = { bos_token_id: bosId, do_sample: false, eos_token_id: eosIds, pad_token_id: padId };

  const json = (v: unknown) => JSON.stringify(v, null, 2) + '\n';
  return {
    files: {
      'tokenizer.json': json(tokenizerJson),
      'tokenizer_config.json': json(tokenizerConfig),
      'config.json': json(config),
      'generation_config.json': json(generationConfig),
    },
    info: { vocabSize: total, bosTokenId: bosId, eosTokenIds: eosIds, padTokenId: padId },
  };
}
