// Kernel resources from the build's ptxas report (cuda/build/resources.txt, written by cuda/build.sh with
// -Xptxas -v): the launch limits a kernel would only hit on a real GPU, checked without one.
// - every kernel is compiled for every SASS target the build reports;
// - registers fit the block: every launch in cuda/src uses at most 256 threads per block, so a kernel
//   may use at most 65536 / 256 = 256 registers per thread (allocated in units of 8) — ptxas caps at 255;
// - static shared memory stays under the 48 KiB every architecture grants without an opt-in (the
//   attention's dynamic shared memory opts in at launch; the emulator checks launches);
// - no kernel spills registers to local memory except the ones listed with a reason, so a change that
//   raises register pressure into spills fails here instead of silently slowing the GPU down.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { parsePtxasResources, shortKernelName } from '../cuda/resources.ts';

const dir = process.env.CUDA_BUILD_DIR ?? path.join(import.meta.dirname, '..', 'cuda', 'build');
const file = path.join(dir, 'resources.txt');
const skip = existsSync(file) ? false : `no ${path.relative(process.cwd(), file)}: the CUDA library was not built here (no nvcc, or built before cuda/build.sh kept ptxas reports)`;

/** spills accepted, with the reason (kernel name pattern → architectures) */
const ALLOWED_SPILLS: { name: RegExp; archs: RegExp; why: string }[] = [
  { name: /^attn_(bwd_dkdv_kernel<64,(true|false)>|bwd_dq_kernel<64>)$/, archs: /^sm_\d+$/, why: 'head dim 256: the dK/dV and dQ register tiles exceed 255 registers (documented in docs/cuda.md)' },
  { name: /^attn_bwd_dkdv_kernel<32,true>$/, archs: /^sm_(86|89)$/, why: 'head dim 128 with Gemma\'s soft-cap or sliding window on sm_86/sm_89: 28 bytes; the plain causal variant <32,false> does not spill (docs/cuda.md)' },
  { name: /^attn_fwd_kernel<8>$/, archs: /^sm_90$/, why: 'head dim 32 on sm_90: ptxas keeps 36 bytes of the online-softmax state on the stack' },
];

test('ptxas resources: every kernel on every target, registers and shared memory within launch limits, no unlisted spills', { skip }, () => {
  const all = parsePtxasResources(readFileSync(file, 'utf8'));
  assert.ok(all.length > 30, `parsed ${all.length} kernel entries`);
  const targets = JSON.parse(readFileSync(path.join(dir, 'targets.json'), 'utf8')) as { sass: number[] };
  const byArch = new Map<string, Set<string>>();
  for (const k of all) {
    if (!byArch.has(k.arch)) byArch.set(k.arch, new Set());
    byArch.get(k.arch)!.add(k.mangled);
  }
  assert.deepEqual([...byArch.keys()].sort(), targets.sass.map((a) => `sm_${a}`).sort(), 'ptxas ran for exactly the SASS targets the build reports');
  const reference = byArch.get(`sm_${targets.sass[0]}`)!;
  for (const [arch, set] of byArch) assert.deepEqual([...set].sort(), [...reference].sort(), `${arch} compiles the same kernels`);
  const problems: string[] = [];
  for (const k of all) {
    const regsPerThread = Math.ceil(k.registers / 8) * 8;
    if (regsPerThread * 256 > 65536) problems.push(`${k.arch} ${k.name}: ${k.registers} registers × 256 threads exceed 64K`);
    if (k.sharedBytes > 48 * 1024) problems.push(`${k.arch} ${k.name}: ${k.sharedBytes} bytes of static shared memory exceed 48 KiB`);
    if (k.spillStoreBytes > 0 || k.spillLoadBytes > 0) {
      if (!ALLOWED_SPILLS.some((a) => a.name.test(k.name) && a.archs.test(k.arch))) {
        problems.push(`${k.arch} ${k.name}: spills ${k.spillStoreBytes} bytes stored / ${k.spillLoadBytes} loaded (${k.registers} registers)`);
      }
    }
  }
  assert.deepEqual(problems, []);
  // the hot kernels: the tensor-core GEMM with the fused NF4 loader and the head-dim-64/128 attention do not spill,
  // and the plain causal dK/dV kernel (no soft-cap, no window: every Llama-family model) spills on no target
  for (const k of all.filter((x) => /^attn_bwd_dkdv_kernel<(8|16|32),false>$/.test(x.name))) assert.equal(k.spillStoreBytes, 0, `${k.arch} ${k.name} spills`);
  for (const k of all.filter((x) => x.arch === 'sm_90' && /^(gemm_tc_kernel|attn_\w+<(16|32)(,false)?>)/.test(x.name))) {
    assert.equal(k.spillStoreBytes, 0, `${k.arch} ${k.name} spills`);
  }
});

test('ptxas report parsing: names, registers, shared memory and spills', () => {
  const text = [
    "ptxas info    : Compiling entry function '_ZN3stc14gemm_tc_kernelILi0ELi1ENS_7LoadNF4EEEviiifPKfT1_fPf' for 'sm_90'",
    'ptxas info    : Function properties for _ZN3stc14gemm_tc_kernelILi0ELi1ENS_7LoadNF4EEEviiifPKfT1_fPf',
    '    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads',
    'ptxas info    : Used 168 registers, used 1 barriers, 27200 bytes smem, 408 bytes cmem[0]',
    "ptxas info    : Compiling entry function '_ZN3stc11rope_kernelEPfPKfS2_PKiiiif' for 'sm_75'",
    'ptxas info    : Function properties for _ZN3stc11rope_kernelEPfPKfS2_PKiiiif',
    '    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads',
    'ptxas info    : Used 32 registers, used 0 barriers, 400 bytes cmem[0]',
  ].join('\n');
  const r = parsePtxasResources(text);
  assert.deepEqual(r.map((k) => [k.name, k.arch, k.registers, k.sharedBytes, k.stackBytes, k.spillStoreBytes, k.spillLoadBytes]), [
    ['gemm_tc_kernel<0,1,LoadNF4>', 'sm_90', 168, 27200, 8, 12, 16],
    ['rope_kernel', 'sm_75', 32, 0, 0, 0, 0],
  ]);
  assert.equal(shortKernelName('_ZN3stc15attn_fwd_kernelILi16EEEvPfS1_PKfS3_S3_iiiif'), 'attn_fwd_kernel<16>');
});
