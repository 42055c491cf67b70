// Backend factory: picks the compute backend by name ('auto' | 'cpu' | 'ref' | 'cuda' | 'cuda:N').
import type { Backend } from '../backend.ts';
import { NativeBackend } from './native.ts';
import { RefBackend } from './ref.ts';

/** 'cuda:N' is GPU N (CUDA's numbering, after CUDA_VISIBLE_DEVICES); 'cuda' and 'auto' use GPU 0 */
export type BackendKind = 'auto' | 'cpu' | 'ref' | 'cuda' | `cuda:${number}`;

/** The CUDA backend was asked for but is not built or has no usable GPU. */
export class BackendUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BackendUnavailableError';
  }
}

export interface CreateBackendOptions {
  threads?: number;
  /** where 'auto' explains a fallback (default: stderr); never called for an explicit kind */
  note?: (message: string) => void;
}

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

/** 'auto' = the best backend that works here: CUDA when the library is built, a GPU is usable and a
 *  self-check GEMM agrees with the CPU (its device-resident tensors only when they pass their own check); else the native C++ backend; else (addon not built) the float64
 *  reference, saying so through `note`. 'cpu' = the native C++ backend (threads default: physical
 *  cores, defaultThreadCount()); 'ref' = the float64 reference; 'cuda' = the GPU backend of
 *  cuda/index.ts, or BackendUnavailableError saying why (library not built, no device). */
export async function createBackend(kind: BackendKind = 'auto', opts?: CreateBackendOptions): Promise<Backend> {
  const note = opts?.note ?? ((m: string) => { process.stderr.write(`note: ${m}\n`); });
  switch (kind) {
    case 'auto': {
      let cpu: Backend;
      try {
        cpu = new NativeBackend(opts);
      } catch (e) {
        note(`native CPU backend unavailable (${(e as Error).message.split('\n')[0]}); using the slow float64 reference backend — build it with: npm run build`);
        return new RefBackend();
      }
      if (process.env.SWARMTUNE_NO_CUDA === '1') return cpu;
      const cuda = await import('../../cuda/index.ts');
      // no library or no device is the normal CPU-only case: silent
      if (!cuda.loadCudaAddon()) return cpu;
      const gpu = await cuda.loadCudaBackend();
      if (!gpu) return cpu;
      const bad = await selfCheck(gpu, cpu);
      if (bad !== null) {
        gpu.dispose();
        note(`CUDA backend not used: ${bad}; training on the CPU (set --device cuda to force it)`);
        return cpu;
      }
      const badTensors = await selfCheckTensors(gpu, cpu);
      if (badTensors !== null) {
        // the host-array ops work: keep the GPU, but without device-resident activations
        Object.defineProperty(gpu, 'tensors', { value: undefined, configurable: true });
        note(`CUDA device-resident tensors not used: ${badTensors}; activations go through host memory on every op (slower)`);
      }
      cpu.dispose();
      return gpu;
    }
    case 'cpu':
      return new NativeBackend(opts);
    case 'ref':
      return new RefBackend();
    default: {
      const m = /^cuda(?::(\d+))?$/.exec(String(kind));
      if (m === null) {
        throw new BackendUnavailableError(`unknown backend kind ${JSON.stringify(kind)}; expected auto, cpu, ref, cuda or cuda:N`);
      }
      // loaded lazily so CPU-only installs never touch the CUDA loader
      const cuda = await import('../../cuda/index.ts');
      const be = await cuda.loadCudaBackend({ device: Number(m[1] ?? 0) });
      if (!be) {
        throw new BackendUnavailableError(`the CUDA backend is not available: ${cuda.cudaUnavailableReason() ?? 'unknown reason'}; ` +
          "use 'cpu'");
      }
      return be;
    }
  }
}

export { NativeBackend, NativeOpError, NativeAddonMissingError, defaultThreadCount } from './native.ts';
export { RefBackend, RefOpError } from './ref.ts';
