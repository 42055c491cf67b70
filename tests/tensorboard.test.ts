// report_to tensorboard: the event file a training run writes, read back by a decoder written here from the
// TFRecord and protobuf specs (no code shared with engine/logging/tensorboard.ts): every record's masked
// CRC32C of length and data, the file-version event, and scalars under HF's TensorBoardCallback tags whose
// values and steps equal training_log.jsonl's. TensorBoard itself (Python) is not needed.
//
// Size: the embedded tiny model on the native CPU backend, 4 steps, eval every 2 on 5 examples: a second.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { registerBuiltinBackends } from '../bin/backends.ts';
import { createBackend } from '../engine/backends/registry.ts';
import { ensureTinyModel } from '../engine/tiny/index.ts';
import { TINY_DATASET_PATH } from '../engine/tiny/files.ts';
import { openModelDir } from '../engine/formats/model-dir.ts';
import { DEFAULT_TRAIN_CONFIG, applyConfigOverrides, validateTrainConfig } from '../engine/train/config.ts';
import { dataOptionsOf, loadDataset } from '../engine/train/data.ts';
import { Trainer, TRAINING_LOG_FILE } from '../engine/train/trainer.ts';
import { defaultLoggingDir } from '../engine/logging/tensorboard.ts';

registerBuiltinBackends();
const root = mkdtempSync(join(tmpdir(), 'swarmtune-tb-'));
after(() => rmSync(root, { recursive: true, force: true }));

// --- an independent reader: CRC-32C bit by bit (polynomial 0x1EDC6F41 reflected), TFRecord, protobuf ---
function crc32cBitwise(b: Uint8Array): number {
  let c = ~0 >>> 0;
  for (const x of b) {
    c ^= x;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0x82f63b78 & -(c & 1));
  }
  return ~c >>> 0;
}
const masked = (b: Uint8Array): number => {
  const c = crc32cBitwise(b);
  return ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) % 2 ** 32;
};

interface Field { field: number; wire: number; value: bigint | Uint8Array }
function protoFields(b: Uint8Array): Field[] {
  const out: Field[] = [];
  let i = 0;
  const varint = (): bigint => {
    let v = 0n, shift = 0n;
    for (;;) {
      const x = b[i++]!;
      v |= BigInt(x & 0x7f) << shift;
      if ((x & 0x80) === 0) return v;
      shift += 7n;
    }
  };
  while (i < b.length) {
    const k = Number(varint());
    const field = k >> 3, wire = k & 7;
    if (wire === 0) out.push({ field, wire, value: varint() });
    else if (wire === 1) { out.push({ field, wire, value: b.slice(i, i + 8) }); i += 8; }
    else if (wire === 5) { out.push({ field, wire, value: b.slice(i, i + 4) }); i += 4; }
    else if (wire === 2) { const n = Number(varint()); out.push({ field, wire, value: b.slice(i, i + n) }); i += n; }
    else throw new Error(`wire type ${wire} at ${i}`);
  }
  assert.equal(i, b.length, 'protobuf ends exactly at the record end');
  return out;
}

interface Ev { wallTime: number; step: number; fileVersion?: string; scalars: Array<{ tag: string; value: number }> }
function readEvents(file: string): Ev[] {
  const buf = readFileSync(file);
  const bytes = new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const events: Ev[] = [];
  let o = 0;
  while (o < bytes.length) {
    const len = Number(dv.getBigUint64(o, true));
    assert.equal(dv.getUint32(o + 8, true), masked(bytes.subarray(o, o + 8)), `length crc of record at ${o}`);
    const data = bytes.subarray(o + 12, o + 12 + len);
    assert.equal(dv.getUint32(o + 12 + len, true), masked(data), `data crc of record at ${o}`);
    o += 16 + len;
    const ev: Ev = { wallTime: NaN, step: 0, scalars: [] };
    for (const f of protoFields(data)) {
      if (f.field === 1 && f.wire === 1) ev.wallTime = new DataView((f.value as Uint8Array).buffer).getFloat64(0, true);
      else if (f.field === 2 && f.wire === 0) ev.step = Number(f.value);
      else if (f.field === 3 && f.wire === 2) ev.fileVersion = new TextDecoder().decode(f.value as Uint8Array);
      else if (f.field === 5 && f.wire === 2) {
        for (const v of protoFields(f.value as Uint8Array)) {
          assert.equal(v.field, 1, 'Summary.value');
          let tag = '', value = NaN;
          for (const g of protoFields(v.value as Uint8Array)) {
            if (g.field === 1) tag = new TextDecoder().decode(g.value as Uint8Array);
            else if (g.field === 2 && g.wire === 5) value = new DataView((g.value as Uint8Array).buffer).getFloat32(0, true);
          }
          ev.scalars.push({ tag, value });
        }
      } else throw new Error(`unexpected Event field ${f.field}/${f.wire}`);
    }
    events.push(ev);
  }
  assert.equal(o, bytes.length, 'no trailing bytes');
  return events;
}

