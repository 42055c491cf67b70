// Stage loading at real sizes keeps the event loop turning (a volunteer must answer heartbeats while an 8B
// model's 2.1 GB embedding blob decodes): decodeShardAsync and VocabMatrix.create give exactly what their
// synchronous forms give, and other work runs while they work.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { decodeShard, decodeShardAsync, encodeShard, openShardFile, writeShardFile } from '../engine/formats/shard.ts';
import { RefBackend } from '../engine/backends/ref.ts';
import { loadStage } from '../engine/model/load.ts';
import { randomWeightSource, tinyLlamaConfig } from '../engine/model/random-model.ts';
import { Rng } from '../engine/model/rng.ts';
import type { LoraConfig, WeightSource } from '../engine/types.ts';
import { quantizeNF4 } from '../engine/formats/nf4.ts';
import { VocabMatrix } from '../engine/model/vocab-matrix.ts';

const backend = new RefBackend();
const lora: LoraConfig = { r: 4, loraAlpha: 8, loraDropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'], useRslora: false, initLoraWeights: true };

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

// A stage whose embedding and lm_head stream from a shard file (openShardFile → BlobWeightSource.floatReader →
// VocabMatrix.fromReader, the volunteer's load path) against the same weights read whole: the same storage
// decision (bf16 when every value is bf16-exact) and the same loss and gradients, bit for bit.
test('streamed vocab matrices: a stage loaded through openShardFile equals one loaded from the whole tensors (bf16-exact, inexact, inexact late)', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'swarmtune-lazy-'));
  try {
    const cfg = tinyLlamaConfig({ hiddenSize: 32, intermediateSize: 48, vocabSize: 301 });
    const V = cfg.vocabSize, C = cfg.hiddenSize;
    const toBf16 = (x: Float32Array): Float32Array => { const b = new Uint32Array(x.buffer.slice(0)); for (let i = 0; i < b.length; i++) b[i] = b[i]! & 0xffff0000; return new Float32Array(b.buffer); };
    for (const kind of ['exact', 'inexact', 'late'] as const) {
      const src = randomWeightSource(cfg, 4);
      const vocab = new Map<string, Float32Array>();
      for (const name of ['model.embed_tokens.weight', 'lm_head.weight']) {
        const w = await src.getFloat(name);
        const v = kind === 'inexact' ? w : toBf16(w);
        if (kind === 'late') v[V * C - 3] = 0.1;                                 // past the first slices
        vocab.set(name, v);
      }
      const whole: WeightSource = { config: cfg, has: (n) => src.has(n), getNF4: (n) => src.getNF4(n), getFloat: async (n) => vocab.get(n) ?? src.getFloat(n) };
      const file = path.join(dir, `${kind}.safetensors`);
      await writeShardFile({ nf4: new Map(), float: new Map([...vocab].map(([n, d]) => [n, { shape: [V, C], data: d }])) }, file);
      const opened = await openShardFile(file, 'vocab shard', 1024);
      let reads = 0;
      try {
        assert.deepEqual([...opened.lazy.keys()].sort(), ['lm_head.weight', 'model.embed_tokens.weight']);
        assert.equal(opened.tensors.float.size, 0);
        await assert.rejects(opened.lazy.get('lm_head.weight')!.read(V * C - 1, new Float32Array(2)), { name: 'RangeError', message: /lm_head.weight has 9632 values, read of 2 from 9631/ });
        const lazy = new Map([...opened.lazy].map(([n, t]) => [n, { ...t, read: (s: number, o: Float32Array) => { reads++; return t.read(s, o); } }]));
        const streamed: WeightSource = {
          config: cfg, has: (n) => src.has(n), getNF4: (n) => src.getNF4(n), floatReader: (n) => lazy.get(n) ?? null,
          getFloat: async (n) => { if (lazy.has(n)) throw new Error(`${n} read whole`); return src.getFloat(n); },
        };
        // slices of 4M elements: the tiny matrices are one slice each, so the 'late' case must also
        // widen inside its one slice; VocabMatrix.fromReader's own test below covers the multi-slice case
        const [a, b] = [await loadStage(whole, backend, { layerStart: 0, layerEnd: 2, lora, seed: 5 }), await loadStage(streamed, backend, { layerStart: 0, layerEnd: 2, lora, seed: 5 })];
        assert.ok(reads >= 2, `${reads} range reads`);
        for (const s of [a, b]) for (const p of s.params) new Rng(p.name.length).fillNormal(p.data, 0, 0.1);
        const B = 2, S = 7;
        const ids = Int32Array.from({ length: B * S }, (_, i) => (i * 37) % V);
        const labels = Int32Array.from({ length: B * S }, (_, i) => (i % S === S - 1 ? -100 : ((i + 1) * 37) % V));
        const out: Array<{ loss: number | undefined; g: Float32Array[] }> = [];
        for (const s of [a, b]) {
          const g = s.newGrads();
          const f = await s.forward({ key: 'k', batch: B, seqLen: S, ids, labels });
          await s.backward('k', g, { lossScale: 0.25 });
          out.push({ loss: f.lossSum, g });
          s.dispose();
        }
        assert.equal(out[1]!.loss, out[0]!.loss, kind);
        assert.ok(Number.isFinite(out[0]!.loss ?? NaN));
        out[0]!.g.forEach((g, i) => assert.deepEqual(out[1]!.g[i], g));
      } finally {
        await opened.close();
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('VocabMatrix.fromReader: what create() decides and holds, read slice by slice (exact, inexact from the start, inexact in a later slice)', async () => {
  const V = 512, C = 256;
  const exact = new Float32Array(new Uint32Array(V * C).map((_, i) => (((i * 2654435761) >>> 0) & 0x3f7f0000) >>> 0).buffer);
  const early = exact.slice(); early[5] = 0.1;
  const late = exact.slice(); late[V * C - 9000] = 0.1;
  for (const data of [exact, early, late]) {
    const a = await VocabMatrix.create(data, V, C);
    let reads = 0;
    let b: VocabMatrix | null = null;
    const ticks = await ticksDuring(async () => {
      b = await VocabMatrix.fromReader(async (start, out) => { reads++; out.set(data.subarray(start, start + out.length)); }, V, C, 1, { sliceElements: 8192 });
    });
    assert.equal(b!.storedAsBf16, a.storedAsBf16);
    assert.equal(b!.storedAsBf16, data === exact);
    assert.deepEqual(b!.allF32(), a.allF32());
    assert.equal(reads, (V * C) / 8192);
    assert.ok(ticks >= 4, `the loop turned ${ticks} times`);
  }
  await assert.rejects(VocabMatrix.fromReader(async () => { throw new Error('disk gone'); }, V, C), /disk gone/);
});
