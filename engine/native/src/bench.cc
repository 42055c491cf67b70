// FMA-throughput probe: the machine's measured float32 peak that GEMM efficiency is reported against.
#include "bench.h"

#include <chrono>
#include <thread>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// 12 independent FMA chains per thread (enough to cover latency × issue width on Zen4/Intel).
double fma_loop(int64_t iters, float seed) {
#if defined(__AVX512F__)
  typedef __m512 V;
  const int lanes = 16;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#elif defined(__AVX2__)
  typedef __m256 V;
  const int lanes = 8;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
  V a = SET1(0.999999f), b = SET1(1e-7f);
  // named variables (not an array) so all 12 chains stay in registers
  V c0 = SET1(seed), c1 = SET1(seed + 1), c2 = SET1(seed + 2), c3 = SET1(seed + 3), c4 = SET1(seed + 4),
    c5 = SET1(seed + 5), c6 = SET1(seed + 6), c7 = SET1(seed + 7), c8 = SET1(seed + 8), c9 = SET1(seed + 9),
    c10 = SET1(seed + 10), c11 = SET1(seed + 11);
  for (int64_t it = 0; it < iters; it++) {
    c0 = FMA(c0, a, b); c1 = FMA(c1, a, b); c2 = FMA(c2, a, b); c3 = FMA(c3, a, b);
    c4 = FMA(c4, a, b); c5 = FMA(c5, a, b); c6 = FMA(c6, a, b); c7 = FMA(c7, a, b);
    c8 = FMA(c8, a, b); c9 = FMA(c9, a, b); c10 = FMA(c10, a, b); c11 = FMA(c11, a, b);
  }
  V c[12] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  float sink[16];
  V s = c[0];
  for (int i = 1; i < 12; i++) s = FMA(c[i], a, s);
#if defined(__AVX512F__)
  _mm512_storeu_ps(sink, s);
#else
  _mm256_storeu_ps(sink, s);
#endif
  volatile float keep = sink[0];
  (void)keep;
  return 12.0 * lanes * 2.0 * (double)iters;
#undef SET1
#undef FMA
#else
  float c[12];
  for (int i = 0; i < 12; i++) c[i] = seed + i;
  for (int64_t it = 0; it < iters; it++)
    for (int i = 0; i < 12; i++) c[i] = c[i] * 0.999999f + 1e-7f;
  volatile float keep = c[0] + c[11];
  (void)keep;
  return 12.0 * 2.0 * (double)iters;
#endif
}

}  // namespace

double fma_peak_gflops(int threads, int64_t iters) {
  if (threads < 1) threads = 1;
  std::vector<double> flops((size_t)threads, 0.0);
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) ts.emplace_back([&, t] { flops[(size_t)t] = fma_loop(iters, 0.5f + t); });
  for (auto& t : ts) t.join();
  double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (double f : flops) total += f;
  return total / sec / 1e9;
}
