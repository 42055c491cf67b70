// bitsandbytes 4-bit checkpoints: exact key names and quant_state bytes, write→read round trip, and the
// `swarmtune quantize` pipeline on a tiny BF16 model dir loaded back with openModelDir.
// Sizes: a 2-layer, hidden-64 model (~55k parameters) exercises every tensor kind and sharding in well under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, readFile, rm, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bnbTensors, readBnbNF4, quantStateJson, parseQuantState } from '../engine/formats/bnb.ts';
import { quantizeNF4, NF4_CODE, doubleQuantize, decodeAbsmax, isDoubleQuant } from '../engine/formats/nf4.ts';
import { createDynamicMap } from '../engine/formats/dynamic-map.ts';
import { writeSafetensors } from '../engine/formats/safetensors/write.ts';
import { SafetensorsFile } from '../engine/formats/safetensors/read.ts';
import { encodeFromFloat32, decodeToFloat32 } from '../engine/formats/safetensors/convert.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { quantizeModelDir } from '../engine/tasks/quantize.ts';

async function tmp(): Promise<string> { return mkdtemp(join(tmpdir(), 'bnb-test-')); }

test('quant_state JSON bytes and key names exactly as bitsandbytes writes them', () => {
  // two 64-element blocks with absmax 1 and 3 → offset = mean = 2.0
  const data = new Float32Array(128);
  data[0] = 1; data[64] = -3; data[65] = 1.5;
  const W = quantizeNF4(data, 4, 32);
  const ts = bnbTensors('model.layers.0.self_attn.q_proj.weight', W, { doubleQuant: true, dtype: 'bfloat16' });
  const expectedQs = '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 32], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.0}';
  assert.deepEqual(ts.map((t) => [t.name, t.dtype, t.shape]), [
    ['model.layers.0.self_attn.q_proj.weight', 'U8', [64, 1]],
    ['model.layers.0.self_attn.q_proj.weight.absmax', 'U8', [2]],
    ['model.layers.0.self_attn.q_proj.weight.quant_map', 'F32', [16]],
    ['model.layers.0.self_attn.q_proj.weight.nested_absmax', 'F32', [1]],
    ['model.layers.0.self_attn.q_proj.weight.nested_quant_map', 'F32', [256]],
    ['model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4', 'U8', [expectedQs.length]],
  ]);
  const qs = new TextDecoder().decode(ts[5].data);
  assert.equal(qs, expectedQs);
  // absmax - offset = [-1, 1] → nested absmax 1; -1 is below the map's lowest code (-0.99297) → 0, +1 → 255
  assert.deepEqual([...decodeToFloat32('F32', ts[3].data)], [1]);
  assert.deepEqual([...ts[1].data], [0, 255]);
  assert.deepEqual([...decodeToFloat32('F32', ts[2].data)], [...NF4_CODE]);
  assert.deepEqual([...decodeToFloat32('F32', ts[4].data)], [...createDynamicMap(true)]);
  // held double-quantized (what quantize-on-load gives with bnb_4bit_use_double_quant): the same state in memory,
  // and written from it the same bytes
  const H = quantizeNF4(data, 4, 32, 64, { doubleQuant: true });
  assert.deepEqual([...H.absmax.codes], [0, 255]);
  assert.deepEqual([...H.absmax.nestedAbsmax], [1]);
  assert.equal(H.absmax.offset, 2);
  assert.equal(H.absmax.nestedBlocksize, 256);
  assert.deepEqual([...H.absmax.code], [...createDynamicMap(true)]);
  assert.deepEqual(H.packed, W.packed);
  assert.deepEqual(bnbTensors('model.layers.0.self_attn.q_proj.weight', H, { doubleQuant: true, dtype: 'bfloat16' }), ts);
  // the float32 absmax it decodes to: code[0]·1 + 2 and code[255]·1 + 2
  assert.deepEqual([...decodeAbsmax(H.absmax)], [Math.fround(createDynamicMap(true)[0] + 2), 3]);
  const plain = bnbTensors('m.weight', W, { doubleQuant: false, dtype: 'float16' });
  const plainQs = '{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [4, 32]}';
  assert.deepEqual(plain.map((t) => [t.name, t.dtype, t.shape]), [
    ['m.weight', 'U8', [64, 1]], ['m.weight.absmax', 'F32', [2]], ['m.weight.quant_map', 'F32', [16]],
    ['m.weight.quant_state.bitsandbytes__nf4', 'U8', [plainQs.length]],
  ]);
  assert.equal(new TextDecoder().decode(plain[3].data), plainQs);
  // Python float repr for small offsets
  assert.ok(quantStateJson({ quant_type: 'nf4', blocksize: 64, dtype: 'bfloat16', shape: [1, 2], nested_offset: 0.0000123 }).endsWith('"nested_offset": 1.23e-05}'));
  assert.throws(() => parseQuantState(new TextEncoder().encode('{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [1, 2]}'), 'w'), /w: quant_type "fp4" is not supported/);
  assert.throws(() => parseQuantState(new TextEncoder().encode('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [1, 2], "bogus": 1}'), 'w'), /unexpected quant_state key "bogus"/);
});

