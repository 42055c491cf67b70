// Backend factory: picks the compute backend by name ('auto' | 'cpu' | 'ref' | 'cuda').
import type { Backend } from '../backend.ts';
import { NativeBackend } from './native.ts';
import { RefBackend } from './ref.ts';

export type BackendKind = 'auto' | 'cpu' | 'ref' | 'cuda';

/** The CUDA backend was asked for but is not built or has no usable GPU. */
export class BackendUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BackendUnavailableError';
  }
}

/** 'auto' and 'cpu' give the native C++ backend (threads default: physical cores, defaultThreadCount());
 *  'ref' the float64 reference; 'cuda' the GPU backend of cuda/index.ts, or BackendUnavailableError
 *  saying why (library not built, no device). 'auto' does not pick CUDA yet. */
export async function createBackend(kind: BackendKind = 'auto', opts?: { threads?: number }): Promise<Backend> {
  switch (kind) {
    case 'auto':
    case 'cpu':
      return new NativeBackend(opts);
    case 'ref':
      return new RefBackend();
    case 'cuda': {
      // loaded lazily so CPU-only installs never touch the CUDA loader
      const cuda = await import('../../cuda/index.ts');
      const be = await cuda.loadCudaBackend();
      if (!be) {
        throw new BackendUnavailableError(`the CUDA backend is not available: ${cuda.cudaUnavailableReason() ?? 'unknown reason'}; ` +
          "use 'cpu'");
      }
      return be;
    }
    default:
      throw new BackendUnavailableError(`unknown backend kind ${JSON.stringify(kind)}; expected auto, cpu, ref or cuda`);
  }
}

export { NativeBackend, NativeOpError, NativeAddonMissingError, defaultThreadCount } from './native.ts';
export { RefBackend, RefOpError } from './ref.ts';
