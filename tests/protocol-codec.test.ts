// Protocol unit tests: frame cap, malformed msgpack, schema strictness, tensor codec round trips and checks.
// Sizes are small (a few thousand elements) so the file runs in well under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Packr } from 'msgpackr';
import { encodeFrame, decodeBody, FrameReader } from '../protocol/frame.ts';
import { encodeTensor, decodeTensor, decodeFloat } from '../protocol/tensor.ts';
import { SCHEMAS } from '../protocol/messages.ts';
import { INT8_BLOCK } from '../protocol/constants.ts';

async function* chunks(parts: Uint8Array[]) { for (const p of parts) yield p; }

function rand(n: number, seed: number, scale = 1): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 2 ** 32) * 2 - 1) * scale * (1 + (i % 7));
  }
  return out;
}

test('frames round trip across arbitrary chunk boundaries', async () => {
  const a = encodeFrame({ hello: 'world', n: 3 });
  const b = encodeFrame({ x: new Uint8Array([1, 2, 3]) });
  const all = new Uint8Array(a.length + b.length);
  all.set(a); all.set(b, a.length);
  // split into 3-byte pieces so the length prefix itself straddles chunks
  const parts: Uint8Array[] = [];
  for (let i = 0; i < all.length; i += 3) parts.push(all.subarray(i, i + 3));
  const r = new FrameReader(chunks(parts));
  assert.deepEqual(await r.read(), { hello: 'world', n: 3 });
  const second = (await r.read()) as { x: Uint8Array };
  assert.deepEqual([...second.x], [1, 2, 3]);
  assert.equal(await r.read(), undefined);
});

test('a frame over the cap is refused from its length prefix, before the body arrives', async () => {
  const prefix = new Uint8Array(4);
  new DataView(prefix.buffer).setUint32(0, 1025, false);
  let pulled = 0;
  async function* src() { pulled++; yield prefix; pulled++; yield new Uint8Array(1025); }
  const r = new FrameReader(src(), 1024);
  await assert.rejects(r.read(), { name: 'FrameTooLargeError' });
  assert.equal(pulled, 1, 'the body must not be read once the prefix exceeds the cap');
  assert.throws(() => encodeFrame({ b: new Uint8Array(2000) }, 1024), { name: 'FrameTooLargeError' });
});

test('malformed msgpack and truncated frames are DecodeErrors', async () => {
  assert.throws(() => decodeBody(new Uint8Array([0xd4, 0x01, 0x02])), { name: 'DecodeError' }); // unknown extension type
  // 0xc1 is "never used" in msgpack: msgpackr yields a marker object, which no schema accepts
  assert.throws(() => SCHEMAS.status.req(decodeBody(new Uint8Array([0xc1])), 's'), { name: 'SchemaError' });
  assert.throws(() => decodeBody(new Uint8Array([0x92, 0x01])), { name: 'DecodeError' }); // array(2) with one item
  assert.throws(() => decodeBody(new Uint8Array([0x01, 0x02])), { name: 'DecodeError' }); // two values
  const f = encodeFrame({ a: 1 });
  await assert.rejects(new FrameReader(chunks([f.subarray(0, f.length - 1)])).read(), { name: 'DecodeError' });
});

test('schemas reject unknown fields, missing fields, wrong types and out-of-bounds values', () => {
  const ok = { sha256: 'a'.repeat(64), offset: 0, length: 16 };
  assert.deepEqual(SCHEMAS.weights.req(ok, 'w'), ok);
  assert.throws(() => SCHEMAS.weights.req({ ...ok, extra: 1 }, 'w'), { name: 'SchemaError', message: /unknown field "extra"/ });
  assert.throws(() => SCHEMAS.weights.req({ sha256: ok.sha256, offset: 0 }, 'w'), { name: 'SchemaError', message: /missing field "length"/ });
  assert.throws(() => SCHEMAS.weights.req({ ...ok, offset: '0' }, 'w'), { name: 'SchemaError', message: /w\.offset/ });
  assert.throws(() => SCHEMAS.weights.req({ ...ok, length: 1e12 }, 'w'), { name: 'SchemaError' });
  assert.throws(() => SCHEMAS.weights.req({ ...ok, offset: 1.5 }, 'w'), { name: 'SchemaError' });
  assert.throws(() => SCHEMAS.weights.req({ ...ok, sha256: 'ZZ' }, 'w'), { name: 'SchemaError' });
  assert.throws(() => SCHEMAS.weights.req([1, 2], 'w'), { name: 'SchemaError' });
  assert.throws(() => SCHEMAS.heartbeat.res({ runId: 'r', ready: true, step: 0, tokensPerSecond: 0, inflight: 0, busy: 'yes', memoryRssBytes: 0 }, 'h'), { name: 'SchemaError' });
  // a frame decoded from the wire goes through the same validator
  const body = new Packr({ useRecords: false }).pack({ ...ok, __proto__x: 1 });
  assert.throws(() => SCHEMAS.weights.req(decodeBody(body), 'w'), { name: 'SchemaError' });
});

