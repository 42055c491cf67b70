// NF4 base weights on the GEMM kernels of gemm_kernels.cuh: Y = X·Wᵀ and DX = DY·W with dequantization fused into
// the tile load, standalone dequantization, weights uploaded per call or resident on the device by id, and the
// NF4 benchmark (dequant GB/s and NF4 GEMM TFLOP/s on device-resident random data). Every path takes float32 absmax
// or bitsandbytes double quantization (8-bit absmax codes decoded with their nested absmax in the load itself).
#include "gemm_kernels.cuh"

namespace stc {

// Float32 absmax of NF4 block b (the single-quantized form; AbsmaxDQ in gemm_kernels.cuh decodes the other).
struct AbsmaxF32 {
  const float* __restrict__ a;
  __device__ __forceinline__ float operator()(int64_t b) const { return __ldg(a + b); }
};

// Dequantization: each thread expands 8 consecutive elements (4 packed bytes, read as one 32-bit word;
// blocksize >= 32 is a multiple of 8, so they share one absmax) and writes two float4. A scalar loop
// covers the last n % 8 elements. Needs 4-byte aligned packed and 16-byte aligned out (pool buffers are
// whole cudaMalloc allocations; a caller's device `out` is used directly only when 16-byte aligned).
template <class Absmax>
__global__ void dequant_nf4_kernel(float* __restrict__ out, const uint8_t* __restrict__ packed, Absmax absmax,
                                   int64_t n, int log2bs) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = kNF4[threadIdx.x];
  __syncthreads();
  const int64_t n8 = n >> 3, stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n8; i += stride) {
    const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(packed) + i);
    const float s = absmax((i << 3) >> log2bs);
    // little-endian: byte j of w is packed byte 4i+j = elements 8i+2j (high nibble), 8i+2j+1 (low nibble)
    float4 a, b;
    a.x = lut[(w >> 4) & 15u] * s;
    a.y = lut[w & 15u] * s;
    a.z = lut[(w >> 12) & 15u] * s;
    a.w = lut[(w >> 8) & 15u] * s;
    b.x = lut[(w >> 20) & 15u] * s;
    b.y = lut[(w >> 16) & 15u] * s;
    b.z = lut[(w >> 28) & 15u] * s;
    b.w = lut[(w >> 24) & 15u] * s;
    reinterpret_cast<float4*>(out)[2 * i] = a;
    reinterpret_cast<float4*>(out)[2 * i + 1] = b;
  }
  for (int64_t f = (n8 << 3) + first; f < n; f += stride) {
    const unsigned byte = packed[f >> 1];
    const unsigned code = (f & 1) ? (byte & 0xFu) : (byte >> 4);
    out[f] = lut[code] * absmax(f >> log2bs);
  }
}

// Deterministic pseudo-random fill for the NF4 benchmark (a hash of the index; quality is irrelevant).
__global__ void fill_words_kernel(uint32_t* __restrict__ p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)i * 2654435761u ^ seed;
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    p[i] = x;
  }
}
__global__ void fill_floats_kernel(float* __restrict__ p, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)i * 2654435761u ^ seed;
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    p[i] = lo + (hi - lo) * (float)(x >> 8) * (1.0f / 16777216.0f);
  }
}

static int log2_exact(int v) {
  if (v <= 0) return -1;
  int l = 0;
  while ((1 << l) < v) l++;
  return (1 << l) == v ? l : -1;
}

// Geometry of an NF4 weight as the Backend contract defines it (blocksize a power of two in 32..4096).
static int check_nf4_geometry(const char* op, int rows, int cols, int blocksize, int* log2bs) {
  STC_REQUIRE(rows > 0 && cols > 0, "%s: NF4 weight rows=%d cols=%d must be positive", op, rows, cols);
  *log2bs = log2_exact(blocksize);
  STC_REQUIRE(*log2bs >= 5 && *log2bs <= 12, "%s: NF4 blocksize %d is not a power of two in 32..4096", op,
              blocksize);
  return 0;
}

static int64_t nf4_packed_bytes(int64_t n) { return (n + 1) / 2; }
static int64_t nf4_blocks(int64_t n, int log2bs) { return (n + (1LL << log2bs) - 1) >> log2bs; }
static int64_t align256(int64_t b) { return (b + 255) / 256 * 256; }

