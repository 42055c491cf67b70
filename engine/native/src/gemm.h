// Packed (BLIS-style) float32 GEMM and NF4-fused GEMM kernels.
#pragma once
#include <cstddef>
#include <cstdint>
#include "pool.h"

// bitsandbytes NF4 code table (facts §1), index = 4-bit code.
extern const float kNF4Lut[16];

struct NF4View {
  const uint8_t* packed;  // ceil(rows*cols/2) bytes, flat element 2j in the high nibble
  size_t packed_len;
  const float* absmax;    // one per `1 << log2_block` flat elements
  int64_t rows, cols;
  int log2_block;
};

// C[M,N] = alpha·op(A)·op(B) + beta·C; beta == 0 never reads C.
void gemm_f32(ThreadPool& pool, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
              const float* A, const float* B, float beta, float* C);
// Y[M,N] = X[M,K]·Wᵀ + beta·Y with W [N,K] NF4, dequantized while packing B panels.
void gemm_nf4(ThreadPool& pool, int64_t M, const float* X, const NF4View& W, float beta, float* Y);
// DX[M,K] = DY[M,N]·W + beta·DX with W [N,K] NF4.
void gemm_nf4_t(ThreadPool& pool, int64_t M, const float* DY, const NF4View& W, float beta, float* DX);
// out[rows*cols] = dequantized W.
void dequant_nf4(ThreadPool& pool, const NF4View& W, float* out);
// Decodes n consecutive flat elements starting at flat index f (exposed for the benchmark/tests).
void nf4_decode_run(float* out, const NF4View& W, size_t f, int64_t n);
// Which micro-kernel this build uses, e.g. "avx512 6x32".
const char* gemm_kernel_name();
