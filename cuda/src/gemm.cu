// Dense GEMM with trans flags on the kernels of gemm_kernels.cuh (bf16 tensor cores on sm_80+, fp32 SIMT below or
// with precision=fp32), its launch grid, and the capability probe (4096³ GEMM and a device copy kernel).
#include "gemm_kernels.cuh"

namespace stc {

int gemm_dev(stc_ctx* ctx, int transA, int transB, int M, int N, int K, float alpha, const float* A, const float* B,
             float beta, float* C, bool tc) {
  LoadF32 lb{B, transB ? (int64_t)K : (int64_t)N};
  if (!transA && !transB) return launch_gemm<0, 0>(ctx, M, N, K, alpha, A, lb, beta, C, tc);
  if (!transA && transB) return launch_gemm<0, 1>(ctx, M, N, K, alpha, A, lb, beta, C, tc);
  if (transA && !transB) return launch_gemm<1, 0>(ctx, M, N, K, alpha, A, lb, beta, C, tc);
  return launch_gemm<1, 1>(ctx, M, N, K, alpha, A, lb, beta, C, tc);
}

__global__ void copy_kernel(float4* __restrict__ dst, const float4* __restrict__ src, int64_t n4) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = src[i];
}

}  // namespace stc

using namespace stc;

extern "C" {

int stc_gemm_grid(int M, int N, int use_tensor_cores, int* grid_x, int* grid_y, int* threads) {
  int bm = use_tensor_cores ? TC_BM : SG_BM, bn = use_tensor_cores ? TC_BN : SG_BN;
  *grid_x = (N + bn - 1) / bn;
  *grid_y = (M + bm - 1) / bm;
  *threads = use_tensor_cores ? TC_THREADS : SG_THREADS;
  return 0;
}

int stc_gemm(stc_ctx* ctx, int transA, int transB, int M, int N, int K, float alpha, const float* A, const float* B,
             float beta, float* C) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_REQUIRE(M >= 0 && N >= 0 && K >= 0, "gemm: negative dimension M=%d N=%d K=%d", M, N, K);
  if (M == 0 || N == 0) return 0;
  DevBuf dA, dB, dC;
  STC_TRY(dA.upload(ctx, A, sizeof(float) * (size_t)M * K));
  STC_TRY(dB.upload(ctx, B, sizeof(float) * (size_t)K * N));
  if (beta != 0.0f) STC_TRY(dC.upload(ctx, C, sizeof(float) * (size_t)M * N));
  else STC_TRY(dC.out(ctx, C, sizeof(float) * (size_t)M * N));
  STC_TRY(gemm_dev(ctx, transA, transB, M, N, K, alpha, dA.as<float>(), dB.as<float>(), beta, dC.as<float>(),
                   ctx->tensor_cores()));
  return dC.download(C, sizeof(float) * (size_t)M * N);
}

int stc_probe(stc_ctx* ctx, double* gemm_tflops, double* bandwidth_gbs) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  // 4096^3 is large enough to saturate any current GPU and takes ~1 ms on an H100.
  const int S = 4096;
  const size_t bytes = sizeof(float) * (size_t)S * S;
  DevBuf a, b, c;
  STC_TRY(a.alloc(ctx, bytes));
  STC_TRY(b.alloc(ctx, bytes));
  STC_TRY(c.alloc(ctx, bytes));
  STC_TRY(a.zero());
  STC_TRY(b.zero());
  cudaEvent_t e0, e1;
  STC_CK(cudaEventCreate(&e0));
  cudaError_t ce = cudaEventCreate(&e1);
  if (ce != cudaSuccess) {
    cudaEventDestroy(e0);
    return fail_cuda(ce, "cudaEventCreate", __FILE__, __LINE__);
  }
  auto run = [&]() -> int {  // the events are destroyed on every path
    bool tc = ctx->cc_major >= 8;
    STC_TRY(gemm_dev(ctx, 0, 1, S, S, S, 1.0f, a.as<float>(), b.as<float>(), 0.0f, c.as<float>(), tc));  // warm-up
    const int iters = 5;
    float ms = 0;
    STC_CK(cudaEventRecord(e0, ctx->stream));
    for (int i = 0; i < iters; i++)
      STC_TRY(gemm_dev(ctx, 0, 1, S, S, S, 1.0f, a.as<float>(), b.as<float>(), 0.0f, c.as<float>(), tc));
    STC_CK(cudaEventRecord(e1, ctx->stream));
    STC_CK(cudaEventSynchronize(e1));
    STC_CK(cudaEventElapsedTime(&ms, e0, e1));
    *gemm_tflops = 2.0 * S * S * (double)S * iters / (ms * 1e-3) / 1e12;
    int64_t n4 = (int64_t)bytes / 16;
    copy_kernel<<<ctx->sm_count * 8, 256, 0, ctx->stream>>>(b.as<float4>(), a.as<float4>(), n4);
    STC_LAUNCHED(ctx->stream);
    STC_CK(cudaEventRecord(e0, ctx->stream));
    for (int i = 0; i < iters; i++) copy_kernel<<<ctx->sm_count * 8, 256, 0, ctx->stream>>>(b.as<float4>(), a.as<float4>(), n4);
    STC_CK(cudaEventRecord(e1, ctx->stream));
    STC_CK(cudaGetLastError());
    STC_CK(cudaEventSynchronize(e1));
    STC_CK(cudaEventElapsedTime(&ms, e0, e1));
    *bandwidth_gbs = 2.0 * bytes * iters / (ms * 1e-3) / 1e9;  // read + write
    return sync_stream(ctx, "cudaStreamSynchronize (probe)");
  };
  const int st = run();
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return st;
}

}  // extern "C"
