// TensorBoard event files written by hand: TFRecord framing (length, masked CRC32C of the length, data,
// masked CRC32C of the data) around Event protos, scalars as Summary.Value{tag, simple_value}, with the tag
// names transformers' TensorBoardCallback uses (train/loss, train/learning_rate, eval/loss, …).
import { closeSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';

export class TensorBoardError extends Error {
  override readonly name = 'TensorBoardError';
}

const CRC32C_TABLE = ((): Uint32Array => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1; // Castagnoli, reflected
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli), as TFRecord uses it. */
export function crc32c(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = CRC32C_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** TFRecord's masked CRC: rotate right by 15 and add a constant (so CRCs of CRCs stay distinct). */
export function maskedCrc32c(data: Uint8Array): number {
  const c = crc32c(data);
  return (((c >>> 15) | (c << 17)) + 0xa282ead8) >>> 0;
}

/** One TFRecord: u64 length LE, u32 masked crc of those 8 bytes, the data, u32 masked crc of the data. */
export function tfRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length + 4);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, BigInt(data.length), true);
  dv.setUint32(8, maskedCrc32c(out.subarray(0, 8)), true);
  out.set(data, 12);
  dv.setUint32(12 + data.length, maskedCrc32c(data), true);
  return out;
}

// --- protobuf, the few wire types an Event needs ---
function varint(v: bigint | number, out: number[]): void {
  let x = BigInt.asUintN(64, BigInt(v));
  while (x >= 0x80n) { out.push(Number(x & 0x7fn) | 0x80); x >>= 7n; }
  out.push(Number(x));
}
function key(field: number, wire: number, out: number[]): void { varint((field << 3) | wire, out); }
function bytesField(field: number, b: Uint8Array, out: number[]): void {
  key(field, 2, out); varint(b.length, out); for (const x of b) out.push(x);
}
function doubleField(field: number, v: number, out: number[]): void {
  key(field, 1, out);
  const b = new Uint8Array(8); new DataView(b.buffer).setFloat64(0, v, true); for (const x of b) out.push(x);
}
function floatField(field: number, v: number, out: number[]): void {
  key(field, 5, out);
  const b = new Uint8Array(4); new DataView(b.buffer).setFloat32(0, v, true); for (const x of b) out.push(x);
}
const utf8 = (s: string): Uint8Array => new TextEncoder().encode(s);

/** Event{wall_time = 1 (double), step = 2 (int64), file_version = 3 (string) | summary = 5 (Summary)};
 *  Summary{value = 1 (repeated Value)}; Value{tag = 1 (string), simple_value = 2 (float)}. */
export function encodeEvent(e: { wallTime: number; step?: number; fileVersion?: string; scalars?: ReadonlyArray<readonly [string, number]> }): Uint8Array {
  const out: number[] = [];
  doubleField(1, e.wallTime, out);
  if (e.step !== undefined && e.step !== 0) { key(2, 0, out); varint(e.step, out); }
  if (e.fileVersion !== undefined) bytesField(3, utf8(e.fileVersion), out);
  if (e.scalars !== undefined) {
    const summary: number[] = [];
    for (const [tag, v] of e.scalars) {
      const value: number[] = [];
      bytesField(1, utf8(tag), value);
      floatField(2, v, value);
      bytesField(1, Uint8Array.from(value), summary);
    }
    bytesField(5, Uint8Array.from(summary), out);
  }
  return Uint8Array.from(out);
}

/** HF's TensorBoardCallback rewrite_logs: eval_x → eval/x, test_x → test/x, everything else → train/x. */
export function tensorboardTag(key: string): string {
  if (key.startsWith('eval_')) return `eval/${key.slice(5)}`;
  if (key.startsWith('test_')) return `test/${key.slice(5)}`;
  return `train/${key}`;
}

/** HF's default logging_dir under output_dir: runs/<Mon><DD>_<HH>-<MM>-<SS>_<hostname> (local time). */
export function defaultLoggingDir(outputDir: string, now = new Date()): string {
  const mon = now.toLocaleString('en-US', { month: 'short' });
  const p = (n: number) => String(n).padStart(2, '0');
  return join(outputDir, 'runs', `${mon}${p(now.getDate())}_${p(now.getHours())}-${p(now.getMinutes())}-${p(now.getSeconds())}_${hostname()}`);
}

let fileCounter = 0;

/** An event file `events.out.tfevents.<unix s>.<host>.<pid>.<n>` in `dir` (torch's SummaryWriter name),
 *  opened with the file-version event; every add() is one synchronous append, so TensorBoard reads a
 *  running job's file as it grows and a crash loses nothing already logged. */
export class TensorBoardWriter {
  readonly path: string;
  private fd: number | null;

  constructor(dir: string) {
    try {
      mkdirSync(dir, { recursive: true });
      this.path = join(dir, `events.out.tfevents.${Math.floor(Date.now() / 1000)}.${hostname()}.${process.pid}.${fileCounter++}`);
      this.fd = openSync(this.path, 'a');
    } catch (e) {
      throw new TensorBoardError(`logging_dir ${dir}: cannot write TensorBoard events (${(e as Error).message})`);
    }
    this.write(encodeEvent({ wallTime: Date.now() / 1000, fileVersion: 'brain.Event:2' }));
  }

  /** Scalars of one log line at a global step, by HF's log keys (loss, learning_rate, eval_loss, …);
   *  non-finite values are written too (TensorBoard shows them), keys with non-number values skipped. */
  add(step: number, logs: Record<string, unknown>, wallTimeS = Date.now() / 1000): void {
    const scalars: Array<[string, number]> = [];
    for (const [k, v] of Object.entries(logs)) if (typeof v === 'number') scalars.push([tensorboardTag(k), v]);
    // one Event per scalar, as torch's add_scalar writes them
    for (const s of scalars) this.write(encodeEvent({ wallTime: wallTimeS, step, scalars: [s] }));
  }

  private write(data: Uint8Array): void {
    if (this.fd === null) throw new TensorBoardError(`${this.path}: written after close`);
    writeSync(this.fd, tfRecord(data));
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }
}
