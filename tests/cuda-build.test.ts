// CUDA build checks that need no GPU: exported symbols, embedded GPU targets, launch math, and loadCudaBackend's null path.
//
// The library-dependent tests run when `npm run build:cuda` has produced cuda/build/ (CI builds it
// whenever nvcc exists) and are reported as skipped otherwise. Each test takes well under a second.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CUDA_ADDON_PATH, cudaUnavailableReason, loadCudaAddon, loadCudaBackend, probeCuda } from '../cuda/index.ts';
import { listFatbinEntries } from '../cuda/fatbin.ts';
import { pagedSlotBytes } from '../cuda/paging.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const buildDir = join(root, 'cuda', 'build');
const libPath = join(buildDir, 'libswarmtune_cuda.so');

function hasNvcc(): boolean {
  try {
    execFileSync('nvcc', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return existsSync('/usr/local/cuda/bin/nvcc');
  }
}

const built = existsSync(libPath) && existsSync(CUDA_ADDON_PATH);
const skipBuilt = !built
  ? (hasNvcc() ? 'CUDA library not built here: run `npm run build:cuda` first' : 'nvcc not installed: the CUDA library cannot be built here')
  : false;

function definedSymbols(path: string): Set<string> {
  const out = execFileSync('nm', ['-D', '--defined-only', path], { encoding: 'utf8' });
  return new Set(out.split('\n').map((l) => l.trim().split(/\s+/)).filter((f) => f.length === 3 && f[1] === 'T').map((f) => f[2]));
}

function declaredApi(): string[] {
  const header = readFileSync(join(root, 'cuda', 'src', 'api.h'), 'utf8');
  return [...header.matchAll(/STC_API\s+[\w\s*]+?\b(stc_\w+)\s*\(/g)].map((m) => m[1]);
}

test('api.h declares the ops the Backend interface needs', () => {
  // guards the header itself: one C entry point per Backend op
  const api = new Set(declaredApi());
  for (const sym of ['stc_gemm', 'stc_gemm_nf4', 'stc_gemm_nf4t', 'stc_dequant_nf4', 'stc_rmsnorm_forward',
    'stc_rmsnorm_backward', 'stc_rope', 'stc_attention_forward', 'stc_attention_backward', 'stc_swiglu_forward',
    'stc_swiglu_backward', 'stc_geglu_forward', 'stc_geglu_backward', 'stc_softcap_forward', 'stc_softcap_backward',
    'stc_embedding_forward', 'stc_cross_entropy_chunk_forward',
    'stc_cross_entropy_chunk_backward', 'stc_adamw32', 'stc_adamw8bit', 'stc_paged_step', 'stc_probe',
    // device-resident NF4 weights and the NF4 benchmark
    'stc_nf4_upload', 'stc_nf4_free', 'stc_nf4_resident_bytes', 'stc_nf4_stats', 'stc_gemm_nf4_resident',
    'stc_gemm_nf4t_resident', 'stc_dequant_nf4_resident', 'stc_bench_nf4',
    // device tensors: pool allocations, copies and the elementwise ops of a device-resident stage
    'stc_dev_alloc', 'stc_dev_free', 'stc_dev_check', 'stc_dev_stats', 'stc_copy', 'stc_add', 'stc_add_bias',
    'stc_mask_scale',
    // asynchronous ops: error flag, sync mode, mutex-free wait, counters, the fault hook of the GPU tests
    'stc_last_error_async', 'stc_set_sync', 'stc_sync', 'stc_async_stats', 'stc_debug_fault']) {
    assert.ok(api.has(sym), `cuda/src/api.h does not declare ${sym}`);
  }
});

test('libswarmtune_cuda.so exports every function declared in api.h', { skip: skipBuilt }, () => {
  const defined = definedSymbols(libPath);
  const missing = declaredApi().filter((s) => !defined.has(s));
  assert.deepEqual(missing, [], `symbols declared in api.h but not exported by ${libPath}`);
  // hidden visibility: nothing but the C ABI leaks out of the library
  const extra = [...defined].filter((s) => s.startsWith('_ZN3stc'));
  assert.deepEqual(extra, [], 'internal C++ symbols are exported');
});

test('the addon imports only symbols the library defines', { skip: skipBuilt }, () => {
  const undef = execFileSync('nm', ['-D', '--undefined-only', CUDA_ADDON_PATH], { encoding: 'utf8' })
    .split('\n').map((l) => l.trim().split(/\s+/).pop() ?? '').filter((s) => s.startsWith('stc_'));
  assert.ok(undef.length >= 30, `addon imports only ${undef.length} stc_ symbols`);
  const defined = definedSymbols(libPath);
  assert.deepEqual(undef.filter((s) => !defined.has(s)), []);
});

test('the addon exports every native function cuda/native.ts declares', { skip: skipBuilt }, () => {
  const src = readFileSync(join(root, 'cuda', 'native.ts'), 'utf8');
  const block = src.slice(src.indexOf('interface NativeCuda {'), src.indexOf('\n}\n', src.indexOf('interface NativeCuda {')));
  const expected = [...block.matchAll(/^ {2}(\w+)\(/gm)].map((m) => m[1]);
  assert.ok(expected.length >= 30, `parsed only ${expected.length} methods from NativeCuda`);
  const addon = loadCudaAddon();
  assert.ok(addon, `addon failed to load: ${cudaUnavailableReason()}`);
  const exported = new Set(Object.keys(addon));
  assert.deepEqual(expected.filter((m) => !exported.has(m) || typeof (addon as unknown as Record<string, unknown>)[m] !== 'function'), []);
});

test('the library embeds SASS and PTX for every target build.sh reported', { skip: skipBuilt }, () => {
  const targets = JSON.parse(readFileSync(join(buildDir, 'targets.json'), 'utf8')) as { sass: number[]; ptx: number[]; default: boolean };
  const entries = listFatbinEntries(libPath);
  const sass = new Set(entries.filter((e) => e.kind === 'sass').map((e) => e.arch));
  const ptx = new Set(entries.filter((e) => e.kind === 'ptx').map((e) => e.arch));
  assert.deepEqual([...sass].sort((a, b) => a - b), [...targets.sass].sort((a, b) => a - b));
  assert.deepEqual([...ptx], targets.ptx);
  if (targets.default) {
    // the target list: Turing, Ampere (A100 + consumer), Ada, Hopper, plus PTX for newer GPUs
    assert.deepEqual([...sass].sort((a, b) => a - b), [75, 80, 86, 89, 90]);
    assert.deepEqual([...ptx], [90]);
  }
});

test('loadCudaBackend and probeCuda return null with a reason when no GPU is usable', async (t) => {
  const addon = loadCudaAddon();
  if (addon && addon.deviceCount().count > 0) {
    t.skip('a CUDA device is present: the GPU checks (scripts/gpu-check.sh) cover this machine');
    return;
  }
  assert.equal(await loadCudaBackend(), null);
  const reason = cudaUnavailableReason();
  assert.ok(reason, 'no reason recorded');
  if (built) assert.match(reason, /no usable CUDA device: /);
  else assert.match(reason, /CUDA library not built: .*swarmtune_cuda\.node is missing/);
  assert.equal(await probeCuda(), null);
  assert.equal(await loadCudaBackend({ device: 3, gemmPrecision: 'fp32' }), null);
});

test('the addon rejects malformed arguments with TypeError instead of aborting', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon() as unknown as Record<string, (...a: unknown[]) => unknown>;
  assert.throws(() => addon.gemm(null, false, false, 1, 1, 1, 1, new Float32Array(1), new Float32Array(1), 0, new Float32Array(1)),
    (e: Error) => e.name === 'TypeError' && /gemm: argument 0 must be a CUDA context/.test(e.message));
  assert.throws(() => addon.gemmGrid('x', 1, true), (e: Error) => e.name === 'TypeError' && /argument 0 must be a number/.test(e.message));
  assert.throws(() => addon.pagedStep({}, 0, new Float32Array(1)), (e: Error) => e.name === 'TypeError');
});

test('GEMM launch grid covers M x N with 128x128 tensor-core or 64x64 SIMT tiles', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon()!;
  // shapes straddling tile edges, a LoRA-rank product and a Llama-3 vocabulary projection
  for (const [M, N] of [[1, 1], [127, 128], [128, 129], [4096, 16], [2048, 128256], [65535 * 64, 64]]) {
    const tc = addon.gemmGrid(M, N, true), simt = addon.gemmGrid(M, N, false);
    assert.equal(tc.threads, 256);
    assert.equal(simt.threads, 256);
    for (const [g, tile] of [[tc, 128], [simt, 64]] as const) {
      assert.ok(g.gridX * tile >= N && (g.gridX - 1) * tile < N, `gridX ${g.gridX} for N=${N}, tile ${tile}`);
      assert.ok(g.gridY * tile >= M && (g.gridY - 1) * tile < M, `gridY ${g.gridY} for M=${M}, tile ${tile}`);
    }
  }
});

test('attention launch picks a register tile that holds the head dim and rejects D > 256', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon()!;
  for (const D of [8, 16, 32, 33, 64, 80, 96, 128, 200, 256]) {
    const g = addon.attentionGrid(2, 100, 12, D);
    assert.equal(g.supported, true);
    // 4 lanes per row, each holding dimsPerThread interleaved dims: the smallest power-of-two tile >= D (min 32)
    assert.ok(4 * g.dimsPerThread >= D, `D=${D} does not fit ${g.dimsPerThread} dims per lane`);
    assert.ok(g.dimsPerThread === 8 || 2 * g.dimsPerThread < D, `D=${D} wastes a tile of ${g.dimsPerThread}`);
    assert.deepEqual([g.gridX, g.gridY, g.gridZ, g.threads], [Math.ceil(100 / 32), 12, 2, 128]);
  }
  assert.equal(addon.attentionGrid(1, 1, 1, 257).supported, false);
});