test('bnb safetensors write → read: identical codes, absmax exact (plain) or as double-dequantized', async () => {
  const dir = await tmp();
  try {
    const rows = 48, cols = 100; // 4800 elements = 75 blocks: nested blocks of 256 hold a single partial block
    const data = new Float32Array(rows * cols);
    for (let i = 0; i < data.length; i++) data[i] = Math.sin(i * 0.91) * (1 + (i % 7)) * 0.01;
    const W = quantizeNF4(data, rows, cols);
    for (const doubleQuant of [true, false]) {
      const p = join(dir, `m${doubleQuant}.safetensors`);
      const ts = bnbTensors('model.layers.1.mlp.down_proj.weight', W, { doubleQuant });
      await writeSafetensors(p, ts, { format: 'pt' });
      const f = await SafetensorsFile.open(p);
      const R = await readBnbNF4(f, 'model.layers.1.mlp.down_proj.weight');
      assert.deepEqual([R.rows, R.cols, R.blocksize], [rows, cols, 64]);
      assert.deepEqual(R.packed, W.packed);
      if (!doubleQuant) assert.deepEqual(R.absmax, W.absmax);
      else {
        // the stored form is kept: the file's own codes, nested absmax, map and offset, not an fp32 expansion
        const dq = doubleQuantize(W.absmax);
        assert.ok(isDoubleQuant(R.absmax));
        assert.deepEqual(R.absmax, dq);
        assert.equal(R.absmax.code, dq.code, 'a map equal to the default one is shared, not held per weight');
        const back = decodeAbsmax(R.absmax);
        for (let b = 0; b < W.absmax.length; b++) {
          assert.ok(Math.abs(back[b] - W.absmax[b]) <= (0.9 / 128) * dq.nestedAbsmax[0] + 1e-7, `block ${b}`);
        }
      }
      await f.close();
    }
    // missing component named in the error
    const p = join(dir, 'broken.safetensors');
    await writeSafetensors(p, bnbTensors('x.weight', W).filter((t) => !t.name.endsWith('nested_absmax')));
    const f = await SafetensorsFile.open(p);
    await assert.rejects(readBnbNF4(f, 'x.weight'), /bnb weight x.weight: missing tensor x.weight.nested_absmax/);
    await f.close();
  } finally {
    await rm(dir, { recursive: true });
  }
});

