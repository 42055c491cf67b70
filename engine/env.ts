// The one place the process environment is read: every SWARMTUNE_* knob, typed and validated once.
// Modules take their knobs from `knobs()` (or a `Knobs` passed in); nothing else reads process.env.

export interface Knobs {
  /** DEBUG: namespaces to log (`swarmtune:coordinator:*`, comma separated, `-` excludes) */
  debug: string | undefined;
  /** SWARMTUNE_NO_CUDA=1: `--device auto` never tries the GPU */
  noCuda: boolean;
  /** SWARMTUNE_NATIVE_ADDON: another build of the C++ CPU kernels (absolute path of a .node file) */
  nativeAddon: string | undefined;
  /** SWARMTUNE_CUDA_ADDON: another build of the CUDA addon */
  cudaAddon: string | undefined;
  /** SWARMTUNE_CUDA_EMU=1: load the CPU emulator build of the CUDA sources (cuda/build-emu) */
  cudaEmu: boolean;
  /** SWARMTUNE_CUDA_SYNC=1: every CUDA op waits for its kernels (debugging) */
  cudaSync: boolean;
  /** SWARMTUNE_CACHE_DIR, else XDG_CACHE_HOME/swarmtune: where the embedded tiny model is written */
  cacheDir: string | undefined;
  xdgCacheHome: string | undefined;
  /** SWARMTUNE_COMPUTE_TIMEOUT_MS: per-request timeout of compute requests (forward, backward, collect, state fetches) */
  computeTimeoutMs: number | undefined;
  /** SWARMTUNE_BAN_BASE_MS: the first ban's length (tests use a few seconds) */
  banBaseMs: number | undefined;
  /** test aids, parsed by the modules that use them: SWARMTUNE_TEST_DELAY_MS, _BAD_OUTPUT, _BAD_ADAPTER, _CRASH */
  testDelayMs: number;
  testBadOutput: string | undefined;
  testBadAdapter: string | undefined;
  testCrash: string | undefined;
}

/** Every knob this file reads, for docs/operations.md and error messages. */
export const KNOB_NAMES = [
  'DEBUG', 'SWARMTUNE_NO_CUDA', 'SWARMTUNE_NATIVE_ADDON', 'SWARMTUNE_CUDA_ADDON', 'SWARMTUNE_CUDA_EMU', 'SWARMTUNE_CUDA_SYNC',
  'SWARMTUNE_CACHE_DIR', 'XDG_CACHE_HOME', 'SWARMTUNE_COMPUTE_TIMEOUT_MS', 'SWARMTUNE_BAN_BASE_MS',
  'SWARMTUNE_TEST_DELAY_MS', 'SWARMTUNE_TEST_BAD_OUTPUT', 'SWARMTUNE_TEST_BAD_ADAPTER', 'SWARMTUNE_TEST_CRASH',
] as const;

/** A knob with a bad value; the message names the variable and what it must be. */
export class EnvKnobError extends Error {
  override name = 'EnvKnobError';
}

type Env = Readonly<Record<string, string | undefined>>;

const set = (env: Env, name: string): string | undefined => {
  const v = env[name];
  return v === undefined || v === '' ? undefined : v;
};

function intMs(env: Env, name: string, min: number, max: number): number | undefined {
  const v = set(env, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new EnvKnobError(`${name} must be an integer number of ms in [${min}, ${max}], got "${v}"`);
  return n;
}

/** Parse and validate the knobs of `env` (a typo fails here, at start, not when the knob is first used). */
export function readKnobs(env: Env = process.env): Knobs {
  return {
    debug: set(env, 'DEBUG'),
    noCuda: env.SWARMTUNE_NO_CUDA === '1',
    nativeAddon: set(env, 'SWARMTUNE_NATIVE_ADDON'),
    cudaAddon: set(env, 'SWARMTUNE_CUDA_ADDON'),
    cudaEmu: env.SWARMTUNE_CUDA_EMU === '1',
    cudaSync: env.SWARMTUNE_CUDA_SYNC === '1',
    cacheDir: set(env, 'SWARMTUNE_CACHE_DIR'),
    xdgCacheHome: set(env, 'XDG_CACHE_HOME'),
    computeTimeoutMs: intMs(env, 'SWARMTUNE_COMPUTE_TIMEOUT_MS', 100, 24 * 3_600_000),
    banBaseMs: intMs(env, 'SWARMTUNE_BAN_BASE_MS', 1, 60 * 60_000),
    testDelayMs: intMs(env, 'SWARMTUNE_TEST_DELAY_MS', 0, 3_600_000) ?? 0,
    testBadOutput: set(env, 'SWARMTUNE_TEST_BAD_OUTPUT'),
    testBadAdapter: set(env, 'SWARMTUNE_TEST_BAD_ADAPTER'),
    testCrash: set(env, 'SWARMTUNE_TEST_CRASH'),
  };
}

let current: Knobs | undefined;

/** This process's knobs, read from process.env on first use. */
export function knobs(): Knobs {
  return (current ??= readKnobs());
}
