// Embedding / lm_head matrices [V, C] held as bfloat16 when that is lossless (halves the largest tensors of the first and last stage).
//
// HF checkpoints store these in bf16, so float32 → bf16 is exact for them; a float32 checkpoint with
// values bf16 cannot hold keeps float32, so numerics never change.
import type { Backend, TensorBackend } from '../backend.ts';

export class VocabMatrix {
  readonly rows: number;
  readonly cols: number;
  private readonly f32: Float32Array | null;
  private readonly bf16: Uint16Array | null;
  /** multiplies the embedded rows (Gemma's sqrt(hidden) normalizer, a float32 value); 1 elsewhere */
  readonly embedScale: number;

  /** `packed`: the bf16 form create() already made (null: keep float32); absent: decided here, synchronously.
   *  `data` may be null only with a bf16 `packed`. */
  constructor(data: Float32Array | null, rows: number, cols: number, embedScale = 1, packed?: Uint16Array | null) {
    if (data !== null && data.length !== rows * cols) throw new RangeError(`VocabMatrix: ${data.length} values for [${rows}, ${cols}]`);
    this.rows = rows;
    this.cols = cols;
    this.embedScale = embedScale;
    if (packed !== undefined) {
      if (packed !== null && packed.length !== rows * cols) throw new RangeError(`VocabMatrix: ${packed.length} bf16 values for [${rows}, ${cols}]`);
      if (packed === null && data === null) throw new RangeError('VocabMatrix: neither float32 nor bf16 values');
      this.bf16 = packed;
      this.f32 = packed === null ? data : null;
      return;
    }
    if (data === null) throw new RangeError('VocabMatrix: no values to decide bf16 or float32 from');
    const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
    let lossless = true;
    for (let i = 0; i < bits.length; i++) if ((bits[i] & 0xffff) !== 0) { lossless = false; break; }
    if (lossless) {
      const h = new Uint16Array(data.length);
      for (let i = 0; i < bits.length; i++) h[i] = bits[i] >>> 16;
      this.bf16 = h;
      this.f32 = null;
    } else {
      this.f32 = data;
      this.bf16 = null;
    }
  }

  /** The same matrix, with the lossless check and the bf16 packing done in slices of `sliceElements` that
   *  yield to the event loop between them: a Llama-3 vocabulary (128256 × 4096) is 525M elements, seconds
   *  of work that would otherwise stop a volunteer's heartbeats while its stage loads. */
  static async create(data: Float32Array, rows: number, cols: number, embedScale = 1, opts: { signal?: AbortSignal; sliceElements?: number } = {}): Promise<VocabMatrix> {
    if (data.length !== rows * cols) throw new RangeError(`VocabMatrix: ${data.length} values for [${rows}, ${cols}]`);
    const slice = opts.sliceElements ?? 1 << 22;
    const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
    const pause = async (): Promise<void> => { await new Promise<void>((r) => setImmediate(r)); opts.signal?.throwIfAborted(); };
    for (let a = 0; a < bits.length; a += slice) {
      for (let i = a, e = Math.min(bits.length, a + slice); i < e; i++) if ((bits[i]! & 0xffff) !== 0) return new VocabMatrix(data, rows, cols, embedScale, null);
      await pause();
    }
    const h = new Uint16Array(data.length);
    for (let a = 0; a < bits.length; a += slice) {
      for (let i = a, e = Math.min(bits.length, a + slice); i < e; i++) h[i] = bits[i]! >>> 16;
      await pause();
    }
    return new VocabMatrix(data, rows, cols, embedScale, h);
  }