test('paged slot sizes agree between cuda/paging.ts and the library', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon()!;
  for (const bits of [8, 32] as const) {
    for (const pe of [256, 512, 3840, 4096, 65536, 1 << 20, 3 << 20]) {
      assert.equal(addon.pagedSlotBytes(bits, pe), pagedSlotBytes(bits, pe), `bits=${bits} pageElems=${pe}`);
    }
  }
  assert.equal(addon.pagedSlotBytes(8, 100), -1);  // not a multiple of the 256-element block
});

test('the addon validates the resident-weight functions before touching a device', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon() as unknown as Record<string, (...a: unknown[]) => unknown>;
  for (const name of ['nf4Upload', 'nf4Free', 'nf4Stats', 'gemmNF4Resident', 'gemmNF4TResident', 'dequantNF4Resident', 'benchNF4']) {
    assert.equal(typeof addon[name], 'function', `addon.${name} missing`);
  }
  const isType = (re: RegExp) => (e: Error) => e.name === 'TypeError' && re.test(e.message);
  assert.throws(() => addon.nf4Upload(null, new Uint8Array(2), new Float32Array(1), 2, 2, 64),
    isType(/nf4Upload: argument 0 must be a CUDA context/));
  assert.throws(() => addon.nf4Free({}, 1), isType(/nf4Free: argument 0 must be a CUDA context/));
  assert.throws(() => addon.nf4Stats(undefined), isType(/nf4Stats: argument 0 must be a CUDA context/));
  assert.throws(() => addon.gemmNF4Resident(null, 1, new Float32Array(1), 1, 0, new Float32Array(1)),
    isType(/gemmNF4Resident: argument 0/));
  assert.throws(() => addon.dequantNF4Resident(null, 1, new Float32Array(1)), isType(/dequantNF4Resident: argument 0/));
  assert.throws(() => addon.benchNF4(null, 1, 64, 64, 64, false, 1, new Float64Array(3)), isType(/benchNF4: argument 0/));
  assert.throws(() => addon.nf4ResidentBytes('64', 64, 64), isType(/nf4ResidentBytes: argument 0 must be a number/));
});