// Layout of a resident weight: packed codes, then each part of the constants at a 256-byte boundary (keeps
// float4/word loads aligned): float32 absmax; or, double-quantized, the 8-bit codes, the nested absmax, the map.
struct NF4Layout {
  int64_t absmax = 0, qabsmax = 0, nested = 0, code = 0, bytes = 0;
};
static NF4Layout nf4_layout(int64_t n, int log2bs, int log2nbs /* -1: float32 absmax */) {
  NF4Layout l;
  const int64_t nb = nf4_blocks(n, log2bs);
  const int64_t after_packed = align256(nf4_packed_bytes(n));
  if (log2nbs < 0) {
    l.absmax = after_packed;
    l.bytes = l.absmax + (int64_t)sizeof(float) * nb;
    return l;
  }
  l.qabsmax = after_packed;
  l.nested = align256(l.qabsmax + nb);
  l.code = align256(l.nested + (int64_t)sizeof(float) * ((nb + (1LL << log2nbs) - 1) >> log2nbs));
  l.bytes = l.code + (int64_t)sizeof(float) * 256;
  return l;
}

// The constants' form: float32 absmax, or double quantization with a valid nested blocksize and offset.
static int check_absmax(const char* op, const stc_nf4_absmax* a, int* log2nbs) {
  STC_REQUIRE(a != nullptr, "%s: no NF4 absmax (stc_nf4_absmax is NULL)", op);
  if (a->absmax) {
    *log2nbs = -1;
    return 0;
  }
  STC_REQUIRE(a->qabsmax && a->nested_absmax && a->code,
              "%s: double-quantized NF4 absmax needs qabsmax, nested_absmax and code (absmax is NULL)", op);
  *log2nbs = log2_exact(a->nested_blocksize);
  STC_REQUIRE(*log2nbs >= 6 && *log2nbs <= 12, "%s: nested_blocksize %d is not a power of two in 64..4096", op,
              a->nested_blocksize);
  STC_REQUIRE(a->offset - a->offset == 0.0f, "%s: double-quantization offset is not finite", op);
  return 0;
}

// An NF4 weight already on the device.
struct NF4View {
  const uint8_t* packed;
  const float* absmax;  // nullptr: double-quantized, see dq
  AbsmaxDQ dq;
  int rows, cols, log2bs;
};

// Y[M,rows] = X[M,cols]·Wᵀ + beta·Y (transposed = false) or DX[M,cols] = DY[M,rows]·W + beta·DX
// (transposed = true), activations in host or device memory, the weight on the device.
template <class LB>
static int nf4_gemm_launch(stc_ctx* ctx, int M, int Nout, int Kin, const float* X, LB lb, float beta, float* Y,
                           bool transposed) {
  if (!transposed)  // op(B)(k, n) = W[n, k]
    return launch_gemm<0, 1>(ctx, M, Nout, Kin, 1.0f, X, lb, beta, Y, ctx->tensor_cores());
  return launch_gemm<0, 0>(ctx, M, Nout, Kin, 1.0f, X, lb, beta, Y, ctx->tensor_cores());  // op(B)(k, n) = W[k, n]
}

static int nf4_gemm_host(stc_ctx* ctx, int M, const float* X, const NF4View& w, float beta, float* Y,
                         bool transposed) {
  if (M == 0) return 0;
  const int Nout = transposed ? w.cols : w.rows, Kin = transposed ? w.rows : w.cols;
  DevBuf dX, dY;
  STC_TRY(dX.upload(ctx, X, sizeof(float) * (size_t)M * Kin));
  if (beta != 0.0f) STC_TRY(dY.upload(ctx, Y, sizeof(float) * (size_t)M * Nout));
  else STC_TRY(dY.out(ctx, Y, sizeof(float) * (size_t)M * Nout));
  // The loader reads element (r, c) of W stored [rows, cols] with leading dimension cols.
  if (w.absmax)
    STC_TRY(nf4_gemm_launch(ctx, M, Nout, Kin, dX.as<float>(), LoadNF4{w.packed, w.absmax, (int64_t)w.cols, w.log2bs},
                            beta, dY.as<float>(), transposed));
  else
    STC_TRY(nf4_gemm_launch(ctx, M, Nout, Kin, dX.as<float>(), LoadNF4DQ{w.packed, w.dq, (int64_t)w.cols, w.log2bs},
                            beta, dY.as<float>(), transposed));
  return dY.download(Y, sizeof(float) * (size_t)M * Nout);
}