  /** The same matrix as create(), read slice by slice through `read` (out.length values from element
   *  `start`): while every value so far is bf16-exact only the bf16 form grows (half the bytes of float32,
   *  no whole float32 copy ever); at the first value that is not, the bf16 prefix is widened into a float32
   *  matrix and the rest read straight into it. Yields to the event loop between slices. */
  static async fromReader(read: (start: number, out: Float32Array) => Promise<void>, rows: number, cols: number, embedScale = 1,
    opts: { signal?: AbortSignal; sliceElements?: number } = {}): Promise<VocabMatrix> {
    const n = rows * cols;
    const slice = opts.sliceElements ?? 1 << 22;
    const pause = async (): Promise<void> => { await new Promise<void>((r) => setImmediate(r)); opts.signal?.throwIfAborted(); };
    const scratch = new Float32Array(Math.min(slice, n));
    const sbits = new Uint32Array(scratch.buffer);
    const h = new Uint16Array(n);
    let f: Float32Array | null = null;
    for (let a = 0; a < n; a += slice) {
      const len = Math.min(slice, n - a);
      if (f !== null) { await read(a, f.subarray(a, a + len)); await pause(); continue; }
      const s = scratch.subarray(0, len);
      await read(a, s);
      let exact = true;
      for (let i = 0; i < len; i++) if ((sbits[i]! & 0xffff) !== 0) { exact = false; break; }
      if (exact) {
        for (let i = 0; i < len; i++) h[a + i] = sbits[i]! >>> 16;
      } else {
        f = new Float32Array(n);
        const fbits = new Uint32Array(f.buffer);
        for (let b = 0; b < a; b += slice) {
          for (let i = b, e = Math.min(a, b + slice); i < e; i++) fbits[i] = h[i]! << 16;
          await pause();
        }
        f.set(s, a);
      }
      await pause();
    }
    // (h, written only while every value was exact, is dropped with this frame when f took over)
    return f !== null ? new VocabMatrix(f, rows, cols, embedScale, null) : new VocabMatrix(null, rows, cols, embedScale, h);
  }

  private full: Float32Array | null = null;

  get storedAsBf16(): boolean { return this.bf16 !== null; }

  /** The whole matrix as float32, decoded once and kept: token-by-token decoding would otherwise decode
   *  all V rows per generated token (50x the head GEMM). Only inference paths call this. */
  allF32(): Float32Array {
    if (this.f32) return this.f32;
    if (!this.full) this.full = this.rowsF32(0, this.rows, null);
    return this.full;
  }
  get bytes(): number { return (this.bf16 ? this.bf16.byteLength : this.f32!.byteLength) + (this.full ? this.full.byteLength : 0); }

  /** rows [r0, r1) as float32 [r1-r0, C]: a view when stored float32, else decoded into `scratch` */
  rowsF32(r0: number, r1: number, scratch: Float32Array | null): Float32Array {
    const C = this.cols;
    if (this.f32) return this.f32.subarray(r0 * C, r1 * C);
    const n = (r1 - r0) * C;
    const out = scratch && scratch.length >= n ? scratch.subarray(0, n) : new Float32Array(n);
    const bits = new Uint32Array(out.buffer, out.byteOffset, n);
    const src = this.bf16!;
    const off = r0 * C;
    for (let i = 0; i < n; i++) bits[i] = src[off + i] << 16;
    return out;
  }

  /** The rows of ids (T) as a (T, C) buffer of t (the first stage's input: gathered on the host from the
   *  bf16/f32 table, then uploaded). */
  async embed<Buf>(backend: Backend, t: TensorBackend<Buf>, ids: Int32Array, T: number): Promise<Buf> {
    const x = new Float32Array(T * this.cols);
    await this.gather(backend, x, ids, T);
    // the float32 product, as torch multiplies a float32 embedding by a float32 normalizer
    const s = this.embedScale;
    if (s !== 1) for (let i = 0; i < x.length; i++) x[i] = Math.fround(x[i] * s);
    return t.upload(x);
  }

  /** out[T, C] = rows ids[t] (validated against V) */
  async gather(backend: Backend, out: Float32Array, ids: Int32Array, T: number): Promise<void> {
    const C = this.cols, V = this.rows;
    if (this.f32) return backend.embeddingForward(out, ids, this.f32, T, C, V);
    if (ids.length < T || out.length < T * C) throw new RangeError(`embedding: ids ${ids.length} / out ${out.length} too short for T=${T}, C=${C}`);
    const bits = new Uint32Array(out.buffer, out.byteOffset, T * C);
    const src = this.bf16!;
    for (let t = 0; t < T; t++) {
      const id = ids[t];
      if (!(id >= 0 && id < V)) throw new RangeError(`embedding: ids[${t}] = ${id} is outside the vocabulary [0, ${V})`);
      const o = t * C, s = id * C;
      for (let c = 0; c < C; c++) bits[o + c] = src[s + c] << 16;
    }
  }
}