/** A tiny Llama-style BF16 model dir: 2 layers, hidden 64, GQA 4/2 heads, untied lm_head. */
async function tinyModel(dir: string): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
  const C = 64, I = 96, V = 40, L = 2, H = 4, KV = 2, D = 16;
  const config = {
    architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: C, intermediate_size: I, num_hidden_layers: L,
    num_attention_heads: H, num_key_value_heads: KV, vocab_size: V, rms_norm_eps: 1e-5, rope_theta: 10000.0,
    max_position_embeddings: 128, tie_word_embeddings: false, torch_dtype: 'bfloat16', bos_token_id: 1, eos_token_id: 2,
  };
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  await writeFile(join(dir, 'tokenizer_config.json'), '{"eos_token": "</s>"}');
  const w = new Map<string, { shape: number[]; data: Float32Array }>();
  let seed = 1;
  const rnd = (shape: number[]) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const d = new Float32Array(n);
    for (let i = 0; i < n; i++) { seed = (seed * 1664525 + 1013904223) >>> 0; d[i] = decodeToFloat32('BF16', encodeFromFloat32('BF16', [(seed / 2 ** 32 - 0.5) * 0.2]))[0]; }
    w.set(name, { shape, data: d });
  };
  let name = 'model.embed_tokens.weight'; rnd([V, C]);
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    name = `${p}.input_layernorm.weight`; rnd([C]);
    name = `${p}.post_attention_layernorm.weight`; rnd([C]);
    name = `${p}.self_attn.q_proj.weight`; rnd([H * D, C]);
    name = `${p}.self_attn.k_proj.weight`; rnd([KV * D, C]);
    name = `${p}.self_attn.v_proj.weight`; rnd([KV * D, C]);
    name = `${p}.self_attn.o_proj.weight`; rnd([C, H * D]);
    name = `${p}.mlp.gate_proj.weight`; rnd([I, C]);
    name = `${p}.mlp.up_proj.weight`; rnd([I, C]);
    name = `${p}.mlp.down_proj.weight`; rnd([C, I]);
  }
  name = 'model.norm.weight'; rnd([C]);
  name = 'lm_head.weight'; rnd([V, C]);
  await writeSafetensors(join(dir, 'model.safetensors'), [...w].map(([n, t]) => ({ name: n, dtype: 'BF16' as const, shape: t.shape, data: t.data })), { format: 'pt' });
  return w;
}