test('the addon validates the device-tensor functions before touching a device', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon() as unknown as Record<string, (...a: unknown[]) => unknown>;
  for (const name of ['devAlloc', 'devFree', 'devStats', 'copy', 'add', 'addBias', 'maskScale']) {
    assert.equal(typeof addon[name], 'function', `addon.${name} missing`);
  }
  const isType = (re: RegExp) => (e: Error) => e.name === 'TypeError' && re.test(e.message);
  assert.throws(() => addon.devAlloc(null, 16), isType(/devAlloc: argument 0 must be a CUDA context/));
  assert.throws(() => addon.devFree({}, 4096n, 16), isType(/devFree: argument 0 must be a CUDA context/));
  assert.throws(() => addon.devStats(undefined), isType(/devStats: argument 0 must be a CUDA context/));
  assert.throws(() => addon.copy(null, 4096n, new Float32Array(4), 16), isType(/copy: argument 0 must be a CUDA context/));
  assert.throws(() => addon.add(null, 4096n, 8192n, 1), isType(/add: argument 0 must be a CUDA context/));
  assert.throws(() => addon.addBias('ctx', 4096n, 8192n, 1, 1), isType(/addBias: argument 0 must be a CUDA context/));
  assert.throws(() => addon.maskScale(0, 4096n, 8192n, new Uint8Array(1), 1, 1, false), isType(/maskScale: argument 0 must be a CUDA context/));
  // device addresses are accepted only where a float buffer goes, and only with a context to check them against
  assert.throws(() => addon.gemm(null, false, false, 1, 1, 1, 1, 4096n, 4096n, 0, 4096n), isType(/gemm: argument 0 must be a CUDA context/));
  assert.throws(() => addon.pagedStep({}, 0, 4096n, 4096n), isType(/pagedStep: argument 0 must be a paged optimizer/));
});

