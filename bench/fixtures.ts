// Bench fixtures: an HF model directory with the bench model's shape (the tiny model's tokenizer and chat
// template, random float32 weights drawn like the tiny model's) and a JSONL of long texts, so that
// `swarmtune train` and `swarmtune launch` run the same model and settings as bench/model.ts.
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { tinyWeights, TINY_TEXT_FILES } from '../engine/tiny/index.ts';
import { TINY_DATA_DIR } from '../engine/tiny/files.ts';
import { BENCH_MODEL } from './model.ts';

/** Write (once per dir) the bench-shaped model dir and return its path. */
export async function ensureBenchModelDir(dir: string, shape: { layers: number; hidden: number; heads: number; kvHeads: number; headDim: number; intermediate: number; vocab: number } = BENCH_MODEL): Promise<string> {
  const stamp = path.join(dir, '.bench-model');
  const key = JSON.stringify(shape);
  if (existsSync(stamp) && (await readFile(stamp, 'utf8')) === key) return dir;
  await mkdir(dir, { recursive: true });
  for (const name of TINY_TEXT_FILES) {
    const text = await readFile(path.join(TINY_DATA_DIR, name), 'utf8');
    if (name !== 'config.json') { await writeFile(path.join(dir, name), text); continue; }
    const cfg = JSON.parse(text) as Record<string, unknown>;
    Object.assign(cfg, {
      hidden_size: shape.hidden, intermediate_size: shape.intermediate, num_hidden_layers: shape.layers,
      num_attention_heads: shape.heads, num_key_value_heads: shape.kvHeads, head_dim: shape.headDim,
      vocab_size: shape.vocab, max_position_embeddings: 2048,
    });
    await writeFile(path.join(dir, name), JSON.stringify(cfg, null, 2));
  }
  const cfg = JSON.parse(await readFile(path.join(dir, 'config.json'), 'utf8'));
  await writeSafetensors(path.join(dir, 'model.safetensors'), tinyWeights(cfg, 7), { format: 'pt' });
  await writeFile(stamp, key);
  return dir;
}

/** A JSONL of `n` {"text"} records, each long enough to fill max_seq_length 256 of the tiny tokenizer
 *  (so every micro-batch is batch x 256 tokens, like the model bench). Deterministic. */
export async function writeLongTextData(file: string, n = 64): Promise<string> {
  const syll = ['ka', 'lo', 'mi', 'ren', 'sa', 'tor', 'vel', 'quin', 'dra', 'sol', 'mer', 'ys', 'the', 'and', 'of', 'river', 'sea', 'glass'];
  let s = 99;
  const next = () => { s = (s * 1103515245 + 12345) >>> 0; return s >>> 8; };
  const lines: string[] = [];
  for (let r = 0; r < n; r++) {
    const words: string[] = [];
    for (let w = 0; w < 400; w++) {
      let word = '';
      for (let k = 0, m = 1 + (next() % 3); k < m; k++) word += syll[next() % syll.length];
      words.push(word);
    }
    lines.push(JSON.stringify({ text: words.join(' ') + '.' }));
  }
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, lines.join('\n') + '\n');
  return file;
}
