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
 *  'ref' the float64 reference; 'cuda' is not wired yet and throws BackendUnavailableError. */
export async function createBackend(kind: BackendKind = 'auto', opts?: { threads?: number }): Promise<Backend> {
  switch (kind) {
    case 'auto':
    case 'cpu':
      return new NativeBackend(opts);
    case 'ref':
      return new RefBackend();
    case 'cuda':
      throw new BackendUnavailableError('the CUDA backend is not built/available in this build (cuda/index.ts is not wired ' +
        "into createBackend yet); use 'cpu'");
    default:
      throw new BackendUnavailableError(`unknown backend kind ${JSON.stringify(kind)}; expected auto, cpu, ref or cuda`);
  }
}

export { NativeBackend, NativeOpError, NativeAddonMissingError, defaultThreadCount } from './native.ts';
export { RefBackend, RefOpError } from './ref.ts';