test('tensor f32 round trip is exact; i32 too', () => {
  const x = rand(1000, 1);
  const t = encodeTensor(x, [10, 100], 'f32');
  assert.equal(t.bytes.length, 4000);
  assert.deepEqual(decodeFloat(t, 'x', [10, 100]), x);
  const ids = new Int32Array([5, -100, 7, 2 ** 31 - 1]);
  assert.deepEqual(decodeTensor(encodeTensor(ids, [4], 'i32'), 'ids', { dtype: 'i32' }).data, ids);
});

test('tensor bf16 round trip within 2^-8 relative error, and exact for bf16-representable values', () => {
  const x = rand(4097, 2, 3);
  const y = decodeFloat(encodeTensor(x, [4097], 'bf16'), 'x');
  let worst = 0;
  for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(y[i]! - x[i]!) / Math.abs(x[i]!));
  assert.ok(worst <= 2 ** -8, `bf16 worst relative error ${worst}`);
  assert.ok(worst > 0, 'bf16 must actually round random floats');
  const exact = new Float32Array([1, -2, 0.5, 3.0, 0]);
  assert.deepEqual(decodeFloat(encodeTensor(exact, [5], 'bf16'), 'e'), exact);
  // round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 and goes to the even mantissa (1)
  assert.equal(decodeFloat(encodeTensor(new Float32Array([1 + 2 ** -8]), [1], 'bf16'), 't')[0], 1);
});

test('tensor int8 round trip within half a step of each block absmax', () => {
  const n = 3 * INT8_BLOCK + 5; // a ragged last block
  const x = rand(n, 3, 0.1);
  const y = decodeFloat(encodeTensor(x, [n], 'int8'), 'x');
  for (let b = 0; b * INT8_BLOCK < n; b++) {
    let m = 0;
    for (let i = b * INT8_BLOCK; i < Math.min(n, (b + 1) * INT8_BLOCK); i++) m = Math.max(m, Math.abs(x[i]!));
    for (let i = b * INT8_BLOCK; i < Math.min(n, (b + 1) * INT8_BLOCK); i++) {
      assert.ok(Math.abs(y[i]! - x[i]!) <= m / 254 + 1e-9, `element ${i}: ${y[i]} vs ${x[i]} (absmax ${m})`);
    }
  }
  const zeros = decodeFloat(encodeTensor(new Float32Array(10), [10], 'int8'), 'z');
  assert.deepEqual(zeros, new Float32Array(10));
});

test('non-finite values are refused when encoding and when decoding', () => {
  for (const bad of [NaN, Infinity, -Infinity]) {
    for (const codec of ['f32', 'bf16', 'int8'] as const) {
      assert.throws(() => encodeTensor(new Float32Array([1, bad]), [2], codec), { name: 'TensorError', message: /non-finite/ });
    }
  }
  const t = encodeTensor(new Float32Array([1, 2]), [2], 'f32');
  new DataView(t.bytes.buffer, t.bytes.byteOffset).setFloat32(4, NaN, true);
  assert.throws(() => decodeFloat(t, 'grad'), { name: 'TensorError', message: /grad: non-finite value NaN at element 1/ });
  const b = encodeTensor(new Float32Array([1, 2]), [2], 'bf16');
  b.bytes[3] = 0x7f; b.bytes[2] = 0x80; // bf16 +Inf
  assert.throws(() => decodeFloat(b, 'h'), { name: 'TensorError' });
  const q = encodeTensor(new Float32Array(4).fill(1), [4], 'int8');
  new DataView(q.bytes.buffer, q.bytes.byteOffset).setFloat32(0, Infinity, true);
  assert.throws(() => decodeFloat(q, 'q'), { name: 'TensorError', message: /absmax/ });
});

test('shape, dtype and byte length mismatches are TensorErrors naming the tensor', () => {
  const t = encodeTensor(new Float32Array(6), [2, 3], 'f32');
  assert.throws(() => decodeFloat(t, 'hidden', [3, 2]), { name: 'TensorError', message: /hidden: expected shape \[3,2\], got \[2,3\]/ });
  assert.throws(() => decodeTensor(t, 'ids', { dtype: 'i32' }), { name: 'TensorError', message: /expected dtype i32/ });
  assert.throws(() => decodeFloat({ ...t, bytes: t.bytes.subarray(0, 20) }, 'g'), { name: 'TensorError', message: /needs 24 bytes, got 20/ });
  assert.throws(() => decodeFloat({ ...t, codec: 'i32' }, 'g'), { name: 'TensorError' });
  assert.throws(() => encodeTensor(new Float32Array(5), [2, 3], 'f32'), { name: 'TensorError' });
  assert.throws(() => decodeFloat({ ...t, shape: [1 << 20, 1 << 20] }, 'g'), { name: 'TensorError', message: /exceeds the cap/ });
  // the structural validator bounds rank before any decoding
  assert.throws(() => SCHEMAS.microbatch.req({ runId: 'r', step: 0, mb: 0, attempt: 0, stageIndex: 0, route: [], batch: 1, seqLen: 6, ids: { ...t, shape: [1, 1, 1, 1, 6] }, dropoutSeed: 0, train: true, jobTimeoutMs: 1 }, 'b'), { name: 'SchemaError' });
});
