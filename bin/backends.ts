// The built-in compute backends, registered into the engine's registry: native C++ CPU, float64 reference, CUDA.
import { BackendUnavailableError, registerBackend } from '../engine/backends/registry.ts';
import { NativeBackend } from '../engine/backends/native.ts';
import { RefBackend } from '../engine/backends/ref.ts';

/** Register the providers the CLI offers (again is harmless: a kind's provider is replaced). Tests
 *  and tools that pick backends by kind call this as bin/swarmtune.ts does. */
export function registerBuiltinBackends(): void {
  registerBackend({ kind: 'cpu', create: async (opts) => new NativeBackend({ threads: opts.threads }) });
  registerBackend({ kind: 'ref', create: async () => new RefBackend() });
  registerBackend({
    kind: 'cuda',
    // cuda/ is loaded on first use, so CPU-only runs never touch the CUDA loader
    async create(opts) {
      const cuda = await import('../cuda/index.ts');
      const be = await cuda.loadCudaBackend({ device: opts.device ?? 0 });
      if (!be) {
        throw new BackendUnavailableError(`the CUDA backend is not available: ${cuda.cudaUnavailableReason() ?? 'unknown reason'}; ` +
          "use 'cpu'");
      }
      return be;
    },
    async probe(opts) {
      const cuda = await import('../cuda/index.ts');
      return cuda.probeCuda({ device: opts.device });
    },
  });
}