test('resident NF4 size: packed codes padded to 256 bytes, then one float32 absmax per block, or the double-quantized constants', { skip: skipBuilt }, () => {
  const addon = loadCudaAddon()!;
  const pad = (b: number) => Math.ceil(b / 256) * 256;
  for (const [rows, cols, bs] of [[1, 1, 64], [7, 33, 32], [70, 96, 64], [4096, 4096, 64], [14336, 4096, 64], [300, 129, 128], [3, 3, 4096]]) {
    const n = rows * cols, blocks = Math.ceil(n / bs);
    const want = pad(Math.ceil(n / 2)) + 4 * blocks;
    assert.equal(addon.nf4ResidentBytes(rows, cols, bs), want, `[${rows},${cols}] blocksize ${bs}`);
    assert.equal(addon.nf4ResidentBytes(rows, cols, bs, 0), want, `[${rows},${cols}] blocksize ${bs}, nested 0`);
    // double quantization: 8-bit codes, float32 nested absmax per 256 codes, the 256-entry map, each 256-aligned
    for (const nbs of [256, 64, 4096]) {
      const dq = pad(pad(pad(Math.ceil(n / 2)) + blocks) + 4 * Math.ceil(blocks / nbs)) + 4 * 256;
      assert.equal(addon.nf4ResidentBytes(rows, cols, bs, nbs), dq, `[${rows},${cols}] blocksize ${bs} nested ${nbs}`);
    }
  }
  // 4096×4096, blocksize 64: 4 + 8/64 + 32/(64·256) bits per weight (+0.0005 for the map) instead of 4 + 0.5
  const bits = addon.nf4ResidentBytes(4096, 4096, 64, 256) * 8 / (4096 * 4096);
  assert.ok(Math.abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 0.001, `double-quantized: ${bits} bits per weight`);
  assert.equal(addon.nf4ResidentBytes(4096, 4096, 64) * 8 / (4096 * 4096), 4.5);
  // the Backend contract's blocksizes only: powers of two in 32..4096; nested: bitsandbytes' 64..4096
  for (const [rows, cols, bs] of [[0, 4, 64], [4, 0, 64], [-1, 4, 64], [4, 4, 16], [4, 4, 8192], [4, 4, 96], [4, 4, 0]]) {
    assert.equal(addon.nf4ResidentBytes(rows, cols, bs), -1, `[${rows},${cols}] blocksize ${bs} accepted`);
  }
  for (const nbs of [32, 100, 8192, -256]) assert.equal(addon.nf4ResidentBytes(64, 64, 64, nbs), -1, `nested blocksize ${nbs} accepted`);
});
