// Stage loading at real sizes keeps the event loop turning (a volunteer must answer heartbeats while an 8B
// model's 2.1 GB embedding blob decodes): decodeShardAsync and VocabMatrix.create give exactly what their
// synchronous forms give, and other work runs while they work.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeShard, decodeShardAsync, encodeShard } from '../engine/formats/shard.ts';
import { quantizeNF4 } from '../engine/formats/nf4.ts';
import { VocabMatrix } from '../engine/model/vocab-matrix.ts';

/** How many event-loop turns ran other work while fn ran (a self-renewing setImmediate counts each turn):
 *  at most 1 when fn held the loop from start to end. */
async function ticksDuring(fn: () => Promise<unknown>): Promise<number> {
  let ticks = 0, h: NodeJS.Immediate | undefined;
  const tick = (): void => { ticks++; h = setImmediate(tick); };
  h = setImmediate(tick);
  try { await fn(); } finally { clearImmediate(h); }
  return ticks;
}

test('decodeShardAsync: the same tensors as decodeShard, copied in slices between which other work runs', async () => {
  const rows = 1024, cols = 1024;
  const embed = Float32Array.from({ length: rows * cols }, (_, i) => Math.sin(i) * 0.02);
  const w = quantizeNF4(Float32Array.from({ length: 64 * 64 }, (_, i) => Math.cos(i) * 0.1), 64, 64, 64);
  const blob = encodeShard({ nf4: new Map([['model.layers.0.mlp.up_proj.weight', w]]), float: new Map([['model.embed_tokens.weight', { shape: [rows, cols], data: embed }]]) });
  const sync = decodeShard(blob, 'blob');
  let got: Awaited<ReturnType<typeof decodeShardAsync>> | null = null;
  const ticks = await ticksDuring(async () => { got = await decodeShardAsync(blob, 'blob', { sliceBytes: 256 << 10 }); });
  assert.deepEqual(got, sync);
  assert.ok(ticks >= 4, `4 MiB in 256 KiB slices: the loop turned ${ticks} times`);
  const ac = new AbortController();
  ac.abort(new Error('stop'));
  await assert.rejects(decodeShardAsync(blob, 'blob', { sliceBytes: 256 << 10, signal: ac.signal }), /stop/);
  await assert.rejects(decodeShardAsync(blob.subarray(0, 5), 'short'), { name: 'SafetensorsError', message: /short: file is 5 bytes/ });
});

test('VocabMatrix.create: the same storage decision and values as the constructor, with other work running between slices', async () => {
  const V = 512, C = 256;
  // bf16-exact values (low 16 bits zero) are packed; one value with low bits keeps float32
  const exact = new Float32Array(new Uint32Array(V * C).map((_, i) => (((i * 2654435761) >>> 0) & 0x3f7f0000) >>> 0).buffer);
  const lossy = exact.slice();
  lossy[V * C - 1] = 0.1;
  for (const data of [exact, lossy]) {
    const a = new VocabMatrix(data, V, C);
    let b: VocabMatrix | null = null;
    const ticks = await ticksDuring(async () => { b = await VocabMatrix.create(data, V, C, 1, { sliceElements: 8192 }); });
    assert.equal(b!.storedAsBf16, a.storedAsBf16);
    assert.equal(a.storedAsBf16, data === exact);
    assert.deepEqual(b!.allF32(), a.allF32());
    assert.ok(ticks >= 4, `${V * C} elements in slices of 8192: the loop turned ${ticks} times`);
  }
  await assert.rejects(VocabMatrix.create(exact, V, C + 1), { name: 'RangeError' });
});
