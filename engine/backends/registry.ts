// The backend registry: providers (registered by bin/) make backends by kind; createBackend resolves 'auto', 'cpu', 'ref', 'cuda[:N]'.
//
// engine/ never imports a backend implementation: bin/backends.ts registers the CPU, reference and CUDA
// providers, so the engine's choice of backend ('auto') is written here once without loading cuda/.
import type { Backend } from '../backend.ts';
import { knobs } from '../env.ts';
import { selfCheck, selfCheckTensors } from './self-check.ts';

/** 'cuda:N' is GPU N (CUDA's numbering, after CUDA_VISIBLE_DEVICES); 'cuda' and 'auto' use GPU 0 */
export type BackendKind = 'auto' | 'cpu' | 'ref' | 'cuda' | `cuda:${number}`;

/** What a provider makes: the native C++ CPU backend, the float64 reference, a GPU. */
export type ProviderKind = 'cpu' | 'ref' | 'cuda';

/** The backend asked for cannot be had here: the CUDA library is not built, no GPU is usable, or the kind is unknown. */
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

export interface ProviderCreateOptions {
  /** CPU worker threads (the native backend; default: physical cores) */
  threads?: number;
  /** device index of an accelerator ('cuda:N'); 0 when not given */
  device?: number;
}

/** Facts and measurements of one accelerator device, as a volunteer advertises them. */
export interface DeviceProbe {
  name: string;
  totalMemoryBytes: number;
  freeMemoryBytes: number;
  /** "major.minor", e.g. "9.0" */
  computeCapability: string;
  bf16GemmTflops: number;
  memoryBandwidthGBs: number;
}

export interface BackendProvider {
  readonly kind: ProviderKind;
  /** A backend of this kind. Throws BackendUnavailableError when there is none here (library not
   *  built, no device): 'auto' then moves on without a word; an explicit kind reports the message. */
  create(opts: ProviderCreateOptions): Promise<Backend>;
  /** The device's capabilities (memory, compute capability, measured throughput); null when there is no usable device. */
  probe?(opts: { device: number }): Promise<DeviceProbe | null>;
}

const providers = new Map<ProviderKind, BackendProvider>();

/** Make `provider` the one for its kind (a later registration of the same kind replaces it). */
export function registerBackend(provider: BackendProvider): void {
  providers.set(provider.kind, provider);
}

function providerFor(kind: ProviderKind): BackendProvider {
  const p = providers.get(kind);
  if (p === undefined) throw new BackendUnavailableError(`no ${kind} backend provider is registered (registerBackend)`);
  return p;
}

/** The capabilities of device `device` of a provider kind; null when the provider is not registered,
 *  has no probe or finds no usable device. */
export async function probeDevice(kind: ProviderKind, opts: { device: number }): Promise<DeviceProbe | null> {
  const p = providers.get(kind);
  return p?.probe ? p.probe(opts) : null;
}

/** 'auto' = the best backend that works here: CUDA when the library is built, a GPU is usable and a
 *  self-check GEMM agrees with the CPU (its device-resident tensors only when they pass their own check); else the native C++ backend; else (addon not built) the float64
 *  reference, saying so through `note`. 'cpu' = the native C++ backend (threads default: physical
 *  cores, defaultThreadCount()); 'ref' = the float64 reference; 'cuda' = the GPU backend of
 *  cuda/index.ts, or BackendUnavailableError saying why (library not built, no device). */
export async function createBackend(kind: BackendKind = 'auto', opts?: CreateBackendOptions): Promise<Backend> {
  const note = opts?.note ?? ((m: string) => { process.stderr.write(`note: ${m}\n`); });
  switch (kind) {
    case 'auto':
      return autoBackend(opts?.threads, note);
    case 'cpu':
      return providerFor('cpu').create({ threads: opts?.threads });
    case 'ref':
      return providerFor('ref').create({});
    default: {
      const m = /^cuda(?::(\d+))?$/.exec(String(kind));
      if (m === null) {
        throw new BackendUnavailableError(`unknown backend kind ${JSON.stringify(kind)}; expected auto, cpu, ref, cuda or cuda:N`);
      }
      return providerFor('cuda').create({ device: Number(m[1] ?? 0) });
    }
  }
}

async function autoBackend(threads: number | undefined, note: (message: string) => void): Promise<Backend> {
  // read first: a malformed knob must fail here, not pass for a missing CPU addon and fall back to the reference
  const { noCuda } = knobs();
  let cpu: Backend;
  try {
    cpu = await providerFor('cpu').create({ threads });
  } catch (e) {
    note(`native CPU backend unavailable (${(e as Error).message.split('\n')[0]}); using the slow float64 reference backend — build it with: npm run build`);
    return providerFor('ref').create({});
  }
  const cuda = providers.get('cuda');
  if (noCuda || cuda === undefined) return cpu;
  let gpu: Backend;
  try {
    gpu = await cuda.create({ device: 0 });
  } catch (e) {
    // no library or no device is the normal CPU-only case: silent
    if (e instanceof BackendUnavailableError) return cpu;
    throw e;
  }
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