static unsigned dequant_grid(int64_t n) {
  const unsigned b = blocks_for((n + 7) / 8, 256);
  return b > 65535u ? 65535u : b;
}

static int nf4_dequant_host(stc_ctx* ctx, const NF4View& w, float* out) {
  const int64_t n = (int64_t)w.rows * w.cols;
  DevBuf dO;
  STC_TRY(dO.out(ctx, out, sizeof(float) * (size_t)n, 16));  // the kernel stores float4
  if (w.absmax)
    dequant_nf4_kernel<AbsmaxF32><<<dequant_grid(n), 256, 0, ctx->stream>>>(dO.as<float>(), w.packed, AbsmaxF32{w.absmax}, n,
                                                                            w.log2bs);
  else
    dequant_nf4_kernel<AbsmaxDQ><<<dequant_grid(n), 256, 0, ctx->stream>>>(dO.as<float>(), w.packed, w.dq, n, w.log2bs);
  STC_LAUNCHED(ctx->stream);
  return dO.download(out, sizeof(float) * (size_t)n);
}

// Pool buffers of a host NF4 weight uploaded for one call.
struct NF4Upload {
  DevBuf packed, absmax, qabsmax, nested, code;
};

// Uploads a host NF4 weight into pool buffers for one call.
static int upload_nf4(stc_ctx* ctx, const char* op, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows,
                      int cols, int blocksize, NF4Upload& up, NF4View* view) {
  int log2bs, log2nbs;
  STC_TRY(check_nf4_geometry(op, rows, cols, blocksize, &log2bs));
  STC_TRY(check_absmax(op, absmax, &log2nbs));
  const int64_t n = (int64_t)rows * cols, nb = nf4_blocks(n, log2bs);
  STC_TRY(up.packed.upload_input(ctx, packed, (size_t)nf4_packed_bytes(n)));
  *view = NF4View{up.packed.as<uint8_t>(), nullptr, AbsmaxDQ{}, rows, cols, log2bs};
  if (log2nbs < 0) {
    STC_TRY(up.absmax.upload(ctx, absmax->absmax, sizeof(float) * (size_t)nb));
    view->absmax = up.absmax.as<float>();
    return 0;
  }
  STC_TRY(up.qabsmax.upload_input(ctx, absmax->qabsmax, (size_t)nb, 1));
  STC_TRY(up.nested.upload(ctx, absmax->nested_absmax, sizeof(float) * (size_t)((nb + (1LL << log2nbs) - 1) >> log2nbs)));
  STC_TRY(up.code.upload(ctx, absmax->code, sizeof(float) * 256));
  view->dq = AbsmaxDQ{up.qabsmax.as<uint8_t>(), up.nested.as<float>(), up.code.as<float>(), absmax->offset, log2nbs};
  return 0;
}

static int find_weight(stc_ctx* ctx, const char* op, int64_t id, NF4View* view) {
  auto it = ctx->weights.find(id);
  STC_REQUIRE(it != ctx->weights.end(), "%s: no resident NF4 weight with id %lld (freed, or from another context)",
              op, (long long)id);
  const DevNF4& d = it->second;
  *view = NF4View{d.packed, d.absmax, AbsmaxDQ{d.qabsmax, d.nested, d.code, d.offset, d.log2nbs}, d.rows, d.cols, d.log2bs};
  return 0;
}

// cudaMalloc outside the pool; on out-of-memory the pool's cached buffers are released and it is retried once.
static int device_malloc(stc_ctx* ctx, void** p, size_t bytes, const char* what) {
  cudaError_t e = cudaMalloc(p, bytes);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    ctx->pool.trim();
    e = cudaMalloc(p, bytes);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    *p = nullptr;
    size_t freeB = 0, totalB = 0;
    cudaMemGetInfo(&freeB, &totalB);
    set_error("cudaMalloc(%zu bytes) for %s failed: %s (device free %zu of %zu bytes, resident weights %lld bytes)",
              bytes, what, cudaGetErrorString(e), freeB, totalB, (long long)ctx->weight_bytes);
    return (int)e;
  }
  return 0;
}

}  // namespace stc

using namespace stc;

