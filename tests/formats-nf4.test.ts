// NF4 quantization and double quantization checked against hand-computed vectors and brute-force references.
// Sizes: a few blocks each (≤ 2k elements) — enough to cross block/row/nested-block boundaries, milliseconds to run.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NF4_CODE, quantizeNF4, dequantizeNF4, quantizeNF4Value, doubleQuantize, doubleDequantize } from '../engine/formats/nf4.ts';
import { createDynamicMap, quantizeBlockwise8, dequantizeBlockwise8, nearestCodeIndex } from '../engine/formats/dynamic-map.ts';

const f32 = Math.fround;

/** Next float32 above x (x > 0). */
function nextUpF32(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  u[0] += 1;
  return f[0];
}

/** Independent reference: index of the nearest NF4 code, ties to the lower code. */
function bruteNF4(x: number): number {
  let best = 0;
  for (let i = 1; i < 16; i++) if (Math.abs(x - NF4_CODE[i]) < Math.abs(x - NF4_CODE[best])) best = i;
  return best;
}

test('NF4 code table matches bitsandbytes', () => {
  assert.equal(NF4_CODE.length, 16);
  assert.equal(NF4_CODE[0], -1);
  assert.equal(NF4_CODE[7], 0);
  assert.equal(NF4_CODE[15], 1);
  assert.equal(NF4_CODE[8], f32(0.07958029955625534));
  for (let i = 1; i < 16; i++) assert.ok(NF4_CODE[i] > NF4_CODE[i - 1]);
});

test('NF4 hand vectors: high nibble first, absmax per block', () => {
  // absmax 1 so the scaled values are the inputs: 1→15, -1→0, 0→7, 0.5→12 (|0.5-0.4407| < |0.5626-0.5|)
  const W = quantizeNF4(new Float32Array([1, -1, 0, 0.5]), 2, 2);
  assert.deepEqual([...W.packed], [0xf0, 0x7c]);
  assert.deepEqual([...W.absmax], [1]);
  const swapped = quantizeNF4(new Float32Array([-1, 1, 0.5, 0]), 1, 4);
  assert.deepEqual([...swapped.packed], [0x0f, 0xc7]);
  // scale: values divided by absmax 4 → [1, -0.25, 0.125, -0.0625] → 15, 4 (-0.2846 nearest), 9 (0.1609 vs 0.0796: 0.125 nearer 0.1609), 6
  const S = quantizeNF4(new Float32Array([4, -1, 0.5, -0.25]), 1, 4);
  assert.deepEqual([...S.absmax], [4]);
  assert.deepEqual([...S.packed], [(15 << 4) | 4, (9 << 4) | 6]);
});

test('NF4 value exactly on a midpoint goes to the lower code', () => {
  const mids: number[] = [];
  for (let i = 0; i < 15; i++) mids.push(f32((NF4_CODE[i] + NF4_CODE[i + 1]) / 2));
  // the tree's thresholds are these midpoints as float32: on the threshold → lower, one ulp above → upper
  for (let i = 0; i < 15; i++) {
    const m = mids[i];
    const above = m > 0 ? nextUpF32(m) : -(function prevDown(y: number) { const f = new Float32Array([y]); new Uint32Array(f.buffer)[0] -= 1; return f[0]; })(-m);
    assert.equal(quantizeNF4Value(m), i, `midpoint ${i}/${i + 1} = ${m}`);
    assert.equal(quantizeNF4Value(above), i + 1, `just above midpoint ${i}/${i + 1}`);
  }
  // through the full quantizer with absmax 1
  const W = quantizeNF4(new Float32Array([1, mids[7]]), 1, 2);
  assert.deepEqual([...W.packed], [0xf7]);
});

test('NF4 tree equals nearest-code search on random values', () => {
  let seed = 12345;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  for (let k = 0; k < 20000; k++) {
    const x = f32(rnd());
    assert.equal(quantizeNF4Value(x), bruteNF4(x), `x = ${x}`);
  }
});

test('NF4 odd length pads a 0.0 element (code 7) in the low nibble', () => {
  const W = quantizeNF4(new Float32Array([1, -1, 0.5]), 1, 3);
  assert.equal(W.packed.length, 2);
  assert.deepEqual([...W.packed], [0xf0, 0xc7]);
  const back = dequantizeNF4(W);
  assert.equal(back.length, 3);
  assert.deepEqual([...back], [1, -1, NF4_CODE[12]]);
});

test('NF4 all-zero block: absmax 0, codes 7, dequantizes to exact zeros', () => {
  const data = new Float32Array(128);
  for (let i = 64; i < 128; i++) data[i] = (i - 96) / 32;
  const W = quantizeNF4(data, 2, 64);
  assert.equal(W.absmax[0], 0);
  assert.equal(W.absmax[1], 1);
  for (let j = 0; j < 32; j++) assert.equal(W.packed[j], 0x77);
  const back = dequantizeNF4(W);
  for (let i = 0; i < 64; i++) assert.equal(back[i], 0);
});

