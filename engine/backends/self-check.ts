// The GPU self-checks 'auto' runs before handing out an accelerator backend: a GEMM and the device-tensor path against the CPU.
import type { Backend } from '../backend.ts';

/** A small GEMM on `be` against the CPU backend: 'auto' only hands out a GPU backend whose results
 *  agree (bf16 tensor cores: relative error well under 1e-2), so a broken driver or kernel degrades to
 *  the CPU instead of training on garbage. Returns null when it agrees, else what was wrong. */
export async function selfCheck(be: Backend, cpu: Backend): Promise<string | null> {
  const M = 64, N = 96, K = 128;
  const A = new Float32Array(M * K), B = new Float32Array(N * K);
  let s = 12345;
  const rnd = () => { s = (s * 1103515245 + 12345) >>> 0; return (s / 2 ** 32) - 0.5; };
  for (let i = 0; i < A.length; i++) A[i] = rnd();
  for (let i = 0; i < B.length; i++) B[i] = rnd();
  const want = new Float32Array(M * N), got = new Float32Array(M * N);
  await cpu.gemm(false, true, M, N, K, 1, A, B, 0, want);
  try {
    await be.gemm(false, true, M, N, K, 1, A, B, 0, got);
  } catch (e) {
    return `its self-check GEMM failed: ${(e as Error).message}`;
  }
  let num = 0, den = 0;
  for (let i = 0; i < want.length; i++) { num += (got[i]! - want[i]!) ** 2; den += want[i]! ** 2; }
  const rel = Math.sqrt(num / den);
  return Number.isFinite(rel) && rel < 2e-2 ? null : `its self-check GEMM disagrees with the CPU backend (relative error ${rel.toExponential(2)})`;
}

/** The same check through the backend's device-resident tensors (Backend.tensors), the path stages use:
 *  upload, GEMM on device buffers, a residual add, download, free. Null when it agrees or the backend
 *  has no device tensors, else what was wrong. */
export async function selfCheckTensors(be: Backend, cpu: Backend): Promise<string | null> {
  if (!be.tensors) return null;
  const M = 48, N = 80, K = 96;
  const A = new Float32Array(M * K), B = new Float32Array(N * K), R = new Float32Array(M * N);
  let s = 54321;
  const rnd = () => { s = (s * 1103515245 + 12345) >>> 0; return (s / 2 ** 32) - 0.5; };
  for (const x of [A, B, R]) for (let i = 0; i < x.length; i++) x[i] = rnd();
  const want = new Float32Array(M * N);
  await cpu.gemm(false, true, M, N, K, 1, A, B, 0, want);
  for (let i = 0; i < want.length; i++) want[i] = want[i]! + R[i]!;
  let got: Float32Array;
  const t = be.tensors();
  const held: unknown[] = [];
  try {
    const a = await t.upload(A), b = await t.upload(B), r = await t.upload(R), c = t.alloc(M * N);
    held.push(a, b, r, c);
    await t.gemm(false, true, M, N, K, 1, a, b, 0, c);
    await t.add(c, r, M * N);
    got = await t.download(c);
  } catch (e) {
    return `its device-tensor self-check failed: ${(e as Error).message}`;
  } finally {
    for (const h of held) {
      try { t.free(h); } catch { /* reported by the check itself */ }
    }
  }
  let num = 0, den = 0;
  for (let i = 0; i < want.length; i++) { num += (got[i]! - want[i]!) ** 2; den += want[i]! ** 2; }
  const rel = Math.sqrt(num / den);
  return Number.isFinite(rel) && rel < 2e-2 ? null : `its device-tensor self-check disagrees with the CPU backend (relative error ${rel.toExponential(2)})`;
}
