// Length-prefixed msgpack frames: 4-byte big-endian body length, then the msgpackr body, with a hard cap.
import { Packr, Unpackr } from 'msgpackr';
import { MAX_FRAME_BYTES } from './constants.ts';
import { DecodeError, FrameTooLargeError } from './errors.ts';

// Records and structured-clone extensions are off so a frame is plain msgpack that any
// implementation can produce, and decoding never builds class instances from remote bytes.
const packr = new Packr({ useRecords: false, moreTypes: false, structuredClone: false });
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number', structuredClone: false });

export function encodeFrame(msg: unknown, maxBytes = MAX_FRAME_BYTES): Uint8Array {
  const body = packr.pack(msg);
  if (body.length > maxBytes) throw new FrameTooLargeError(`outgoing frame of ${body.length} bytes exceeds the cap of ${maxBytes}`);
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length, false);
  out.set(body, 4);
  return out;
}

/** Decode one frame body. Throws DecodeError on malformed msgpack or trailing bytes. */
export function decodeBody(body: Uint8Array): unknown {
  try {
    const values = unpackr.unpackMultiple(body) as unknown[] | undefined;
    if (values === undefined || values.length !== 1) throw new DecodeError(`frame body holds ${values?.length ?? 0} msgpack values, expected 1`);
    return values[0];
  } catch (e) {
    if (e instanceof DecodeError) throw e;
    throw new DecodeError(`malformed msgpack frame of ${body.length} bytes: ${(e as Error).message}`);
  }
}

type Chunk = Uint8Array | { subarray(): Uint8Array };

/** Reads consecutive frames from a byte-chunk iterator (a libp2p stream), never buffering past the cap. */
export class FrameReader {
  private readonly it: AsyncIterator<Chunk>;
  private readonly maxBytes: number;
  private buf: Uint8Array = new Uint8Array(0);
  /** bytes of the frames returned so far (length prefixes included) */
  consumedBytes = 0;

  constructor(source: AsyncIterable<Chunk>, maxBytes = MAX_FRAME_BYTES) {
    this.it = source[Symbol.asyncIterator]();
    this.maxBytes = maxBytes;
  }

  /** Wait until `n` bytes are buffered; false when the source ended first. */
  private async fill(n: number): Promise<boolean> {
    if (this.buf.length >= n) return true;
    const parts: Uint8Array[] = [this.buf];
    let have = this.buf.length;
    while (have < n) {
      const r = await this.it.next();
      if (r.done === true) break;
      const c = r.value instanceof Uint8Array ? r.value : r.value.subarray();
      parts.push(c);
      have += c.length;
    }
    const merged = new Uint8Array(have);
    let o = 0;
    for (const p of parts) { merged.set(p, o); o += p.length; }
    this.buf = merged;
    return have >= n;
  }

  /** The next frame's decoded body, or undefined at a clean end of stream. */
  async read(): Promise<unknown> {
    if (!(await this.fill(4))) {
      if (this.buf.length === 0) return undefined;
      throw new DecodeError(`stream ended inside a frame length prefix (${this.buf.length} of 4 bytes)`);
    }
    const len = new DataView(this.buf.buffer, this.buf.byteOffset, 4).getUint32(0, false);
    if (len > this.maxBytes) throw new FrameTooLargeError(`incoming frame of ${len} bytes exceeds the cap of ${this.maxBytes}`);
    if (!(await this.fill(4 + len))) throw new DecodeError(`stream ended inside a frame: got ${this.buf.length - 4} of ${len} bytes`);
    const body = this.buf.subarray(4, 4 + len);
    this.buf = this.buf.subarray(4 + len);
    this.consumedBytes += 4 + len;
    return decodeBody(body);
  }
}
