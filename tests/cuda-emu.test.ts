// The CUDA library's real source run on the CPU: cuda/src built against the emulator in cuda/emu (cuda/build-emu.sh,
// g++ only), its self-test, then every GPU test file (tests/gpu/*.gpu.ts) against that build. Fails if any GPU test
// fails or is skipped. See docs/cuda.md, section "Emulator". About 60-90 s on 2 cores (build ~15 s when stale).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const node = process.execPath;

function hasCompiler(): boolean {
  try {
    execFileSync(process.env.CXX ?? 'g++', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
const skip = hasCompiler() ? false : `no C++ compiler (${process.env.CXX ?? 'g++'}) to build the emulator`;

function newestInput(): number {
  let t = 0;
  const dirs = ['cuda/src', 'cuda/testing/emu', 'cuda/addon'];
  for (const d of dirs) for (const f of readdirSync(join(root, d))) t = Math.max(t, statSync(join(root, d, f)).mtimeMs);
  for (const f of ['cuda/build-emu.sh', 'cuda/build-addon.sh']) t = Math.max(t, statSync(join(root, f)).mtimeMs);
  return t;
}

/** The emulator build: cuda/build-emu when it is newer than every input (npm run build:cuda-emu), else a fresh
 *  build in a temporary directory (so concurrent test runs in one checkout never write the same files). */
function emulatorBuild(): string {
  const shared = join(root, 'cuda/build-emu');
  const outputs = ['libswarmtune_cuda.so', 'swarmtune_cuda.node', 'selftest'].map((f) => join(shared, f));
  if (outputs.every(existsSync) && Math.min(...outputs.map((f) => statSync(f).mtimeMs)) > newestInput()) return shared;
  const out = mkdtempSync(join(tmpdir(), 'swarmtune-cuda-emu-'));
  const r = spawnSync('bash', [join(root, 'cuda/build-emu.sh')], {
    env: { ...process.env, CUDA_EMU_OUT: out, NODE_BIN: node }, encoding: 'utf8', timeout: 300_000,
  });
  assert.equal(r.status, 0, `cuda/build-emu.sh failed:\n${r.stdout}\n${r.stderr}`);
  return out;
}

let build = '';
function getBuild(): string {
  build ||= emulatorBuild();
  return build;
}

function selftest(c: string, env: Record<string, string> = {}): string {
  const r = spawnSync(join(getBuild(), 'selftest'), [c], { env: { ...process.env, ...env }, encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 0, `selftest ${c}: exit ${r.status}\n${r.stdout}\n${r.stderr}`);
  return r.stdout.trim() + '\n' + r.stderr;
}

test('the emulator catches what it claims to and computes shuffles and WMMA exactly', { skip }, () => {
  assert.match(selftest('shfl'), /^shfl ok$/m);
  // a reader that skips __syncthreads runs before its neighbour wrote: it sees the poisoned (NaN) shared memory
  const race = selftest('race');
  assert.match(race, /^race barrier=0 nan=255 right=1$/m);
  assert.match(race, /^race barrier=1 nan=0 right=256$/m);
  const dl = selftest('deadlock');
  assert.match(dl, /^deadlock status=719 sticky=719$/m, 'a deadlocked block is a sticky launch failure');
  assert.match(dl, /deadlock, 32 of 64 threads wait forever/);
  assert.match(selftest('fault'), /^fault launch=700 sync=700 sticky=700$/m,
    'an illegal address is sticky (a first launch runs at issue, so the launch call already sees it)');
  const oob = selftest('oob');
  assert.match(oob, /^oob sync=700$/m, 'reading past a device allocation hits its guard page');
  assert.match(oob, /nearest allocation below: 0x[0-9a-f]+ \+ 16384 bytes \(device\)/);
  assert.match(selftest('limits'),
    /^limits bounds=0,701 ok=0,0 threads=9 dyn=1 attr=0 dyn_opt_in=0 value=255 attr_over=1$/m);
  assert.match(selftest('mask'), /^mask sync=715$/m, 'a shuffle reading a lane outside its mask is a fault');
  assert.match(selftest('wmma'), /^wmma ok misaligned=719$/m);
  assert.match(selftest('async'), /^async before=-5 after=1 pageable=1 types=1,0,2$/m,
    'queued copies into pinned memory complete at the wait; pageable copies before returning');
  // sm_75: the opt-in limit is 64 KiB
  assert.match(selftest('limits', { SWARMTUNE_CUDA_EMU_CC: '7.5' }), /exceeds the sm_75 opt-in limit 65536/);
});

/** This process's environment plus `extra`, without NODE_TEST_CONTEXT (with it the child `node --test` would
 *  report to this runner over a private channel instead of printing TAP). */
function childEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  delete env.NODE_TEST_CONTEXT;
  return env;
}

interface TapCounts { pass: number; fail: number; skipped: number; failures: string[] }

function tapCounts(out: string): TapCounts {
  const n = (k: string) => Number(new RegExp(`^# ${k} (\\d+)$`, 'm').exec(out)?.[1] ?? NaN);
  const failures = [...out.matchAll(/^not ok \d+ - (.*)$/gm)].map((m) => m[1]);
  return { pass: n('pass'), fail: n('fail'), skipped: n('skipped'), failures };
}

// Not run here yet (docs/cuda.md "Emulator"): async.gpu.ts expects an illegal-address kernel to surface at a later
// download, but the emulator runs a kernel's first launch at issue, so the launching op sees it; and its 10,000
// alloc/op/free rounds take minutes under emulation (needs a size knob).
const NOT_YET = new Set(['async.gpu.ts']);

test('every GPU test (tests/gpu/*.gpu.ts) passes on the emulated device, none skipped', { skip }, () => {
  const files = readdirSync(join(root, 'tests/gpu')).filter((f) => f.endsWith('.gpu.ts') && !NOT_YET.has(f)).sort()
    .map((f) => join('tests/gpu', f));
  assert.ok(files.length >= 5, `only ${files.length} GPU test files`);
  let pass = 0;
  // one plain `node <file>` per file (its node:test prints TAP): a nested `node --test` runner hangs here
  for (const f of files) {
    const r = spawnSync(node, ['--test-reporter=tap', f], {
      cwd: root, encoding: 'utf8', timeout: 240_000, maxBuffer: 64 << 20, stdio: ['ignore', 'pipe', 'pipe'],
      env: childEnv({ SWARMTUNE_CUDA_ADDON: join(getBuild(), 'swarmtune_cuda.node') }),
    });
    const c = tapCounts(r.stdout);
    const tail = (r.stdout + r.stderr).slice(-6000);
    assert.equal(c.fail, 0, `${f} failed under the emulator: ${c.failures.join('; ')}\n${tail}`);
    assert.equal(c.skipped, 0, `${f}: tests skipped under the emulator (a skip is never a pass):\n${tail}`);
    assert.ok(c.pass > 0, `${f}: nothing passed (exit ${r.status}, signal ${r.signal}):\n${tail}`);
    assert.equal(r.status, 0, tail);
    // nothing faulted or failed to launch on the way (a test that expects an error would still pass)
    assert.doesNotMatch(r.stderr, /stc-emu: (kernel fault|launch failed|launch of)/, r.stderr.slice(-3000));
    pass += c.pass;
  }
  assert.ok(pass >= 20, `only ${pass} GPU tests passed`);
});
