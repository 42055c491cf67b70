// Argument contracts of the CUDA ops, checked on the host before anything reaches the device: a mistake is a
// CudaArgumentError naming the op and the argument, never a kernel fault.
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { checkNF4Absmax } from '../engine/formats/nf4.ts';
import { CudaArgumentError } from './errors.ts';

/** `arr` holds at least `n` elements (and `n` is a valid count). */
export function need(op: string, what: string, arr: { length: number }, n: number): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new CudaArgumentError(`CudaBackend.${op}: size of ${what} is ${n}, not a valid element count`);
  if (arr.length < n) throw new CudaArgumentError(`CudaBackend.${op}: ${what} has length ${arr.length}, expected at least ${n}`);
}

/** Every dimension fits the library's 32-bit ints. */
export function dims(op: string, d: Record<string, number>): void {
  for (const [k, v] of Object.entries(d)) {
    if (!Number.isInteger(v) || v < 0 || v > 0x7fffffff) throw new CudaArgumentError(`CudaBackend.${op}: ${k}=${v} must be an integer in [0, 2^31)`);
  }
}

/** W's geometry and buffers fit the Backend contract; its element count. */
export function checkNF4(op: string, W: NF4Weight): number {
  dims(op, { 'W.rows': W.rows, 'W.cols': W.cols });
  const bs = W.blocksize;
  if (!Number.isInteger(bs) || bs < 32 || bs > 4096 || (bs & (bs - 1)) !== 0) {
    throw new CudaArgumentError(`CudaBackend.${op}: W.blocksize=${bs} must be a power of two in 32..4096`);
  }
  const n = W.rows * W.cols;
  need(op, `W.packed of [${W.rows},${W.cols}]`, W.packed, Math.ceil(n / 2));
  try {
    checkNF4Absmax(W, `CudaBackend.${op}: W [${W.rows},${W.cols}] blocksize ${bs}`, true);
  } catch (e) {
    throw new CudaArgumentError((e as Error).message);
  }
  return n;
}