test('CRC-32C of the reader matches the published check values', () => {
  const enc = (s: string) => new TextEncoder().encode(s);
  assert.equal(crc32cBitwise(enc('123456789')), 0xe3069283);
  // RFC 3720 B.4: 32 bytes of zeros, of 0xFF, and ascending 0..31
  assert.equal(crc32cBitwise(new Uint8Array(32)), 0x8a9136aa);
  assert.equal(crc32cBitwise(new Uint8Array(32).fill(0xff)), 0x62a8ab43);
  assert.equal(crc32cBitwise(Uint8Array.from({ length: 32 }, (_, i) => i)), 0x46dd794e);
});

test('a training run with report_to tensorboard writes events TensorBoard reads: train/* and eval/* scalars equal the JSONL log', async () => {
  const modelDir = await ensureTinyModel(join(root, 'tiny'));
  const md = await openModelDir(modelDir);
  const backend = await createBackend('cpu');
  try {
    const evalFile = join(root, 'eval.jsonl');
    writeFileSync(evalFile, readFileSync(TINY_DATASET_PATH, 'utf8').trim().split('\n').slice(0, 5).join('\n') + '\n');
    const out = join(root, 'out'), logDir = join(root, 'tb');
    const cfg = validateTrainConfig(applyConfigOverrides({ ...DEFAULT_TRAIN_CONFIG }, {
      output_dir: out, max_steps: 4, per_device_train_batch_size: 4, max_seq_length: 64, logging_steps: 1, save_strategy: 'no',
      eval_data: evalFile, eval_strategy: 'steps', eval_steps: 2, report_to: ['tensorboard'], logging_dir: logDir, learning_rate: 1e-3,
    }, 'test'));
    const opts = dataOptionsOf(cfg);
    const t = new Trainer({
      config: cfg, modelConfig: md.config, weights: md.weights, backend, baseModelName: modelDir,
      examples: loadDataset(TINY_DATASET_PATH, md.tokenizer!, opts).examples, evalExamples: loadDataset(evalFile, md.tokenizer!, opts).examples,
      padId: md.tokenizer!.padTokenId ?? md.tokenizer!.eosTokenId!,
    });
    const r = await t.run();
    const files = readdirSync(logDir);
    assert.equal(files.length, 1);
    assert.match(files[0]!, /^events\.out\.tfevents\.\d{10}\..+\.\d+\.\d+$/);
    assert.equal(r.tensorboardFile, join(logDir, files[0]!));
    const events = readEvents(join(logDir, files[0]!));
    assert.equal(events[0]!.fileVersion, 'brain.Event:2');
    assert.ok(Math.abs(events[0]!.wallTime - Date.now() / 1000) < 600, 'wall_time in seconds since the epoch');

    const byTag = new Map<string, Array<[number, number]>>();
    for (const e of events.slice(1)) for (const s of e.scalars) byTag.set(s.tag, [...(byTag.get(s.tag) ?? []), [e.step, s.value]]);
    const log = readFileSync(join(out, TRAINING_LOG_FILE), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, number | string>);
    const steps = log.filter((l) => l.event === 'step'), evals = log.filter((l) => l.event === 'eval');
    const f32 = (x: number) => Math.fround(x);
    assert.deepEqual(byTag.get('train/loss'), steps.map((l) => [l.step, f32(l.loss as number)]));
    assert.deepEqual(byTag.get('train/learning_rate'), steps.map((l) => [l.step, f32(l.lr as number)]));
    assert.deepEqual(byTag.get('train/grad_norm'), steps.map((l) => [l.step, f32(l.grad_norm as number)]));
    assert.deepEqual(byTag.get('eval/loss'), evals.map((l) => [l.step, f32(l.eval_loss as number)]));
    assert.deepEqual(byTag.get('eval/loss')!.map(([s]) => s), [2, 4]);
    for (const tag of ['eval/runtime', 'eval/samples_per_second', 'eval/steps_per_second']) assert.equal(byTag.get(tag)?.length, 2, tag);
    // train/epoch at every logged step and every evaluation, as HF logs epoch with both
    assert.equal(byTag.get('train/epoch')?.length, 6);
  } finally {
    backend.dispose();
    await md.close();
  }
});

test('the default logging_dir is HF\'s runs/<Mon><DD>_<HH>-<MM>-<SS>_<host>', () => {
  const d = defaultLoggingDir('/o', new Date(2026, 11, 2, 9, 5, 7));
  assert.match(d, /^\/o\/runs\/Dec02_09-05-07_.+$/);
});
