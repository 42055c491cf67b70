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
  const float* absmax;    // float32, one per `1 << log2_block` flat elements; nullptr when double-quantized
  // bitsandbytes double quantization (absmax == nullptr): block b's absmax is
  // code[qabsmax[b]] * nested[b >> log2_nested] + offset, two float32 roundings (nf4_block_absmax)
  const uint8_t* qabsmax = nullptr;
  const float* nested = nullptr;
  const float* code = nullptr;  // 256 entries
  float offset = 0.0f;
  int log2_nested = 0;
  int64_t rows, cols;
  int log2_block;
};

// Block b's float32 absmax. Double quantization decodes as bitsandbytes does: dequantize_blockwise's float32
// product, then `absmax += offset` in float32. The empty asm makes the product a value the compiler cannot see
// through, so it never contracts the two roundings into one fused multiply-add (-march=native has FMA).
inline float nf4_block_absmax(const NF4View& W, size_t b) {
  if (W.absmax) return W.absmax[b];
  float scaled = W.code[W.qabsmax[b]] * W.nested[b >> W.log2_nested];
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(scaled));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(scaled));
#else
  volatile float barrier = scaled;
  scaled = barrier;
#endif
  return scaled + W.offset;
}

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