extern "C" {

int stc_gemm_nf4(stc_ctx* ctx, int M, const float* X, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows,
                 int cols, int blocksize, float beta, float* Y) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_REQUIRE(M >= 0, "gemmNF4: negative M=%d", M);
  NF4Upload up;
  NF4View w;
  STC_TRY(upload_nf4(ctx, "gemmNF4", packed, absmax, rows, cols, blocksize, up, &w));
  return nf4_gemm_host(ctx, M, X, w, beta, Y, false);
}

int stc_gemm_nf4t(stc_ctx* ctx, int M, const float* DY, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows,
                  int cols, int blocksize, float beta, float* DX) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_REQUIRE(M >= 0, "gemmNF4T: negative M=%d", M);
  NF4Upload up;
  NF4View w;
  STC_TRY(upload_nf4(ctx, "gemmNF4T", packed, absmax, rows, cols, blocksize, up, &w));
  return nf4_gemm_host(ctx, M, DY, w, beta, DX, true);
}

int stc_dequant_nf4(stc_ctx* ctx, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows, int cols,
                    int blocksize, float* out) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  NF4Upload up;
  NF4View w;
  STC_TRY(upload_nf4(ctx, "dequantNF4", packed, absmax, rows, cols, blocksize, up, &w));
  return nf4_dequant_host(ctx, w, out);
}

int64_t stc_nf4_resident_bytes(int rows, int cols, int blocksize, int nested_blocksize) {
  const int l = log2_exact(blocksize);
  const int ln = nested_blocksize == 0 ? -1 : log2_exact(nested_blocksize);
  if (rows <= 0 || cols <= 0 || l < 5 || l > 12 || (nested_blocksize != 0 && (ln < 6 || ln > 12))) return -1;
  return nf4_layout((int64_t)rows * cols, l, ln).bytes;
}

int stc_nf4_upload(stc_ctx* ctx, const uint8_t* packed, const stc_nf4_absmax* absmax, int rows, int cols,
                   int blocksize, int64_t* weight_id, int64_t* device_bytes) {
  *weight_id = 0;
  *device_bytes = 0;
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  int log2bs, log2nbs;
  STC_TRY(check_nf4_geometry("nf4Upload", rows, cols, blocksize, &log2bs));
  STC_TRY(check_absmax("nf4Upload", absmax, &log2nbs));
  const int64_t n = (int64_t)rows * cols, nb = nf4_blocks(n, log2bs);
  const NF4Layout l = nf4_layout(n, log2bs, log2nbs);
  void* base = nullptr;
  STC_TRY(device_malloc(ctx, &base, (size_t)l.bytes, "a resident NF4 weight"));
  uint8_t* b = (uint8_t*)base;
  cudaError_t e = cudaMemcpyAsync(base, packed, (size_t)nf4_packed_bytes(n), cudaMemcpyDefault, ctx->stream);
  if (log2nbs < 0) {
    if (e == cudaSuccess)
      e = cudaMemcpyAsync(b + l.absmax, absmax->absmax, sizeof(float) * (size_t)nb, cudaMemcpyDefault, ctx->stream);
  } else {
    const int64_t nn = (nb + (1LL << log2nbs) - 1) >> log2nbs;
    if (e == cudaSuccess) e = cudaMemcpyAsync(b + l.qabsmax, absmax->qabsmax, (size_t)nb, cudaMemcpyDefault, ctx->stream);
    if (e == cudaSuccess)
      e = cudaMemcpyAsync(b + l.nested, absmax->nested_absmax, sizeof(float) * (size_t)nn, cudaMemcpyDefault, ctx->stream);
    if (e == cudaSuccess) e = cudaMemcpyAsync(b + l.code, absmax->code, sizeof(float) * 256, cudaMemcpyDefault, ctx->stream);
  }
  if (e != cudaSuccess) {
    const int st = fail_cuda(e, "copying an NF4 weight to the device", __FILE__, __LINE__);
    cudaFree(base);
    return st;
  }
  // the packed codes and constants are host memory: wait until they are on the device
  const int st = sync_stream(ctx, "cudaStreamSynchronize (NF4 weight upload)");
  if (st != 0) {
    cudaFree(base);
    return st;
  }
  DevNF4 d;
  d.base = base;
  d.bytes = (size_t)l.bytes;
  d.packed = b;
  if (log2nbs < 0) {
    d.absmax = (const float*)(b + l.absmax);
  } else {
    d.qabsmax = b + l.qabsmax;
    d.nested = (const float*)(b + l.nested);
    d.code = (const float*)(b + l.code);
    d.offset = absmax->offset;
    d.log2nbs = log2nbs;
  }
  d.rows = rows;
  d.cols = cols;
  d.log2bs = log2bs;
  const int64_t id = ctx->next_weight_id++;
  ctx->weights.emplace(id, d);
  ctx->weight_bytes += l.bytes;
  *weight_id = id;
  *device_bytes = l.bytes;
  return 0;
}

