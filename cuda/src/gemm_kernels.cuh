// The GEMM kernels, shared by the dense GEMM (gemm.cu) and the NF4 GEMM (nf4.cu): a bf16 tensor-core path (WMMA,
// sm_80+) and an fp32 SIMT path, templated on the B-operand loader, so that NF4 dequantization is fused into the
// tile load (the weight is never materialized), and the launcher that picks one.
#pragma once
#include "common.cuh"
#include <cuda_bf16.h>
#include <mma.h>

namespace stc {

namespace wmma = nvcuda::wmma;

// bitsandbytes NF4 code table (facts §1), index = 4-bit code. Static: every translation unit that launches these
// kernels has its own copy in constant memory.
static __constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// B-operand loaders: element (r, c) of a row-major stored matrix with leading dimension ld.
struct LoadF32 {
  const float* __restrict__ p;
  int64_t ld;
  __device__ __forceinline__ float operator()(int64_t r, int64_t c, const float*) const { return __ldg(p + r * ld + c); }
};

// NF4 weight in bitsandbytes layout: flat element 2j in the high nibble, 2j+1 in the low nibble,
// absmax per `1 << log2bs` consecutive flat elements.
struct LoadNF4 {
  const uint8_t* __restrict__ packed;
  const float* __restrict__ absmax;
  int64_t ld;
  int log2bs;
  __device__ __forceinline__ float operator()(int64_t r, int64_t c, const float* lut) const {
    int64_t f = r * ld + c;
    unsigned b = __ldg(packed + (f >> 1));
    unsigned code = (f & 1) ? (b & 0xFu) : (b >> 4);
    return lut[code] * __ldg(absmax + (f >> log2bs));
  }
};

// The absmax of NF4 block b held double-quantized (bitsandbytes compress_statistics): the 8-bit code's value
// times its nested absmax, then + offset, rounded as bitsandbytes rounds them (__fmul_rn/__fadd_rn are never
// contracted into an FMA).
struct AbsmaxDQ {
  const uint8_t* __restrict__ q;
  const float* __restrict__ nested;
  const float* __restrict__ code;
  float offset;
  int log2nbs;
  __device__ __forceinline__ float operator()(int64_t b) const {
    return __fadd_rn(__fmul_rn(__ldg(code + __ldg(q + b)), __ldg(nested + (b >> log2nbs))), offset);
  }
};

// LoadNF4 with double-quantized absmax: the nested absmax is decoded inside the tile load, per element.
struct LoadNF4DQ {
  const uint8_t* __restrict__ packed;
  AbsmaxDQ absmax;
  int64_t ld;
  int log2bs;
  __device__ __forceinline__ float operator()(int64_t r, int64_t c, const float* lut) const {
    int64_t f = r * ld + c;
    unsigned b = __ldg(packed + (f >> 1));
    unsigned code = (f & 1) ? (b & 0xFu) : (b >> 4);
    return lut[code] * absmax(f >> log2bs);
  }
};

// ---- tensor-core path: 128x128 block tile, BK 32, 8 warps each owning 64x32 ----
constexpr int TC_BM = 128, TC_BN = 128, TC_BK = 32, TC_THREADS = 256;
// +8 bf16 padding keeps rows 16-byte aligned and spreads banks ([[maybe_unused]]: sm_75 compiles the body out)
[[maybe_unused]] constexpr int TC_ALD = TC_BK + 8;
[[maybe_unused]] constexpr int TC_BLD = TC_BN + 8;

template <int TA, int TB, class LB>
__global__ void __launch_bounds__(TC_THREADS)
gemm_tc_kernel(int M, int N, int K, float alpha, const float* __restrict__ A, LB lb, float beta,
               float* __restrict__ C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(128) __nv_bfloat16 As[TC_BM * TC_ALD];  // (BM, BK) row-major
  __shared__ __align__(128) __nv_bfloat16 Bs[TC_BK * TC_BLD];  // (BK, BN) row-major
  __shared__ __align__(128) float Cs[TC_THREADS / 32][16 * 16];
  __shared__ float lut[16];
  const int tid = threadIdx.x;
  if (tid < 16) lut[tid] = kNF4[tid];
  const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
  const int warp = tid >> 5, lane = tid & 31;
  const int wm = warp >> 2, wn = warp & 3;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

  float ra[16], rb[16];
  __syncthreads();  // lut visible before the first NF4 load

  // Thread-to-element maps follow the stored layout so global reads coalesce.
  auto a_idx = [&](int i, int& m, int& k) {
    if (TA) { m = tid & 127; k = (tid >> 7) + 2 * i; }
    else { k = tid & 31; m = (tid >> 5) + 8 * i; }
  };
  auto b_idx = [&](int i, int& k, int& n) {
    if (TB) { k = tid & 31; n = (tid >> 5) + 8 * i; }
    else { n = tid & 127; k = (tid >> 7) + 2 * i; }
  };
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < 16; i++) {
      int m, k;
      a_idx(i, m, k);
      int gm = m0 + m, gk = k0 + k;
      ra[i] = (gm < M && gk < K) ? (TA ? __ldg(A + (int64_t)gk * M + gm) : __ldg(A + (int64_t)gm * K + gk)) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 16; i++) {
      int k, n;
      b_idx(i, k, n);
      int gk = k0 + k, gn = n0 + n;
      rb[i] = (gk < K && gn < N) ? (TB ? lb(gn, gk, lut) : lb(gk, gn, lut)) : 0.0f;
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int i = 0; i < 16; i++) {
      int m, k;
      a_idx(i, m, k);
      As[m * TC_ALD + k] = __float2bfloat16_rn(ra[i]);
    }
#pragma unroll
    for (int i = 0; i < 16; i++) {
      int k, n;
      b_idx(i, k, n);
      Bs[k * TC_BLD + n] = __float2bfloat16_rn(rb[i]);
    }
  };

  const int nk = (K + TC_BK - 1) / TC_BK;
  if (nk > 0) load(0);
  for (int t = 0; t < nk; t++) {
    store();
    __syncthreads();
    if (t + 1 < nk) load((t + 1) * TC_BK);  // global loads of the next tile overlap this tile's MMAs
#pragma unroll
    for (int kk = 0; kk < TC_BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; i++) wmma::load_matrix_sync(fa[i], As + (wm * 64 + i * 16) * TC_ALD + kk, TC_ALD);
#pragma unroll
      for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], Bs + kk * TC_BLD + wn * 32 + j * 16, TC_BLD);
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  float* cs = Cs[warp];
#pragma unroll
  for (int i = 0; i < 4; i++) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
      wmma::store_matrix_sync(cs, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        int gm = m0 + wm * 64 + i * 16 + (e >> 4), gn = n0 + wn * 32 + j * 16 + (e & 15);
        if (gm < M && gn < N) {
          int64_t idx = (int64_t)gm * N + gn;
          float v = alpha * cs[e];
          C[idx] = beta == 0.0f ? v : v + beta * C[idx];  // beta 0 must ignore NaN in C
        }
      }
      __syncwarp();
    }
  }