test('NF4 blocks are flat over the tensor, not per row; blocksize boundaries', () => {
  // 3 rows of 40: with blocksize 32 blocks straddle rows; element 31 ends block 0, 32 starts block 1
  const rows = 3, cols = 40, n = rows * cols;
  const data = new Float32Array(n).fill(0.01);
  data[31] = 2;      // last element of block 0
  data[32] = -0.5;   // first of block 1
  data[63] = 0.25;   // last of block 1
  data[64] = 8;      // first of block 2
  const W = quantizeNF4(data, rows, cols, 32);
  assert.equal(W.absmax.length, Math.ceil(n / 32));
  assert.deepEqual([...W.absmax].map((x) => f32(x)), [f32(2), f32(0.5), f32(8), f32(0.01)]);
  assert.equal(W.packed[15] & 15, 15);           // element 31 (odd → low nibble) = +absmax
  assert.equal(W.packed[16] >> 4, 0);            // element 32 (even → high nibble) = -absmax of block 1
  assert.equal(W.packed[31] & 15, bruteNF4(0.5)); // element 63 scaled by block 1's absmax 0.5 → 0.5
  // blocksize 64 gives different grouping of the same data
  const W64 = quantizeNF4(data, rows, cols, 64);
  assert.deepEqual([...W64.absmax].map((x) => f32(x)), [f32(2), f32(8)]);
  assert.throws(() => quantizeNF4(data, rows, cols, 48), /power of two/);
  assert.throws(() => quantizeNF4(data, rows, cols + 1), /expected rows\*cols/);
});

test('NF4 dequantize then requantize is the identity on codes; error bounded by half the code gap', () => {
  const rows = 16, cols = 100;
  const data = new Float32Array(rows * cols);
  for (let i = 0; i < data.length; i++) data[i] = Math.sin(i * 1.7 + Math.cos(i * 0.3)) * 0.1;
  const W = quantizeNF4(data, rows, cols);
  const back = dequantizeNF4(W);
  const W2 = quantizeNF4(back, rows, cols);
  assert.deepEqual(W2.packed, W.packed);
  assert.deepEqual(W2.absmax, W.absmax);
  let maxGap = 0; // widest gap between adjacent codes (between -1 and the next code)
  for (let i = 1; i < 16; i++) maxGap = Math.max(maxGap, NF4_CODE[i] - NF4_CODE[i - 1]);
  for (let i = 0; i < data.length; i++) {
    assert.ok(Math.abs(back[i] - data[i]) <= (maxGap / 2) * W.absmax[Math.floor(i / 64)] + 1e-7, `element ${i}`);
  }
});

test('NF4 rejects non-finite inputs naming the position', () => {
  const d = new Float32Array(8).fill(1);
  d[5] = NaN;
  assert.throws(() => quantizeNF4(d, 2, 4), /flat index 5 \(row 1, col 1\)/);
});

test('dynamic map: 256 sorted values, signed 0 at 127 and 1 at 255', () => {
  const s = createDynamicMap(true);
  assert.equal(s.length, 256);
  for (let i = 1; i < 256; i++) assert.ok(s[i] > s[i - 1], `signed map not strictly sorted at ${i}`);
  assert.equal(s[127], 0);
  assert.equal(s[255], 1);
  for (let i = 0; i < 127; i++) assert.ok(s[i] < 0);
  for (let i = 128; i < 255; i++) assert.equal(s[i], -s[254 - i]); // symmetric around 127
  // smallest magnitude: 1e-6 * mean(0.1, 1) = 5.5e-7; largest below 1: mean of the last linspace(0.1,1,65) pair
  assert.ok(Math.abs(s[128] - 5.5e-7) < 1e-12);
  assert.ok(Math.abs(s[254] - (1 + (1 - 0.9 / 64)) / 2) < 1e-6);
  const u = createDynamicMap(false);
  assert.equal(u.length, 256);
  assert.equal(u[0], 0);
  assert.equal(u[255], 1);
  for (let i = 1; i < 256; i++) assert.ok(u[i] > u[i - 1], `unsigned map not strictly sorted at ${i}`);
  assert.ok(Math.abs(u[1] - 3.25e-7) < 1e-12); // 1e-6 * mean(0.1, 0.55)
});

test('blockwise 8-bit quantize picks the nearest code and handles zero blocks', () => {
  const code = createDynamicMap(true);
  const x = new Float32Array([2, -1, 0, 0.3, 0, 0, 0]);
  const { q, absmax } = quantizeBlockwise8(x, code, 4);
  assert.deepEqual([...absmax], [2, 0]);
  assert.equal(q[0], 255);
  assert.equal(q[2], 127);
  for (const [i, v] of [[1, -0.5], [3, 0.15]] as const) {
    let best = 0;
    for (let c = 1; c < 256; c++) if (Math.abs(code[c] - f32(v)) < Math.abs(code[best] - f32(v))) best = c;
    assert.equal(q[i], best, `element ${i}`);
  }
  assert.deepEqual([...q.subarray(4)], [127, 127, 127]);
  const back = dequantizeBlockwise8(q, absmax, code, 4);
  assert.equal(back[0], 2);
  assert.equal(back[5], 0);
  assert.equal(nearestCodeIndex(code, f32((code[200] + code[201]) / 2)), 200); // tie → lower
});

test('double quantization round trip: offset is the mean, nested blocks of 256', () => {
  const n = 600; // 3 nested blocks, the last partial
  const absmax = new Float32Array(n);
  for (let i = 0; i < n; i++) absmax[i] = 0.01 + 0.05 * Math.abs(Math.sin(i * 0.7));
  const dq = doubleQuantize(absmax);
  let mean = 0;
  for (const a of absmax) mean += a;
  mean /= n;
  assert.equal(dq.offset, f32(mean));
  assert.equal(dq.codes.length, n);
  assert.equal(dq.nestedAbsmax.length, 3);
  assert.equal(dq.code.length, 256);
  const back = doubleDequantize(dq);
  // the top decade of the map has 64 codes over [0.1, 1]: a half gap of 0.9/128 of the nested absmax
  for (let i = 0; i < n; i++) {
    const tol = (0.9 / 128) * dq.nestedAbsmax[Math.floor(i / 256)] + 1e-7;
    assert.ok(Math.abs(back[i] - absmax[i]) <= tol, `absmax ${i}: ${back[i]} vs ${absmax[i]}`);
  }
});