int stc_nf4_free(stc_ctx* ctx, int64_t weight_id) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  auto it = ctx->weights.find(weight_id);
  STC_REQUIRE(it != ctx->weights.end(), "nf4Free: no resident NF4 weight with id %lld", (long long)weight_id);
  // Device-only ops return without waiting, so kernels reading this weight may still be queued: wait
  // for the stream first (the addon drains without the op mutex before calling, so this wait is short).
  // On failure the weight stays registered, and stc_close releases it.
  STC_TRY(sync_stream(ctx, "cudaStreamSynchronize (before freeing an NF4 weight)"));
  const DevNF4 d = it->second;
  ctx->weights.erase(it);
  ctx->weight_bytes -= (int64_t)d.bytes;
  STC_CK(cudaFree(d.base));
  return 0;
}

int stc_nf4_stats(stc_ctx* ctx, int64_t* count, int64_t* bytes) {
  *count = 0;
  *bytes = 0;
  STC_TRY(enter(ctx));  // rejects a null context
  std::lock_guard<std::mutex> lock(ctx->mu);
  *count = (int64_t)ctx->weights.size();
  *bytes = ctx->weight_bytes;
  return 0;
}

int stc_gemm_nf4_resident(stc_ctx* ctx, int M, const float* X, int64_t weight_id, float beta, float* Y) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_REQUIRE(M >= 0, "gemmNF4: negative M=%d", M);
  NF4View w;
  STC_TRY(find_weight(ctx, "gemmNF4", weight_id, &w));
  return nf4_gemm_host(ctx, M, X, w, beta, Y, false);
}

int stc_gemm_nf4t_resident(stc_ctx* ctx, int M, const float* DY, int64_t weight_id, float beta, float* DX) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  STC_REQUIRE(M >= 0, "gemmNF4T: negative M=%d", M);
  NF4View w;
  STC_TRY(find_weight(ctx, "gemmNF4T", weight_id, &w));
  return nf4_gemm_host(ctx, M, DY, w, beta, DX, true);
}

int stc_dequant_nf4_resident(stc_ctx* ctx, int64_t weight_id, float* out) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  NF4View w;
  STC_TRY(find_weight(ctx, "dequantNF4", weight_id, &w));
  return nf4_dequant_host(ctx, w, out);
}

