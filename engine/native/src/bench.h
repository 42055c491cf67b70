// FMA-throughput probe used by bench/kernels.ts.
#pragma once
#include <cstdint>
// Runs `iters` iterations of 12 independent vector FMA chains on each of `threads` threads; GFLOP/s.
double fma_peak_gflops(int threads, int64_t iters);