#endif
}

// ---- fp32 SIMT path (sm_75, and precision=fp32): 64x64 tile, BK 16, 4x4 outputs per thread ----
constexpr int SG_BM = 64, SG_BN = 64, SG_BK = 16, SG_THREADS = 256;

template <int TA, int TB, class LB>
__global__ void __launch_bounds__(SG_THREADS)
gemm_simt_kernel(int M, int N, int K, float alpha, const float* __restrict__ A, LB lb, float beta,
                 float* __restrict__ C) {
  __shared__ float As[SG_BK][SG_BM + 4];  // k-major so the inner loop reads rows of m
  __shared__ float Bs[SG_BK][SG_BN + 4];
  __shared__ float lut[16];
  const int tid = threadIdx.x;
  if (tid < 16) lut[tid] = kNF4[tid];
  const int m0 = blockIdx.y * SG_BM, n0 = blockIdx.x * SG_BN;
  const int tx = tid & 15, ty = tid >> 4;
  float acc[4][4] = {};
  __syncthreads();
  for (int k0 = 0; k0 < K; k0 += SG_BK) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      int m, k;
      if (TA) { m = tid & 63; k = (tid >> 6) + 4 * i; }
      else { k = tid & 15; m = (tid >> 4) + 16 * i; }
      int gm = m0 + m, gk = k0 + k;
      As[k][m] = (gm < M && gk < K) ? (TA ? A[(int64_t)gk * M + gm] : A[(int64_t)gm * K + gk]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
      int k, n;
      if (TB) { k = tid & 15; n = (tid >> 4) + 16 * i; }
      else { n = tid & 63; k = (tid >> 6) + 4 * i; }
      int gk = k0 + k, gn = n0 + n;
      Bs[k][n] = (gk < K && gn < N) ? (TB ? lb(gn, gk, lut) : lb(gk, gn, lut)) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < SG_BK; k++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
      if (gm < M && gn < N) {
        int64_t idx = (int64_t)gm * N + gn;
        float v = alpha * acc[i][j];
        C[idx] = beta == 0.0f ? v : v + beta * C[idx];
      }
    }
}

template <int TA, int TB, class LB>
int launch_gemm(stc_ctx* ctx, int M, int N, int K, float alpha, const float* A, LB lb, float beta, float* C,
                bool tc) {
  int gx, gy, threads;
  stc_gemm_grid(M, N, tc ? 1 : 0, &gx, &gy, &threads);
  STC_REQUIRE(gy <= 65535, "gemm: M=%d needs %d row tiles, more than the 65535 grid limit", M, gy);
  if (tc)
    gemm_tc_kernel<TA, TB, LB><<<dim3(gx, gy), threads, 0, ctx->stream>>>(M, N, K, alpha, A, lb, beta, C);
  else
    gemm_simt_kernel<TA, TB, LB><<<dim3(gx, gy), threads, 0, ctx->stream>>>(M, N, K, alpha, A, lb, beta, C);
  STC_LAUNCHED(ctx->stream);
  return 0;
}

}  // namespace stc