int stc_bench_nf4(stc_ctx* ctx, int M, int rows, int cols, int blocksize, int double_quant, int iters, double* out3) {
  ::stc::OpGuard stc_op_(ctx, __func__);
  STC_TRY(enter(ctx));
  int log2bs;
  STC_TRY(check_nf4_geometry("benchNF4", rows, cols, blocksize, &log2bs));
  STC_REQUIRE(M >= 1 && iters >= 1 && iters <= 1000, "benchNF4: M=%d must be >= 1 and iters=%d in 1..1000", M, iters);
  const int64_t n = (int64_t)rows * cols, nb = nf4_blocks(n, log2bs), nn = (nb + 255) / 256;
  const int64_t words = (nf4_packed_bytes(n) + 3) / 4;
  DevBuf dP, dS, dQ, dN, dC, dO, dX, dY;
  STC_TRY(dP.alloc(ctx, 4 * (size_t)words));
  STC_TRY(dS.alloc(ctx, sizeof(float) * (size_t)nb));
  STC_TRY(dQ.alloc(ctx, 4 * (size_t)((nb + 3) / 4)));
  STC_TRY(dN.alloc(ctx, sizeof(float) * (size_t)nn));
  STC_TRY(dC.alloc(ctx, sizeof(float) * 256));
  STC_TRY(dO.alloc(ctx, sizeof(float) * (size_t)n));
  STC_TRY(dX.alloc(ctx, sizeof(float) * (size_t)M * cols));
  STC_TRY(dY.alloc(ctx, sizeof(float) * (size_t)M * rows));
  const unsigned fg = ctx->sm_count * 8 > 0 ? ctx->sm_count * 8 : 1024;
  fill_words_kernel<<<fg, 256, 0, ctx->stream>>>(dP.as<uint32_t>(), words, 1u);
  fill_floats_kernel<<<fg, 256, 0, ctx->stream>>>(dS.as<float>(), nb, 2u, 0.01f, 0.1f);
  fill_words_kernel<<<fg, 256, 0, ctx->stream>>>(dQ.as<uint32_t>(), (nb + 3) / 4, 4u);
  fill_floats_kernel<<<fg, 256, 0, ctx->stream>>>(dN.as<float>(), nn, 5u, 0.01f, 0.05f);
  fill_floats_kernel<<<fg, 256, 0, ctx->stream>>>(dC.as<float>(), 256, 6u, -1.0f, 1.0f);
  fill_floats_kernel<<<fg, 256, 0, ctx->stream>>>(dX.as<float>(), (int64_t)M * cols, 3u, -1.0f, 1.0f);
  STC_LAUNCHED(ctx->stream);
  const AbsmaxF32 f32a{dS.as<float>()};
  const AbsmaxDQ dqa{dQ.as<uint8_t>(), dN.as<float>(), dC.as<float>(), 0.05f, 8};
  cudaEvent_t e0, e1;
  STC_CK(cudaEventCreate(&e0));
  cudaError_t ce = cudaEventCreate(&e1);
  if (ce != cudaSuccess) {
    cudaEventDestroy(e0);
    return fail_cuda(ce, "cudaEventCreate", __FILE__, __LINE__);
  }
  auto dequant = [&]() -> int {
    if (double_quant)
      dequant_nf4_kernel<AbsmaxDQ><<<dequant_grid(n), 256, 0, ctx->stream>>>(dO.as<float>(), dP.as<uint8_t>(), dqa, n, log2bs);
    else
      dequant_nf4_kernel<AbsmaxF32><<<dequant_grid(n), 256, 0, ctx->stream>>>(dO.as<float>(), dP.as<uint8_t>(), f32a, n,
                                                                              log2bs);
    STC_CK(cudaGetLastError());
    return 0;
  };
  auto gemm = [&]() -> int {
    if (double_quant)
      return launch_gemm<0, 1>(ctx, M, rows, cols, 1.0f, dX.as<float>(), LoadNF4DQ{dP.as<uint8_t>(), dqa, (int64_t)cols, log2bs},
                               0.0f, dY.as<float>(), ctx->tensor_cores());
    return launch_gemm<0, 1>(ctx, M, rows, cols, 1.0f, dX.as<float>(), LoadNF4{dP.as<uint8_t>(), dS.as<float>(), (int64_t)cols, log2bs},
                             0.0f, dY.as<float>(), ctx->tensor_cores());
  };
  // events are destroyed on every path below
  auto run = [&]() -> int {
    STC_TRY(dequant());  // warm-up
    STC_LAUNCHED(ctx->stream);
    STC_CK(cudaEventRecord(e0, ctx->stream));
    for (int i = 0; i < iters; i++) STC_TRY(dequant());
    STC_CK(cudaEventRecord(e1, ctx->stream));
    STC_CK(cudaGetLastError());
    STC_CK(cudaEventSynchronize(e1));
    float ms = 0;
    STC_CK(cudaEventElapsedTime(&ms, e0, e1));
    const double sec = ms * 1e-3 / iters;
    const double constants = double_quant ? (double)nb + 4.0 * nn + 4.0 * 256 : 4.0 * nb;
    const double bytes = (double)nf4_packed_bytes(n) + constants + 4.0 * n;
    out3[0] = bytes / sec / 1e9;
    out3[1] = sec;
    STC_TRY(gemm());
    STC_CK(cudaEventRecord(e0, ctx->stream));
    // launches are checked, not synchronized (SWARMTUNE_CUDA_SYNC=1 adds a wait per launch)
    for (int i = 0; i < iters; i++) STC_TRY(gemm());
    STC_CK(cudaEventRecord(e1, ctx->stream));
    STC_CK(cudaEventSynchronize(e1));
    STC_CK(cudaEventElapsedTime(&ms, e0, e1));
    out3[2] = 2.0 * M * (double)rows * cols * iters / (ms * 1e-3) / 1e12;
    return sync_stream(ctx, "cudaStreamSynchronize (benchNF4)");
  };
  const int st = run();
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return st;
}

}  // extern "C"
