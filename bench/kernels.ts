// CPU kernel benchmark: measured FMA peak, GEMM / NF4-fused GEMM GFLOP/s (float32 and double-quantized absmax), NF4 dequant
// GB/s, attention ms (prints JSON when run directly).
//
// Timings are the best of a few repetitions after a warm-up; on a shared machine they are noisy, so
// compare GEMM GFLOP/s with the FMA peak measured in the same run.
import { NativeBackend, defaultThreadCount, loadNativeAddon } from '../engine/backends/native.ts';
import type { NF4Weight } from '../engine/formats/nf4.ts';
import { nf4ConstantsBytes, withDoubleQuant } from '../engine/formats/nf4.ts';

function rand(n: number, seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}
function randNF4(rows: number, cols: number, seed: number): NF4Weight {
  const n = rows * cols;
  const packed = new Uint8Array(Math.ceil(n / 2));
  const bytes = rand(packed.length, seed);
  for (let i = 0; i < packed.length; i++) packed[i] = Math.floor((bytes[i] + 1) * 128) & 0xff;
  const absmax = rand(Math.ceil(n / 64), seed + 1).map((v) => 0.01 + Math.abs(v));
  return { packed, absmax, rows, cols, blocksize: 64 };
}

/** best wall time in ms of `reps` runs after one warm-up */
async function bestMs(fn: () => Promise<void>, reps = 5): Promise<number> {
  await fn();
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    await fn();
    best = Math.min(best, performance.now() - t0);
  }
  return best;
}

/** best wall times of a and b, measured alternately (a, b, a, b, …) so that load from other processes, which
 *  comes and goes, hits both alike: their ratio is what a comparison of two variants needs */
async function bestPairMs(a: () => Promise<void>, b: () => Promise<void>, reps = 15): Promise<[number, number]> {
  await a(); await b();
  let ba = Infinity, bb = Infinity;
  for (let r = 0; r < reps; r++) {
    let t0 = performance.now();
    await a();
    ba = Math.min(ba, performance.now() - t0);
    t0 = performance.now();
    await b();
    bb = Math.min(bb, performance.now() - t0);
  }
  return [ba, bb];
}

const round = (x: number, d = 1) => Number(x.toFixed(d));

