// Shard blobs: round trip, the same bytes as the safetensors file writer, a pinned content hash (blobs are
// addressed by sha256, so the encoding must never drift), and malformed blobs rejected by name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeShard, encodeShard, shardKindOf, shardTensorNames, stageShardNames } from '../engine/formats/shard.ts';
import type { ShardTensors } from '../engine/formats/shard.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { quantizeNF4 } from '../engine/formats/nf4.ts';
import { sha256Hex } from '../protocol/hash.ts';
import { tinyLlamaConfig } from '../engine/model/random-model.ts';

function sample(): ShardTensors {
  const w = quantizeNF4(Float32Array.from({ length: 6 * 5 }, (_, i) => Math.sin(i) * 0.1), 6, 5, 32);
  return {
    nf4: new Map([['model.layers.0.self_attn.q_proj.weight', w]]),
    float: new Map([
      ['model.layers.0.input_layernorm.weight', { shape: [5], data: Float32Array.from([1, 0.5, -2, 3.25, 0]) }],
      ['model.layers.0.self_attn.q_proj.bias', { shape: [6], data: Float32Array.from([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) }],
    ]),
  };
}

test('shard: decode(encode(t)) = t, and re-encoding gives the same bytes', () => {
  const t = sample();
  const blob = encodeShard(t);
  const back = decodeShard(blob, 'blob');
  assert.deepEqual([...back.nf4.keys()], [...t.nf4.keys()]);
  for (const [name, w] of t.nf4) assert.deepEqual(back.nf4.get(name), w);
  assert.deepEqual([...back.float.keys()].sort(), [...t.float.keys()].sort());
  for (const [name, f] of t.float) assert.deepEqual(back.float.get(name), f);
  assert.deepEqual(encodeShard(back), blob);
});

test('shard: the bytes are what the safetensors file writer writes, and their sha256 is pinned', async () => {
  const t = sample();
  const blob = encodeShard(t);
  const dir = await mkdtemp(join(tmpdir(), 'shard-test-'));
  try {
    const w = t.nf4.get('model.layers.0.self_attn.q_proj.weight')!;
    await writeSafetensors(join(dir, 'x.safetensors'), [
      { name: 'model.layers.0.self_attn.q_proj.weight', dtype: 'U8', shape: [w.packed.length, 1], data: w.packed },
      { name: 'model.layers.0.self_attn.q_proj.weight.absmax', dtype: 'F32', shape: [(w.absmax as Float32Array).length], data: w.absmax as Float32Array },
      ...[...t.float].map(([name, f]) => ({ name, dtype: 'F32' as const, shape: f.shape, data: f.data })),
    ], { format: 'pt', 'swarmtune.nf4': JSON.stringify({ 'model.layers.0.self_attn.q_proj.weight': [6, 5, 32] }) });
    assert.deepEqual(new Uint8Array(await readFile(join(dir, 'x.safetensors'))), blob);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  // every coordinator must produce the same blob for the same tensors (these are the hashes of the encoder
  // that protocol/shard.ts had before it moved here): a changed encoding changes them
  assert.equal(sha256Hex(blob), '5081dce09ea7d985b7db1f90916ab824defb02f2b23e288778246963697c9139');
  assert.equal(sha256Hex(encodeShard({ nf4: new Map(), float: new Map() })), '5c6dbb679162cc1368eb1d9e4813c7bce4232eb71f373c96a5c50f37a7104e7a');
});

test('shard: malformed blobs are refused with a typed error', () => {
  const blob = encodeShard(sample());
  assert.throws(() => decodeShard(blob.subarray(0, 5), 'short'), { name: 'SafetensorsError', message: /short: file is 5 bytes/ });
  assert.throws(() => decodeShard(blob.subarray(0, blob.length - 1), 'cut'), { name: 'SafetensorsError', message: /cut: / });
  const empty = encodeShard({ nf4: new Map(), float: new Map() });
  const t = sample();
  const noAbsmax = new Map([...t.nf4].map(([n, w]) => [n, { ...w, absmax: new Float32Array(0) }]));
  assert.throws(() => decodeShard(encodeShard({ nf4: noAbsmax, float: new Map() }), 'nf4'), { name: 'ShardError', message: /nf4: NF4 tensor model\.layers\.0\.self_attn\.q_proj\.weight/ });
  assert.equal(decodeShard(empty, 'empty').float.size, 0);
  assert.throws(() => shardKindOf('layer.x'), { name: 'ShardError' });
});

test('shard names: a layer holds its norms and seven linears (biases optional); stages list their blobs', () => {
  const cfg = tinyLlamaConfig({ numHiddenLayers: 3 });
  const names = shardTensorNames(cfg, shardKindOf('layer.2'));
  assert.deepEqual(names.float, ['model.layers.2.input_layernorm.weight', 'model.layers.2.post_attention_layernorm.weight']);
  assert.deepEqual(names.nf4, ['q_proj', 'k_proj', 'v_proj', 'o_proj'].map((m) => `model.layers.2.self_attn.${m}.weight`)
    .concat(['gate_proj', 'up_proj', 'down_proj'].map((m) => `model.layers.2.mlp.${m}.weight`)));
  assert.deepEqual(names.optionalFloat, names.nf4.map((n) => n.replace(/weight$/, 'bias')));
  assert.deepEqual(shardTensorNames(cfg, { kind: 'head' }).float, ['model.norm.weight', 'lm_head.weight']);
  assert.deepEqual(stageShardNames(cfg, 0, 1), ['embed', 'layer.0']);
  assert.deepEqual(stageShardNames({ ...cfg, tieWordEmbeddings: true }, 1, 3), ['embed', 'layer.1', 'layer.2', 'head']);
});
