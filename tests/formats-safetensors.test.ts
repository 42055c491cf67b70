// safetensors: round trip of every dtype, writer layout, every header violation rejected, sharded index loading.
// Files are hand-made and a few bytes to a few hundred bytes: the checks are about format rules, not volume.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, readFile, rm, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DTYPES, DTYPE_BITS, type Dtype } from '../engine/formats/safetensors/header.ts';
import { encodeFromFloat32, decodeToFloat32, floatToBf16Bits, floatToF16Bits } from '../engine/formats/safetensors/convert.ts';
import { SafetensorsFile, openSafetensorsDir, ShardedSafetensors } from '../engine/formats/safetensors/read.ts';
import { writeSafetensors, ShardedSafetensorsWriter } from '../engine/formats/safetensors/write.ts';

async function tmp(): Promise<string> { return mkdtemp(join(tmpdir(), 'st-test-')); }

/** A file from a raw header string and buffer, to exercise the reader on hand-made (bad) files. */
async function rawFile(dir: string, name: string, header: string | Uint8Array, buffer = new Uint8Array(0), lenOverride?: bigint): Promise<string> {
  const h = typeof header === 'string' ? new TextEncoder().encode(header) : header;
  const out = new Uint8Array(8 + h.length + buffer.length);
  new DataView(out.buffer).setBigUint64(0, lenOverride ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(buffer, 8 + h.length);
  const p = join(dir, name);
  await writeFile(p, out);
  return p;
}

test('round trip of every dtype: raw bytes identical, float decode exact', async () => {
  const dir = await tmp();
  try {
    const vals = [0, 1, 2, 3, 4, 5, 6, 7]; // representable in every int and float dtype
    const tensors = DTYPES.map((dtype, i) => {
      const shape = [2, 4];
      let data: Uint8Array;
      if (['F4', 'F6_E2M3', 'F6_E3M2', 'C64'].includes(dtype) || dtype.startsWith('F8')) {
        data = new Uint8Array((8 * DTYPE_BITS[dtype]) / 8).map((_, j) => (j * 37 + i) & 0xff);
      } else {
        data = encodeFromFloat32(dtype, vals);
      }
      return { name: `t.${dtype.toLowerCase()}`, dtype, shape, data };
    });
    const p = join(dir, 'all.safetensors');
    await writeSafetensors(p, tensors, { format: 'pt' });
    const f = await SafetensorsFile.open(p);
    try {
      assert.deepEqual(f.metadata, { format: 'pt' });
      for (const t of tensors) {
        const info = f.info(t.name);
        assert.equal(info.dtype, t.dtype);
        assert.deepEqual(info.shape, t.shape);
        assert.deepEqual(await f.readRaw(t.name), t.data, t.name);
        if (!(['F4', 'F6_E2M3', 'F6_E3M2', 'C64'].includes(t.dtype) || t.dtype.startsWith('F8'))) {
          assert.deepEqual([...await f.readFloat32(t.name)], t.dtype === 'BOOL' ? [0, 1, 1, 1, 1, 1, 1, 1] : vals, t.name);
        }
      }
      await assert.rejects(f.readFloat32('t.f4'), /F4 cannot be decoded/);
    } finally {
      await f.close();
    }
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('writer layout: descending dtype order then name, header padded to 8 with spaces', async () => {
  const dir = await tmp();
  try {
    const p = join(dir, 'l.safetensors');
    await writeSafetensors(p, [
      { name: 'b', dtype: 'U8', shape: [3], data: new Uint8Array([1, 2, 3]) },
      { name: 'a', dtype: 'U8', shape: [1], data: new Uint8Array([9]) },
      { name: 'z', dtype: 'F32', shape: [1], data: new Float32Array([1.5]) },
      { name: 'y', dtype: 'BF16', shape: [2], data: new Float32Array([1, -2]) },
    ], { format: 'pt' });
    const bytes = await readFile(p);
    const n = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
    assert.equal(n % 8, 0);
    const header = bytes.subarray(8, 8 + n).toString('utf8');
    assert.equal(header.trimEnd(),
      '{"__metadata__":{"format":"pt"},"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' +
      '"y":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"U8","shape":[1],"data_offsets":[8,9]},' +
      '"b":{"dtype":"U8","shape":[3],"data_offsets":[9,12]}}');
    assert.match(header, /^[^ ]* *$/);
    assert.deepEqual([...bytes.subarray(8 + n)], [0, 0, 0xc0, 0x3f, 0x80, 0x3f, 0x00, 0xc0, 9, 1, 2, 3]);
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('BF16 and F16 encoders round to nearest even; F16 over/underflow; F8 decoders', () => {
  assert.equal(floatToBf16Bits(1 + 2 ** -8), 0x3f80);          // tie → even (1.0)
  assert.equal(floatToBf16Bits(1 + 3 * 2 ** -8), 0x3f82);      // tie → even (1 + 2^-6)
  assert.equal(floatToBf16Bits(1 + 2 ** -8 + 2 ** -12), 0x3f81); // above the tie → up
  assert.equal(floatToBf16Bits(-0), 0x8000);
  assert.ok((floatToBf16Bits(NaN) & 0x7f80) === 0x7f80 && (floatToBf16Bits(NaN) & 0x7f) !== 0);
  assert.equal(floatToF16Bits(1 + 2 ** -11), 0x3c00);
  assert.equal(floatToF16Bits(1 + 3 * 2 ** -11), 0x3c02);
  assert.equal(floatToF16Bits(65504), 0x7bff);
  assert.equal(floatToF16Bits(65520), 0x7c00);                 // halfway to 65536 → even → Inf
  assert.equal(floatToF16Bits(2 ** -24), 0x0001);              // smallest subnormal
  assert.equal(floatToF16Bits(2 ** -25), 0x0000);              // tie with zero → even (0)
  assert.equal(floatToF16Bits(3 * 2 ** -26), 0x0001);
  assert.equal(floatToF16Bits(2 ** -14 - 2 ** -25), 0x0400);   // rounds up into the smallest normal
  assert.deepEqual([...decodeToFloat32('F16', new Uint8Array([0x01, 0x00, 0x00, 0x7c, 0x00, 0xbc]))], [2 ** -24, Infinity, -1]);
  assert.deepEqual([...decodeToFloat32('F8_E4M3', new Uint8Array([0x38, 0x7e, 0xfe, 0x01]))], [1, 448, -448, 2 ** -9]);
  assert.ok(Number.isNaN(decodeToFloat32('F8_E4M3', new Uint8Array([0x7f]))[0]));
  assert.deepEqual([...decodeToFloat32('F8_E5M2', new Uint8Array([0x3c, 0x7c, 0x7b]))], [1, Infinity, 57344]);
  assert.deepEqual([...decodeToFloat32('F8_E8M0', new Uint8Array([127, 128, 0]))], [1, 2, 2 ** -127]);
  assert.ok(Number.isNaN(decodeToFloat32('F8_E4M3FNUZ', new Uint8Array([0x80]))[0]));
  assert.deepEqual([...decodeToFloat32('F8_E4M3FNUZ', new Uint8Array([0x40]))], [1]); // bias 8
});

test('every header violation is rejected with an error naming the file and the tensor', async () => {
  const dir = await tmp();
  try {
    const ok = (name: string, dtype: string, shape: number[], off: [number, number]) =>
      `${JSON.stringify(name)}:{"dtype":"${dtype}","shape":${JSON.stringify(shape)},"data_offsets":${JSON.stringify(off)}}`;
    const cases: Array<[string, () => Promise<string>, RegExp]> = [
      ['too short', async () => { const p = join(dir, 'short'); await writeFile(p, new Uint8Array(5)); return p; }, /too short/],
      ['header > 100 MB', () => rawFile(dir, 'big', '{}', undefined, 100_000_001n), /exceeds the 100000000-byte limit/],
      ['header past EOF', () => rawFile(dir, 'eof', '{}', undefined, 64n), /runs past the end/],
      ['not starting with {', () => rawFile(dir, 'start', ' {}'), /must start with '\{'/],
      ['invalid utf8', () => rawFile(dir, 'utf', new Uint8Array([0x7b, 0xff, 0x7d])), /not valid UTF-8/],
      ['invalid JSON', () => rawFile(dir, 'json', '{"a":'), /not valid JSON/],
      ['duplicate key', () => rawFile(dir, 'dup', `{${ok('w', 'U8', [1], [0, 1])},${ok('w', 'U8', [1], [1, 2])}}`, new Uint8Array(2)), /duplicate key "w"/],
      ['metadata value not a string', () => rawFile(dir, 'meta', '{"__metadata__":{"format":1}}'), /__metadata__\["format"\] must be a string/],
      ['unknown dtype', () => rawFile(dir, 'dt', `{${ok('w', 'F128', [1], [0, 16])}}`, new Uint8Array(16)), /tensor "w": unknown dtype "F128"/],
      ['negative shape', () => rawFile(dir, 'shape', `{${ok('w', 'U8', [-1], [0, 0])}}`), /tensor "w": shape must be a list of non-negative integers/],
      ['missing data_offsets', () => rawFile(dir, 'off', '{"w":{"dtype":"U8","shape":[1]}}', new Uint8Array(1)), /tensor "w": data_offsets must be/],
      ['hole', () => rawFile(dir, 'hole', `{${ok('a', 'U8', [2], [0, 2])},${ok('b', 'U8', [2], [3, 5])}}`, new Uint8Array(5)), /tensor "b": data_offsets \[3, 5\] leave a hole/],
      ['not starting at 0', () => rawFile(dir, 'zero', `{${ok('a', 'U8', [2], [1, 3])}}`, new Uint8Array(3)), /tensor "a".*leave a hole/],
      ['overlap', () => rawFile(dir, 'ovl', `{${ok('a', 'U8', [2], [0, 2])},${ok('b', 'U8', [2], [1, 3])}}`, new Uint8Array(3)), /tensor "b".*overlap/],
      ['size mismatch', () => rawFile(dir, 'size', `{${ok('w', 'F32', [2], [0, 4])}}`, new Uint8Array(4)), /tensor "w": data_offsets \[0, 4\] span 4 bytes, but F32 \[2\] needs 8/],
      ['sub-byte size', () => rawFile(dir, 'f4', `{${ok('w', 'F4', [3], [0, 2])}}`, new Uint8Array(2)), /tensor "w".*12 bits, not a whole number of bytes/],
      ['buffer not fully covered', () => rawFile(dir, 'cover', `{${ok('w', 'U8', [2], [0, 2])}}`, new Uint8Array(3)), /cover 2 bytes of data but the file holds 3/],
      ['element count overflow', () => rawFile(dir, 'huge', `{${ok('w', 'U8', [2 ** 30, 2 ** 30, 2 ** 10], [0, 1])}}`, new Uint8Array(1)), /tensor "w".*too many elements/],
    ];
    for (const [label, make, re] of cases) {
      const p = await make();
      await assert.rejects(SafetensorsFile.open(p), (e: Error) => {
        assert.equal(e.name, 'SafetensorsError', label);
        assert.match(e.message, re, label);
        assert.ok(e.message.startsWith(p), `${label}: message should name the file: ${e.message}`);
        return true;
      }, label);
    }
    // a padded header (spaces) and an empty tensor are valid
    const good = await rawFile(dir, 'good', `{${ok('e', 'F32', [0, 3], [0, 0])},${ok('w', 'U8', [2], [0, 2])}}   `, new Uint8Array([4, 5]));
    const f = await SafetensorsFile.open(good);
    assert.deepEqual([...await f.readRaw('w')], [4, 5]);
    assert.equal((await f.readRaw('e')).length, 0);
    await assert.rejects(f.readRaw('nope'), /no tensor named "nope"/);
    await f.close();
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('sharded checkpoint: writer splits by size keeping groups, index loads back, bad index rejected', async () => {
  const dir = await tmp();
  try {
    const specs = [];
    for (let i = 0; i < 5; i++) {
      specs.push({ name: `layer.${i}.w`, dtype: 'F32' as Dtype, shape: [4, 4] });
      specs.push({ name: `layer.${i}.w.absmax`, dtype: 'F32' as Dtype, shape: [2] });
    }
    // 72 bytes per group; a 150-byte limit holds two groups per shard → 3 shards
    const w = await ShardedSafetensorsWriter.create(dir, specs, { maxShardBytes: 150, groupOf: (n) => n.split('.').slice(0, 2).join('.'), metadata: { format: 'pt' } });
    assert.equal(w.shardCount, 3);
    for (const s of [...specs].reverse()) {
      const n = s.shape.reduce((a, b) => a * b, 1);
      await w.write(s.name, Float32Array.from({ length: n }, (_, j) => j + s.name.length));
    }
    await w.close();
    const files = (await readdir(dir)).sort();
    assert.deepEqual(files, ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors', 'model.safetensors.index.json']);
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8'));
    assert.equal(index.metadata.total_size, 5 * 72);
    assert.equal(index.weight_map['layer.4.w'], 'model-00003-of-00003.safetensors');
    assert.equal(index.weight_map['layer.4.w.absmax'], 'model-00003-of-00003.safetensors');
    const src = await openSafetensorsDir(dir);
    assert.ok(src);
    assert.equal(src.names().length, 10);
    assert.deepEqual([...await src.readFloat32('layer.3.w.absmax')], [16, 17]);
    await src.close();
    // index naming a tensor its shard lacks
    index.weight_map['ghost'] = 'model-00001-of-00003.safetensors';
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify(index));
    await assert.rejects(ShardedSafetensors.open(join(dir, 'model.safetensors.index.json')), /puts "ghost" in model-00001-of-00003.safetensors, which has no such tensor/);
    // writer refuses to close with missing tensors
    const w2 = await ShardedSafetensorsWriter.create(join(dir, 'x'), specs.slice(0, 2));
    await w2.write(specs[0].name, new Float32Array(16));
    await assert.rejects(w2.close(), /never written: layer\.0\.w\.absmax/);
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('reading is lazy: open reads the header only, tensor bytes come from disk at read time', async () => {
  const dir = await tmp();
  try {
    const p = join(dir, 'lazy.safetensors');
    await writeSafetensors(p, [{ name: 'w', dtype: 'U8', shape: [4], data: new Uint8Array([1, 2, 3, 4]) }]);
    const f = await SafetensorsFile.open(p);
    // rewrite the data bytes behind the open file: a reader that loaded data at open would not see this
    const bytes = await readFile(p);
    bytes.set([9, 8, 7, 6], f.dataStart);
    await writeFile(p, bytes);
    assert.deepEqual([...await f.readRaw('w')], [9, 8, 7, 6]);
    await f.close();
    await assert.rejects(f.readRaw('w'), /file is closed/);
  } finally {
    await rm(dir, { recursive: true });
  }
});