test('quantize command output loads with openModelDir: same NF4 as on-the-fly, full-precision tensors unchanged', async () => {
  const dir = await tmp();
  try {
    const src = join(dir, 'src'), out = join(dir, 'out'), outPlain = join(dir, 'plain');
    await (await import('node:fs/promises')).mkdir(src);
    const weights = await tinyModel(src);
    // 20 kB shards force the sharded layout for a ~110 kB model
    const r = await quantizeModelDir(src, out, { maxShardBytes: 20_000 });
    assert.equal(r.quantized, 14);
    assert.equal(r.copied, 7);
    const files = await readdir(out);
    assert.ok(files.includes('model.safetensors.index.json'));
    assert.ok(files.includes('tokenizer_config.json'));
    assert.ok(!files.some((f) => f.endsWith('.spool')));
    const cfgText = await readFile(join(out, 'config.json'), 'utf8');
    const cfg = JSON.parse(cfgText);
    assert.equal(cfg.quantization_config.quant_method, 'bitsandbytes');
    assert.equal(cfg.quantization_config.bnb_4bit_use_double_quant, true);
    assert.equal(cfg.quantization_config.bnb_4bit_quant_type, 'nf4');
    assert.match(cfgText, /"llm_int8_threshold": 6\.0/);

    await quantizeModelDir(src, outPlain, { doubleQuant: false });
    await assert.rejects(quantizeModelDir(src, outPlain), /plain already holds a checkpoint \(model.safetensors\)/);
    const m = await openModelDir(out), mp = await openModelDir(outPlain), ms = await openModelDir(src);
    const msPlain = await openModelDir(src, { doubleQuant: false });
    try {
      assert.equal(m.prequantized, true);
      assert.equal(ms.prequantized, false);
      // the form the stages will hold: a checkpoint's own, else bnb_4bit_use_double_quant (default on)
      assert.deepEqual([m.doubleQuant, mp.doubleQuant, ms.doubleQuant, msPlain.doubleQuant], [true, false, true, false]);
      assert.equal((await openModelDir(outPlain, { doubleQuant: true }).then(async (x) => { const d = x.doubleQuant; await x.close(); return d; })), false);
      assert.equal(m.config.hiddenSize, 64);
      for (const [name, t] of weights) {
        if (name.endsWith('_proj.weight')) {
          // on the fly with double quantization (the default) holds exactly what the quantize command wrote;
          // without it, exactly the plain checkpoint's float32 absmax
          const fly = await ms.weights.getNF4(name);
          const flyPlain = await msPlain.weights.getNF4(name);
          const q = await m.weights.getNF4(name);
          const qp = await mp.weights.getNF4(name);
          assert.deepEqual([q.rows, q.cols], t.shape);
          assert.deepEqual(q.packed, fly.packed, name);
          assert.deepEqual(qp.packed, fly.packed, name);
          assert.ok(isDoubleQuant(fly.absmax) && isDoubleQuant(q.absmax) && !isDoubleQuant(qp.absmax) && !isDoubleQuant(flyPlain.absmax), name);
          assert.deepEqual(q.absmax, fly.absmax, name);
          assert.deepEqual(qp.absmax, flyPlain.absmax, name);
          const a = decodeAbsmax(q.absmax), ap = decodeAbsmax(qp.absmax);
          for (let b = 0; b < a.length; b++) assert.ok(Math.abs(a[b] - ap[b]) <= 1e-3 * ap[b] + 1e-6, `${name} block ${b}`);
        } else {
          assert.deepEqual(await m.weights.getFloat(name), t.data, name); // BF16 copied bit for bit
        }
      }
      const f = await SafetensorsFile.open(join(out, (JSON.parse(await readFile(join(out, 'model.safetensors.index.json'), 'utf8')).weight_map['model.norm.weight'])));
      assert.equal(f.info('model.norm.weight').dtype, 'BF16');
      assert.deepEqual(f.metadata, { format: 'pt' });
      await f.close();
    } finally {
      await m.close(); await mp.close(); await ms.close(); await msPlain.close();
    }
    await assert.rejects(openModelDir(join(dir, 'missing')), /missing: model directory does not exist/);
    await assert.rejects(openModelDir(dir), new RegExp(`${dir}: no config.json`));
    await rm(join(src, 'model.safetensors'));
    await assert.rejects(openModelDir(src), /src: no model.safetensors or model.safetensors.index.json/);
  } finally {
    await rm(dir, { recursive: true });
  }
});

test('swarmtune quantize CLI: flags reach the writer (--no-double-quant, --blocksize)', async () => {
  const { Command } = await import('commander');
  const { registerQuantize } = await import('../bin/commands/quantize.ts');
  const dir = await tmp();
  try {
    const src = join(dir, 'src');
    await (await import('node:fs/promises')).mkdir(src);
    const weights = await tinyModel(src);
    const program = new Command().exitOverride();
    registerQuantize(program);
    const log = console.log;
    console.log = () => {};
    try {
      await program.parseAsync(['quantize', '--model', src, '--out', join(dir, 'o'), '--no-double-quant', '--blocksize', '128'], { from: 'user' });
    } finally {
      console.log = log;
    }
    const cfg = JSON.parse(await readFile(join(dir, 'o', 'config.json'), 'utf8'));
    assert.equal(cfg.quantization_config.bnb_4bit_use_double_quant, false);
    const m = await openModelDir(join(dir, 'o'));
    const name = 'model.layers.1.mlp.up_proj.weight';
    const q = await m.weights.getNF4(name);
    assert.equal(q.blocksize, 128);
    assert.deepEqual(q.packed, quantizeNF4(weights.get(name)!.data, 96, 64, 128).packed);
    await m.close();
    await assert.rejects(program.parseAsync(['quantize', '--model', src, '--out', join(dir, 'p'), '--blocksize', '100'], { from: 'user' }), /--blocksize must be a power of two/);
  } finally {
    await rm(dir, { recursive: true });
  }
});