export async function benchKernels(opts: { threads?: number } = {}): Promise<object> {
  const threads = opts.threads ?? defaultThreadCount();
  const lib = loadNativeAddon();
  // the best of 5 short probes (~0.1 s each): other processes on a shared machine only ever lower it
  const probe = (t: number) => Math.max(...Array.from({ length: 5 }, () => lib.fmaPeakGflops(t, 3e7)));
  const peak1 = probe(1);
  const peakAll = probe(threads);
  const be = new NativeBackend({ threads });
  const gemm: object[] = [];
  try {
    // (M tokens, N out features, K in features) of a linear layer y = x·Wᵀ
    for (const [M, N, K] of [[1024, 512, 512], [1024, 1536, 512], [1024, 512, 1536], [1024, 8192, 512]]) {
      const X = rand(M * K, 1), Wf = rand(N * K, 2), DY = rand(M * N, 3);
      const Y = new Float32Array(M * N), DX = new Float32Array(M * K), DW = new Float32Array(N * K);
      const W = randNF4(N, K, 4);
      // the same codes with the absmax double-quantized (bnb_4bit_use_double_quant): decoded in the panel packing
      const Wdq = withDoubleQuant(W);
      const flop = 2 * M * N * K;
      const gf = (ms: number) => round(flop / (ms / 1e3) / 1e9);
      const plain = await bestMs(() => be.gemm(false, true, M, N, K, 1, X, Wf, 0, Y));
      const plainNN = await bestMs(() => be.gemm(false, false, M, K, N, 1, DY, Wf, 0, DX));
      // float32 absmax and double-quantized absmax timed alternately: their ratio is the cost of double quantization
      const [nf4, nf4dq] = await bestPairMs(() => be.gemmNF4(M, X, W, 0, Y), () => be.gemmNF4(M, X, Wdq, 0, Y));
      const [nf4T, nf4Tdq] = await bestPairMs(() => be.gemmNF4T(M, DY, W, 0, DX), () => be.gemmNF4T(M, DY, Wdq, 0, DX));
      const wgrad = await bestMs(() => be.gemm(true, false, N, K, M, 1, DY, X, 1, DW));
      gemm.push({
        shape: `${M}x${N}x${K}`,
        'gflops_x·Wt_f32': gf(plain), 'gflops_dY·W_f32': gf(plainNN),
        'gflops_x·Wt_nf4': gf(nf4), 'gflops_dY·W_nf4': gf(nf4T), 'gflops_x·Wt_nf4dq': gf(nf4dq), 'gflops_dY·W_nf4dq': gf(nf4Tdq),
        'gflops_dYt·X_wgrad': gf(wgrad),
        // time with double-quantized absmax over time with float32 absmax, minus 1 (negative: noise)
        'dq_overhead_x·Wt': round(nf4dq / nf4 - 1, 3), 'dq_overhead_dY·W': round(nf4Tdq / nf4T - 1, 3),
      });
    }
    // LoRA rank-16 GEMMs of a 512→1536 layer over 1024 tokens: x·Aᵀ, (xAᵀ)·Bᵀ, dB = dYᵀ·(xAᵀ), dA = (dY·B)ᵀ·x
    const lora: object[] = [];
    for (const [name, tA, tB, M, N, K] of [['x·At', false, true, 1024, 16, 512], ['h·Bt', false, true, 1024, 1536, 16],
      ['dB=dYt·h', true, false, 1536, 16, 1024], ['dA=gt·x', true, false, 16, 512, 1024]] as const) {
      const A = rand(M * K, 21), Bm = rand(K * N, 22), C = new Float32Array(M * N);
      const ms = await bestMs(() => be.gemm(tA, tB, M, N, K, 1, A, Bm, 1, C), 9);
      lora.push({ op: name, shape: `${M}x${N}x${K}`, ms: round(ms, 3), gflops: round(2 * M * N * K / (ms / 1e3) / 1e9) });
    }
    // NF4 dequantization throughput on a 4096×4096 weight (64 MiB of float32 output)
    const R = 4096, Cc = 4096, W = randNF4(R, Cc, 9), out = new Float32Array(R * Cc);
    const Wdq = withDoubleQuant(W);
    const [dqMs, dqDqMs] = await bestPairMs(() => be.dequantNF4(W, out), () => be.dequantNF4(Wdq, out), 15);
    const dequant = {
      shape: `${R}x${Cc}`, ms: round(dqMs, 2),
      gbps_f32_out: round(R * Cc * 4 / (dqMs / 1e3) / 1e9, 2),
      gbps_packed_in: round((W.packed.length + nf4ConstantsBytes(W)) / (dqMs / 1e3) / 1e9, 2),
      double_quant_ms: round(dqDqMs, 2), double_quant_overhead: round(dqDqMs / dqMs - 1, 3),
    };
    // attention of the bench model: B=4, S=256, H=8, KV=4, D=64
    const B = 4, S = 256, H = 8, KV = 4, D = 64, T = B * S;
    const q = rand(T * H * D, 11), k = rand(T * KV * D, 12), v = rand(T * KV * D, 13), dout = rand(T * H * D, 14);
    const o = new Float32Array(T * H * D), lse = new Float32Array(B * H * S);
    const dq = new Float32Array(T * H * D), dk = new Float32Array(T * KV * D), dv = new Float32Array(T * KV * D);
    const fwdMs = await bestMs(() => be.attentionForward(o, lse, q, k, v, B, S, H, KV, D));
    const bwdMs = await bestMs(() => be.attentionBackward(dq, dk, dv, dout, q, k, v, o, lse, B, S, H, KV, D));
    // causal: S(S+1)/2 scored pairs, 2 matmuls of D each forward (4·D flops), 4 matmuls backward
    const pairs = B * H * S * (S + 1) / 2;
    const attention = {
      shape: `B=${B} S=${S} H=${H} KV=${KV} D=${D}`,
      fwd_ms: round(fwdMs, 2), bwd_ms: round(bwdMs, 2),
      fwd_gflops: round(pairs * 4 * D / (fwdMs / 1e3) / 1e9), bwd_gflops: round(pairs * 8 * D / (bwdMs / 1e3) / 1e9),
    };
    return {
      kernel: lib.kernelName(), threads,
      fma_peak_gflops_1thread: round(peak1), fma_peak_gflops_all_threads: round(peakAll),
      // the all-thread probe is lowered by anything else running; one core's peak × threads is the ceiling
      fma_peak_gflops_ceiling: round(Math.max(peakAll, peak1 * threads)),
      gemm, lora_gemm: lora, nf4_dequant: dequant, attention,
    };
  } finally {
    be.dispose();
  }
}

if (import.meta.main) {
  const threadsArg = process.argv.find((a) => a.startsWith('--threads='));
  const result = await benchKernels(threadsArg ? { threads: Number(threadsArg.slice(10)) } : {});
  console.log(JSON.stringify(result, null, 2));
}
