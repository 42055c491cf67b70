// Shard blobs: round trip, the same bytes as the safetensors file writer, a pinned content hash (blobs are
// addressed by sha256, so the encoding must never drift), and malformed blobs rejected by name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeShard, decodeShardFile, encodeShard, writeShardFile, shardKindOf, shardTensorNames, stageShardNames } from '../engine/formats/shard.ts';
import type { ShardTensors } from '../engine/formats/shard.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { parseSafetensorsBytes } from '../engine/formats/safetensors/header.ts';
import { quantizeNF4, withDoubleQuant } from '../engine/formats/nf4.ts';
import { defaultDynamicMap } from '../engine/formats/dynamic-map.ts';
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

test('shard: written to a file tensor by tensor and decoded from it by range, it gives what decoding the bytes gives (plain and double-quantized); a cut file is refused', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shard-file-'));
  try {
    const t = sample();
    const dq = withDoubleQuant(quantizeNF4(Float32Array.from({ length: 64 * 8 }, (_, i) => Math.cos(i) * 0.2), 64, 8, 64));
    t.nf4.set('model.layers.0.mlp.down_proj.weight', dq);
    const blob = encodeShard(t);
    const f = join(dir, 'blob');
    await writeShardFile(t, f);
    assert.deepEqual(new Uint8Array(await readFile(f)), blob, 'written tensor by tensor: the same bytes as encodeShard');
    const fromFile = await decodeShardFile(f, 'blob');
    assert.deepEqual(fromFile, t);
    assert.deepEqual(fromFile, decodeShard(blob, 'blob'));
    await writeFile(f, blob.subarray(0, blob.length - 1));
    await assert.rejects(decodeShardFile(f, 'cut'), { name: 'SafetensorsError' });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
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

test('shard: double-quantized NF4 round trips in its 8-bit form (bitsandbytes names), the float32 form stays readable', () => {
  const t = sample();
  const plain = t.nf4.get('model.layers.0.self_attn.q_proj.weight')!;
  // 300×129 at blocksize 64: 605 blocks, three nested blocks (the last partial)
  const big = withDoubleQuant(quantizeNF4(Float32Array.from({ length: 300 * 129 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 11))), 300, 129));
  const dq: ShardTensors = { nf4: new Map([['model.layers.0.self_attn.q_proj.weight', withDoubleQuant(plain)], ['model.layers.0.mlp.up_proj.weight', big]]), float: t.float };
  const blob = encodeShard(dq);
  const back = decodeShard(blob, 'blob');
  for (const [name, w] of dq.nf4) assert.deepEqual(back.nf4.get(name), w, name);
  const w = back.nf4.get('model.layers.0.mlp.up_proj.weight')!;
  assert.ok(!(w.absmax instanceof Float32Array) && w.absmax.code === defaultDynamicMap(true), 'the decoded map is the shared default one');
  assert.deepEqual(encodeShard(back), blob);
  const { tensors, metadata } = parseSafetensorsBytes(blob, 'blob');
  assert.deepEqual(tensors.filter((x) => x.name.startsWith('model.layers.0.mlp.up_proj')).map((x) => [x.name, x.dtype, x.shape]).sort(), [
    ['model.layers.0.mlp.up_proj.weight', 'U8', [19350, 1]], ['model.layers.0.mlp.up_proj.weight.absmax', 'U8', [605]],
    ['model.layers.0.mlp.up_proj.weight.nested_absmax', 'F32', [3]], ['model.layers.0.mlp.up_proj.weight.nested_quant_map', 'F32', [256]]]);
  const meta = JSON.parse(metadata!['swarmtune.nf4']!) as Record<string, number[]>;
  assert.deepEqual(meta['model.layers.0.mlp.up_proj.weight'], [300, 129, 64, 256, (big.absmax as { offset: number }).offset]);
  // the 8-bit form is 1 byte per block + 4 per 256 blocks + the map, instead of 4 bytes per block
  const dataBytes = (x: typeof big | typeof plain) => parseSafetensorsBytes(encodeShard({ nf4: new Map([['w', x]]), float: new Map() }), 'x')
    .tensors.reduce((a, tt) => a + tt.dataOffsets[1] - tt.dataOffsets[0], 0);
  const bigPlain = quantizeNF4(Float32Array.from({ length: 300 * 129 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 11))), 300, 129);
  assert.equal(dataBytes(bigPlain), 19350 + 4 * 605);
  assert.equal(dataBytes(big), 19350 + 605 + 4 * 3 + 4 * 256);
  // a blob of the float32 form (written before double quantization) still decodes to float32 absmax
  assert.deepEqual(decodeShard(encodeShard(t), 'old').nf4.get('model.layers.0.self_attn.q_proj.weight'), plain);
  // parts missing or malformed are named
  const noNested = withDoubleQuant(plain);
  const cut = encodeShard({ nf4: new Map([['w', { ...noNested, absmax: { ...noNested.absmax, nestedAbsmax: new Float32Array(0) } }]]), float: new Map() });
  assert.throws(() => decodeShard(cut, 'cut'), { name: 'ShardError', message: /cut: NF4 tensor w \[6, 5\] blocksize 32: .*nestedAbsmax has 0 entries, expected ceil\(1\/256\) = 1/ });
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
