// Capability probe of a volunteer: cores, RAM, offered memory and a measured GEMM throughput.
import os from 'node:os';
import type { Backend } from '../engine/backend.ts';
import { probeDevice } from '../engine/backends/index.ts';
import { cpuDeviceName } from '../protocol/messages.ts';
import type { Capabilities } from '../protocol/messages.ts';
import { SOFTWARE_VERSION } from '../protocol/constants.ts';

const UNITS: Record<string, number> = {
  b: 1, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40,
  k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40,
};

/** "10GiB", "512MiB", "2e9", "1.5GB" → bytes. */
export function parseBytes(s: string, what = 'size'): number {
  const m = /^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*$/.exec(s);
  const unit = m?.[2]?.toLowerCase() ?? '';
  const mult = UNITS[unit === '' ? 'b' : unit];
  if (m === null || mult === undefined) throw new Error(`${what}: cannot parse "${s}" as a size (examples: 10GiB, 512MiB, 2000000000)`);
  return Math.floor(Number(m[1]) * mult);
}

/** GFLOP/s of a short square GEMM on the backend. 256³ keeps the probe to tens of milliseconds
 *  on a 2-core CPU while being large enough to leave the overhead regime. */
export async function measureGemmGflops(backend: Backend, n = 256, reps = 3): Promise<number> {
  const A = new Float32Array(n * n).fill(0.5);
  const B = new Float32Array(n * n).fill(0.25);
  const C = new Float32Array(n * n);
  await backend.gemm(false, false, n, n, n, 1, A, B, 0, C); // warm-up (thread pool start, packing buffers)
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) await backend.gemm(false, false, n, n, n, 1, A, B, 0, C);
  const seconds = (performance.now() - t0) / 1000;
  return (2 * n * n * n * reps) / seconds / 1e9;
}

export interface ProbeOptions {
  device: string;
  /** --max-memory; defaults to 80% of free RAM on CPU */
  maxMemoryBytes?: number;
}

export async function probeCapabilities(backend: Backend, opts: ProbeOptions): Promise<Capabilities> {
  const total = os.totalmem();
  const free = os.freemem();
  // `--device auto` that found a usable GPU advertises it like `--device cuda` (GPU 0)
  const cuda = /^cuda(:(\d+))?$/.exec(opts.device) ?? (backend.name === 'cuda' ? /^cuda(:(\d+))?$/.exec('cuda:0') : null);
  if (cuda !== null) {
    // a GPU volunteer advertises its device: memory, compute capability, measured GEMM and bandwidth
    const g = await probeDevice('cuda', { device: Number(cuda[2] ?? 0) });
    if (g === null) throw new Error(`--device ${opts.device}: no usable CUDA device (driver, GPU or the built library is missing)`);
    return {
      backend: 'cuda',
      deviceName: `${cuda[0]} ${g.name}`.slice(0, 256),
      memoryBytes: Math.min(opts.maxMemoryBytes ?? Math.floor(g.freeMemoryBytes * 0.9), g.freeMemoryBytes),
      memoryTotalBytes: g.totalMemoryBytes,
      memoryFreeBytes: g.freeMemoryBytes,
      hostMemoryBytes: total,
      cores: Math.max(1, os.availableParallelism()),
      gemmGflops: g.bf16GemmTflops * 1000,
      computeCapability: g.computeCapability,
      memoryBandwidthGBs: g.memoryBandwidthGBs,
      softwareVersion: SOFTWARE_VERSION,
    };
  }
  const offered = opts.maxMemoryBytes ?? Math.floor(free * 0.8);
  return {
    backend: opts.device.startsWith('cuda') ? 'cuda' : 'cpu',
    deviceName: opts.device.startsWith('cuda') ? opts.device : cpuDeviceName(backend.name, os.cpus()[0]?.model ?? 'unknown'),
    memoryBytes: offered,
    memoryTotalBytes: total,
    memoryFreeBytes: free,
    hostMemoryBytes: total,
    cores: Math.max(1, os.availableParallelism()),
    gemmGflops: await measureGemmGflops(backend),
    computeCapability: null,
    memoryBandwidthGBs: null,
    softwareVersion: SOFTWARE_VERSION,
  };
}
